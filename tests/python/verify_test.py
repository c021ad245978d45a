"""Tests of `Client.verify` (speculative decoding) against the real tokensamplerd (path in
$TOKENSAMPLERD) on a temporary Unix socket. The statistical test uses fixed seeds and Pearson's
chi-square at α = 0.001 against the exact target distribution computed here with numpy."""

import os
import unittest

import grpc
import numpy as np

import tokensampler

DAEMON = None
CLIENT = None


def setUpModule():
    global DAEMON, CLIENT
    DAEMON = tokensampler.Daemon(os.environ["TOKENSAMPLERD"], args=["--threads=2"])
    DAEMON.start()
    CLIENT = tokensampler.Client(DAEMON.target, timeout=60)


def tearDownModule():
    CLIENT.close()
    exit_code = DAEMON.stop()
    if exit_code != 0:
        raise AssertionError(f"tokensamplerd exited with {exit_code}:\n{DAEMON.stderr()}")


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


class VerifyTest(unittest.TestCase):
    def test_first_token_follows_the_target_and_accepted_count_its_exact_mean(self):
        rng = np.random.default_rng(7)
        vocab, k, n = 5, 2, 20000
        target = rng.normal(0, 1.5, (k + 1, vocab)).astype(np.float32)
        q = np.stack([softmax(rng.normal(0, 1.5, vocab)) for _ in range(k)]).astype(np.float32)
        drafts = [[int(rng.choice(vocab, p=q[j] / q[j].sum())) for j in range(k)] for _ in range(n)]
        results = CLIENT.verify(np.tile(target, (n, 1)), drafts,
                                [{"seed": i} for i in range(n)], draft_probs=[q] * n)
        self.assertEqual(len(results), n)
        first = np.bincount([r.token_ids[0] for r in results], minlength=vocab)
        p = [softmax(row.astype(np.float64)) for row in target]
        expected = p[0] * n
        chi = ((first - expected) ** 2 / expected).sum()
        self.assertLess(chi, 18.467)  # df = 4, α = 0.001
        beta = [np.minimum(p[j], q[j].astype(np.float64) / q[j].sum()).sum() for j in range(k)]
        exact = beta[0] + beta[0] * beta[1]
        accepted = np.array([r.num_accepted for r in results], np.float64)
        z = (accepted.mean() - exact) / (accepted.std() / np.sqrt(n))
        self.assertLess(abs(z), 3.29)
        for r in results:
            self.assertEqual(len(r.token_ids), r.num_accepted + 1)
            self.assertEqual(list(r.accepted_draft_indices), list(range(r.num_accepted)))

    def test_greedy_verify_gives_the_tokens_of_greedy_decoding(self):
        rng = np.random.default_rng(3)
        vocab = 30
        table = rng.normal(0, 2, (vocab, vocab)).astype(np.float32)  # a bigram "model"
        params = {"temperature": 0.0, "repetition_penalty": 1.3}
        greedy = [4]
        for _ in range(12):
            result = CLIENT.sample(table[greedy[-1]][None, :], params,
                                   prompt_token_ids=[[4]], output_token_ids=[greedy[1:]])
            greedy.append(int(result.token_ids[0, 0]))
        decoded = [4]
        while len(decoded) < len(greedy):
            # Drafts: the true next two tokens when known, then a wrong guess.
            drafts = greedy[len(decoded):len(decoded) + 2] + [0]
            rows = [table[decoded[-1]]] + [table[t] for t in drafts]
            [result] = CLIENT.verify(np.stack(rows), [drafts], params, prompt_token_ids=[[4]],
                                     output_token_ids=[decoded[1:]])
            decoded.extend(int(t) for t in result.token_ids)
        self.assertEqual(decoded[:len(greedy)], greedy)

    def test_tree_with_bfloat16_draft_probs_and_logprobs(self):
        x = np.array([[0, 0, 6, 0], [0, 0, 0, 0], [0, 6, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0],
                      [0, 0, 0, 6]], np.float32)
        q = np.full((5, 4), 0.25, np.float32)
        q_bits = (q.view(np.uint32) >> 16).astype(np.uint16)
        [result] = CLIENT.verify(x, [[1, 2, 3, 0, 1]], {"temperature": 0.0, "logprobs": 1},
                                 draft_probs=[q_bits], draft_dtype="bfloat16",
                                 draft_parents=[[-1, -1, 0, 1, 1]])
        self.assertEqual(result.token_ids.tolist(), [2, 1, 3])
        self.assertEqual(result.accepted_draft_indices.tolist(), [1, 4])
        self.assertEqual(len(result.logprobs), 3)
        self.assertAlmostEqual(float(result.logprobs[0]), 6 - np.log(np.exp(6) + 3), places=5)
        self.assertEqual(len(result.top_logprobs), 3)

    def test_errors_name_the_field_and_value(self):
        x = np.zeros((3, 4), np.float32)
        with self.assertRaisesRegex(ValueError, "logits has 3 rows but the drafts need 4"):
            CLIENT.verify(x, [[1, 2, 3]])
        with self.assertRaises(tokensampler.TokenSamplerError) as caught:
            CLIENT.verify(x, [[1, 2]], draft_parents=[[1, 0]])
        self.assertEqual(caught.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("rows[0].draft_parents[0] = 1 makes a cycle (0 -> 1 -> 0)",
                      caught.exception.details)
        with self.assertRaises(tokensampler.TokenSamplerError) as caught:
            CLIENT.verify(x, [[1, 2]], draft_probs=[np.full((2, 4), 0.3, np.float32)])
        self.assertIn("rows[0].draft_probs row 0 sums to 1.2", caught.exception.details)
        # The server goes on serving.
        [ok] = CLIENT.verify(x, [[1, 2]])
        self.assertGreaterEqual(len(ok.token_ids), 1)

    def test_session_step_with_drafts_equals_verify(self):
        rng = np.random.default_rng(11)
        vocab = 16
        table = rng.normal(0, 2, (vocab, vocab)).astype(np.float32)
        params = {"temperature": 0.9, "seed": 5, "presence_penalty": 0.4}
        output = []
        with CLIENT.session() as session:
            session.add([3, 4], params, prompt_token_ids=[[2], [2]])
            other = []
            for _ in range(5):
                last = output[-1] if output else 2
                drafts = [int(t) for t in rng.integers(0, vocab, 3)]
                rows = [table[last]] + [table[t] for t in drafts]
                [want] = CLIENT.verify(np.stack(rows), [drafts], params, prompt_token_ids=[[2]],
                                       output_token_ids=[output])
                plain = table[other[-1] if other else 2][None, :]
                step = session.step(np.concatenate([np.stack(rows), plain]), [3, 4],
                                    drafts={3: drafts})
                self.assertEqual(step.emitted[0].tolist(), want.token_ids.tolist())
                self.assertEqual(int(step.num_accepted[0]), want.num_accepted)
                self.assertEqual(int(step.token_ids[0]), int(want.token_ids[-1]))
                self.assertEqual(len(step.emitted[1]), 1)
                output += want.token_ids.tolist()
                other.append(int(step.token_ids[1]))


if __name__ == "__main__":
    unittest.main()
