"""Tests of the Python package `tokensampler`: request encoding without a server, then the real
tokensamplerd (path in $TOKENSAMPLERD) on a temporary Unix socket and 127.0.0.1:0."""

import math
import os
import shutil
import threading
import unittest

import grpc
import numpy as np

import tokensampler
from tokensampler import sampler_pb2

try:
    import torch
except ImportError:
    torch = None

NO_TORCH = "torch is not installed for this Python (Debian: apt-get install python3-torch)"
DAEMON = None


def setUpModule():
    global DAEMON
    DAEMON = tokensampler.Daemon(os.environ["TOKENSAMPLERD"], tcp=True, args=["--threads=2"])
    DAEMON.start()


def tearDownModule():
    exit_code = DAEMON.stop()  # SIGTERM: graceful drain, then exit 0
    if exit_code != 0 or "event=stop" not in DAEMON.stderr():
        raise AssertionError(f"tokensamplerd exited with {exit_code}:\n{DAEMON.stderr()}")


def exact_logits(rows, vocab, seed):
    """float32 logits exactly representable as float16 and bfloat16 (k/4 with |k| < 256: at most
    8 significant bits), distinct within a row, so every dtype must give the same answers."""
    assert vocab <= 510
    rng = np.random.default_rng(seed)
    values = (np.arange(vocab, dtype=np.float32) - vocab // 2) / 4
    return np.stack([rng.permutation(values) for _ in range(rows)])


def bfloat16_bits(f32):
    return (f32.view(np.uint32) >> 16).astype(np.uint16)  # exact for exact_logits values


class EncodeTest(unittest.TestCase):
    """make_request / encode_logits / make_params: no server."""

    def test_float32_and_float16_are_sent_as_their_bytes(self):
        x = exact_logits(3, 40, seed=1)
        for array, dtype in ((x, sampler_pb2.DTYPE_FLOAT32),
                             (x.astype(np.float16), sampler_pb2.DTYPE_FLOAT16)):
            logits = tokensampler.encode_logits(array)
            self.assertEqual((logits.dtype, logits.rows, logits.vocab_size), (dtype, 3, 40))
            self.assertEqual(logits.data, array.tobytes())

    def test_bfloat16_bits_need_an_explicit_dtype(self):
        bits = bfloat16_bits(exact_logits(2, 8, seed=1))
        with self.assertRaisesRegex(ValueError, "bfloat16"):
            tokensampler.encode_logits(bits)
        logits = tokensampler.encode_logits(bits, dtype="bfloat16")
        self.assertEqual(logits.dtype, sampler_pb2.DTYPE_BFLOAT16)
        self.assertEqual(logits.data, bits.tobytes())

    def test_refuses_what_would_need_a_conversion_or_has_the_wrong_shape(self):
        with self.assertRaisesRegex(ValueError, "float64"):
            tokensampler.encode_logits(np.zeros((2, 4)))
        with self.assertRaisesRegex(ValueError, "2-D"):
            tokensampler.encode_logits(np.zeros(4, np.float32))
        with self.assertRaisesRegex(ValueError, "dtype='float16'"):
            tokensampler.encode_logits(np.zeros((1, 4), np.float32), dtype="float16")
        with self.assertRaises(TypeError):
            tokensampler.encode_logits([[1.0, 2.0]])

    def test_non_contiguous_and_big_endian_arrays_are_made_contiguous_little_endian(self):
        x = exact_logits(4, 10, seed=2)
        self.assertEqual(tokensampler.encode_logits(x[:, ::2]).data, x[:, ::2].copy().tobytes())
        self.assertEqual(tokensampler.encode_logits(x.astype(">f4")).data, x.tobytes())

    @unittest.skipIf(torch is None, NO_TORCH)
    def test_torch_tensors_are_sent_as_their_bytes(self):
        x = torch.tensor(exact_logits(2, 16, seed=3))
        for dtype, expected in ((torch.float32, sampler_pb2.DTYPE_FLOAT32),
                                (torch.float16, sampler_pb2.DTYPE_FLOAT16),
                                (torch.bfloat16, sampler_pb2.DTYPE_BFLOAT16)):
            t = x.to(dtype).requires_grad_(True)
            logits = tokensampler.encode_logits(t)
            self.assertEqual(logits.dtype, expected)
            self.assertEqual(logits.data, t.detach().view(torch.int16).numpy().tobytes())
        with self.assertRaisesRegex(ValueError, "float64"):
            tokensampler.encode_logits(x.double())

    def test_params_from_a_dict_by_proto_field_names(self):
        params = tokensampler.make_params({
            "temperature": np.float32(0.5), "top_k": np.int64(40), "seed": 7, "ignore_eos": True,
            "logit_bias": {5: -100, np.int32(6): float("-inf")},
            "stop_token_sequences": [[1, 2], np.array([3])], "eos_token_ids": [2],
            "sampler_order": ["top_k", "SAMPLER_STAGE_TEMPERATURE", 3],
            "logprobs_mode": "processed_logprobs", "token_bitmask": np.packbits([1] * 16),
            "min_p": None})
        expected = sampler_pb2.SamplingParams(
            temperature=0.5, top_k=40, seed=7, ignore_eos=True,
            logit_bias={5: -100.0, 6: -math.inf},
            stop_token_sequences=[sampler_pb2.TokenSequence(token_ids=[1, 2]),
                                  sampler_pb2.TokenSequence(token_ids=[3])],
            eos_token_ids=[2],
            sampler_order=[sampler_pb2.SAMPLER_STAGE_TOP_K, sampler_pb2.SAMPLER_STAGE_TEMPERATURE,
                           sampler_pb2.SAMPLER_STAGE_MIN_P],
            logprobs_mode=sampler_pb2.PROCESSED_LOGPROBS, token_bitmask=b"\xff\xff")
        self.assertEqual(params, expected)
        self.assertFalse(params.HasField("min_p"))

    def test_bad_params_raise_value_error_naming_the_key(self):
        for spec, key in (({"top_pp": 0.9}, "top_pp"), ({"top_k": 1.5}, "top_k"),
                          ({"temperature": "hot"}, "temperature"),
                          ({"ignore_eos": 1}, "ignore_eos"),
                          ({"logprobs_mode": "logprobs"}, "logprobs_mode"),
                          ({"bad_words": [[1.5]]}, "bad_words")):
            with self.subTest(spec=spec), self.assertRaisesRegex(ValueError, key):
                tokensampler.make_params(spec)

    def test_rows_get_shared_or_per_row_values(self):
        x = exact_logits(2, 8, seed=4)
        request = tokensampler.make_request(x, {"top_k": 3}, output_token_ids=[[1], [2, 3]],
                                            mirostat_mu=6.0)
        self.assertEqual([r.params.top_k for r in request.rows], [3, 3])
        self.assertEqual([list(r.output_token_ids) for r in request.rows], [[1], [2, 3]])
        self.assertEqual([list(r.prompt_token_ids) for r in request.rows], [[], []])
        self.assertEqual([r.mirostat_mu for r in request.rows], [6.0, 6.0])
        request = tokensampler.make_request(x, [{}, {"n": 2}], mirostat_mu=[None, 4.0])
        self.assertEqual([r.params.n for r in request.rows], [0, 2])
        self.assertEqual([r.HasField("mirostat_mu") for r in request.rows], [False, True])
        with self.assertRaisesRegex(ValueError, "params has 3 entries for 2 logits rows"):
            tokensampler.make_request(x, [{}, {}, {}])
        with self.assertRaisesRegex(ValueError, "prompt_token_ids"):
            tokensampler.make_request(x, prompt_token_ids=[[1]])
        with self.assertRaisesRegex(ValueError, r"output_token_ids\[1\]"):
            tokensampler.make_request(x, output_token_ids=[[1], [2.5]])
        request = tokensampler.make_request(x, prompt_token_ids=np.array([[1, 2], [3, 4]]))
        self.assertEqual([list(r.prompt_token_ids) for r in request.rows], [[1, 2], [3, 4]])


class ServiceTest(unittest.TestCase):
    """The package against the real daemon."""

    def setUp(self):
        self.client = tokensampler.Client(DAEMON.target, timeout=30)
        self.addCleanup(self.client.close)

    def test_health(self):
        self.assertTrue(self.client.health())
        self.assertTrue(self.client.health("tokensampler.v1.Sampler"))
        with self.assertRaises(tokensampler.TokenSamplerError) as caught:
            self.client.health("no.such.Service")
        self.assertEqual(caught.exception.code, grpc.StatusCode.NOT_FOUND)

    def check_every_dtype_gives_the_same_answers(self, arrays, x):
        params = {"temperature": 0, "logprobs": 3, "logprobs_mode": "raw_logits"}
        order = np.argsort(-x, axis=1, kind="stable")
        for name, (array, dtype) in arrays.items():
            with self.subTest(dtype=name):
                result = self.client.sample(array, params, dtype=dtype)
                np.testing.assert_array_equal(result.token_ids[:, 0], x.argmax(axis=1))
                np.testing.assert_array_equal(result.logprobs[:, 0], x.max(axis=1))
                for row in range(x.shape[0]):
                    top = {int(t): float(x[row, t]) for t in order[row, :3]}
                    self.assertEqual(result.top_logprobs[row][0], top)

    def test_every_numpy_dtype(self):
        x = exact_logits(5, 300, seed=5)
        self.check_every_dtype_gives_the_same_answers({
            "float32": (x, None),
            "float16": (x.astype(np.float16), None),
            "bfloat16 bits (uint16)": (bfloat16_bits(x), "bfloat16"),
            "bfloat16 bits (int16)": (bfloat16_bits(x).view(np.int16), "bfloat16"),
        }, x)

    @unittest.skipIf(torch is None, NO_TORCH)
    def test_every_torch_dtype(self):
        x = exact_logits(5, 300, seed=6)
        t = torch.tensor(x)
        self.check_every_dtype_gives_the_same_answers({
            "float32": (t, None),
            "float16": (t.half(), None),
            "bfloat16": (t.bfloat16(), None),
            "bfloat16 transposed view": (t.bfloat16().T.contiguous().T, "bfloat16"),
        }, x)

    def test_tcp_and_unix_socket(self):
        self.assertEqual(len(DAEMON.addresses), 2)
        x = exact_logits(1, 50, seed=7)
        for target in DAEMON.addresses:
            with self.subTest(target=target), tokensampler.Client(target, timeout=30) as client:
                result = client.sample(x, {"temperature": 0})
                self.assertEqual(result.token_ids[0, 0], x.argmax())

    def test_batch_of_mixed_params(self):
        vocab = 1000
        x = np.random.default_rng(8).normal(0, 2, (6, vocab)).astype(np.float32)
        x[4] = x[1]  # row 4 repeats row 1: same params and seed must give the same tokens
        forced = int(np.argmin(x[2]))
        seeded = {"seed": 42, "n": 4, "top_k": 50, "logprobs": 0}
        params = [
            {"temperature": 0},                                                 # greedy
            seeded,                                                             # n = 4
            {"logit_bias": {forced: 100.0}, "eos_token_ids": [forced], "seed": 1},
            {"temperature": 0, "max_tokens": 3, "n": 2},                         # LENGTH
            seeded,
            {"top_p": 1e-6, "seed": 5},                                         # keeps one
        ]
        output = [[], [], [], [1, 2], [], []]
        result = self.client.sample(x, params, output_token_ids=output)

        self.assertEqual(result.token_ids.shape, (6, 4))
        self.assertEqual(result.token_ids.dtype, np.int32)
        self.assertEqual(result.logprobs.dtype, np.float32)
        self.assertEqual(len(result.response.results), 1 + 4 + 1 + 2 + 4 + 1)
        self.assertEqual([len(top) for top in result.top_logprobs], [1, 4, 1, 2, 4, 1])
        np.testing.assert_array_equal(result.token_ids[[0, 2, 5], 1:], -1)  # padding
        self.assertTrue(np.isnan(result.logprobs[0, 1:]).all())

        self.assertEqual(result.token_ids[0, 0], x[0].argmax())
        top50 = set(np.argsort(-x[1])[:50].tolist())
        self.assertLessEqual(set(result.token_ids[1].tolist()), top50)
        self.assertGreater(len(set(result.token_ids[1].tolist())), 1)  # 4 independent draws
        self.assertTrue((result.logprobs[1] < 0).all())
        np.testing.assert_array_equal(result.token_ids[4], result.token_ids[1])
        self.assertEqual(result.token_ids[2, 0], forced)
        self.assertEqual(result.finish_reasons[2, 0], tokensampler.FinishReason.FINISH_REASON_EOS)
        np.testing.assert_array_equal(result.token_ids[3, :2], x[3].argmax())
        np.testing.assert_array_equal(result.finish_reasons[3, :2],
                                      sampler_pb2.FINISH_REASON_LENGTH)
        self.assertEqual(result.finish_reasons[0, 0], sampler_pb2.FINISH_REASON_UNSPECIFIED)
        self.assertEqual(result.token_ids[5, 0], x[5].argmax())

        # Seeded rows do not depend on the batch: row 1 alone (its params as a SamplingParams).
        alone = self.client.sample(x[1:2], tokensampler.make_params(seeded))
        np.testing.assert_array_equal(alone.token_ids[0], result.token_ids[1])
        np.testing.assert_array_equal(alone.logprobs[0], result.logprobs[1])

    def test_processed_logprobs_are_the_sampled_distribution(self):
        x = exact_logits(1, 200, seed=9)
        result = self.client.sample(x, {"top_k": 5, "seed": 3, "logprobs": -1,
                                        "logprobs_mode": "processed_logprobs"})
        top = result.top_logprobs[0][0]
        self.assertEqual(set(top), set(np.argsort(-x[0])[:5].tolist()))
        self.assertAlmostEqual(sum(math.exp(v) for v in top.values()), 1.0, places=5)
        self.assertIn(result.token_ids[0, 0], top)
        self.assertAlmostEqual(result.logprobs[0, 0], top[result.token_ids[0, 0]], places=6)

    def test_mirostat_mu_goes_round_trip(self):
        x = np.random.default_rng(10).normal(0, 3, (2, 500)).astype(np.float32)
        result = self.client.sample(x, [{"mirostat_mode": 2, "seed": 1}, {"seed": 1}],
                                    mirostat_mu=[7.0, None])
        self.assertTrue(np.isfinite(result.mirostat_mu[0, 0]))
        self.assertNotEqual(result.mirostat_mu[0, 0], 7.0)  # updated by the surprise of the draw
        self.assertTrue(np.isnan(result.mirostat_mu[1, 0]))

    def test_invalid_arguments_raise_with_the_code_and_a_message_naming_the_field(self):
        x = exact_logits(2, 100, seed=11)
        nan = x.copy()
        nan[1, 3] = np.nan
        for logits, params, words in (
                (x, {"top_p": 1.5}, ["rows[0]", "top_p", "1.5"]),
                (x, [{}, {"repetition_penalty": 0.0}], ["rows[1]", "repetition_penalty"]),
                (x, {"logit_bias": {100: 1.0}}, ["logit_bias", "100"]),
                (x, {"n": 0}, ["n"]),
                (nan, {}, ["NaN"])):
            with self.subTest(params=params), \
                    self.assertRaises(tokensampler.TokenSamplerError) as caught:
                self.client.sample(logits, params)
            error = caught.exception
            self.assertIsInstance(error, Exception)
            self.assertEqual(error.code, grpc.StatusCode.INVALID_ARGUMENT)
            for word in words:
                self.assertIn(word, error.details)
            self.assertIn("INVALID_ARGUMENT", str(error))

    def test_unreachable_server_is_unavailable(self):
        with tokensampler.Client("unix:/nonexistent/ts.sock", timeout=5) as client:
            with self.assertRaises(tokensampler.TokenSamplerError) as caught:
                client.sample(exact_logits(1, 4, seed=12))
        self.assertEqual(caught.exception.code, grpc.StatusCode.UNAVAILABLE)


class DaemonTest(unittest.TestCase):
    """tokensampler.Daemon, started while this process has gRPC threads (the module's client)."""

    @unittest.skipUnless(shutil.which("setpriv"), "no setpriv (util-linux) on this machine")
    def test_the_daemon_gets_sigterm_when_the_thread_that_started_it_exits(self):
        started = []
        starter = threading.Thread(
            target=lambda: started.append(tokensampler.Daemon(os.environ["TOKENSAMPLERD"]).start()))
        starter.start()
        starter.join()
        (daemon,) = started
        # SIGTERM from the kernel: a graceful drain, exit 0 (the daemon logs its stop).
        self.assertEqual(daemon.wait(), 0)
        self.assertIn("event=stop", daemon.stderr())

    def test_wait_and_stop_refuse_a_daemon_that_is_not_running(self):
        daemon = tokensampler.Daemon(os.environ["TOKENSAMPLERD"])
        with self.assertRaises(RuntimeError):
            daemon.wait()
        with self.assertRaises(RuntimeError):
            daemon.stop()


class SessionTest(unittest.TestCase):
    """Client.session(): the Session stream against the real daemon."""

    def setUp(self):
        self.client = tokensampler.Client(DAEMON.target, timeout=30)
        self.addCleanup(self.client.close)

    def test_steps_match_sample_with_full_histories_for_every_dtype(self):
        vocab = 300
        params = [{"seed": 1, "repetition_penalty": 1.3, "logprobs": 2},
                  {"seed": 2, "top_k": 20, "presence_penalty": 0.5, "logprobs": 0},
                  {"mirostat_mode": 2, "seed": 3, "logprobs": 0}]
        prompts = [[1, 2, 3], [4], []]
        dtypes = {"float32": lambda x: (x, None), "float16": lambda x: (x.astype(np.float16), None),
                  "bfloat16 bits": lambda x: (bfloat16_bits(x), "bfloat16")}
        if torch is not None:
            dtypes["torch bfloat16"] = lambda x: (torch.tensor(x).bfloat16(), None)
        for name, encode in dtypes.items():
            with self.subTest(dtype=name), self.client.session() as session:
                session.add([10, 11, 12], params, prompt_token_ids=prompts)
                outputs, mus = [[], [], []], [None, None, None]
                for step in range(6):
                    x = exact_logits(3, vocab, seed=100 + step)
                    logits, dtype = encode(x)
                    got = session.step(logits, [10, 11, 12], dtype=dtype)
                    want = self.client.sample(logits, params, dtype=dtype,
                                              prompt_token_ids=prompts, output_token_ids=outputs,
                                              mirostat_mu=mus)
                    np.testing.assert_array_equal(got.sequence_ids, [10, 11, 12])
                    np.testing.assert_array_equal(got.token_ids, want.token_ids[:, 0])
                    np.testing.assert_array_equal(got.logprobs, want.logprobs[:, 0])
                    self.assertEqual(got.top_logprobs, [t[0] for t in want.top_logprobs])
                    for row in range(3):
                        outputs[row].append(int(want.token_ids[row, 0]))
                    mus[2] = float(want.mirostat_mu[2, 0])

    def test_fork_gives_the_n_samples_of_sample_and_release_drops(self):
        x = np.random.default_rng(20).normal(0, 1, (1, 500)).astype(np.float32)
        params = {"seed": 77, "logprobs": 0}
        with self.client.session() as session:
            session.add(1, params, prompt_token_ids=[[9, 8]])
            session.fork(1, [2, 3, 4])
            got = session.step(np.repeat(x, 4, axis=0), [1, 2, 3, 4])
            want = self.client.sample(x, dict(params, n=4), prompt_token_ids=[[9, 8]])
            np.testing.assert_array_equal(got.token_ids, want.token_ids[0])
            self.assertGreater(len(set(got.token_ids.tolist())), 1)

            session.release([2, 3])
            with self.assertRaises(tokensampler.TokenSamplerError) as caught:
                session.step(x, [3])
            self.assertEqual(caught.exception.code, grpc.StatusCode.NOT_FOUND)
            self.assertIn("sequence 3 is not in this session", caught.exception.details)
            self.assertEqual(session.step(np.repeat(x, 2, axis=0), [1, 4]).token_ids.shape, (2,))

    def test_finished_sequences_are_released_by_the_server(self):
        x = exact_logits(2, 50, seed=21)
        with self.client.session() as session:
            session.add([1, 2], [{"temperature": 0, "max_tokens": 1}, {"temperature": 0}])
            result = session.step(x, [1, 2])
            np.testing.assert_array_equal(result.finished, [True, False])
            self.assertEqual(result.finish_reasons[0], sampler_pb2.FINISH_REASON_LENGTH)
            with self.assertRaises(tokensampler.TokenSamplerError) as caught:
                session.step(x, [1, 2])
            self.assertEqual(caught.exception.code, grpc.StatusCode.NOT_FOUND)
            self.assertEqual(session.step(x[1:], [2]).token_ids[0], x[1].argmax())

    def test_request_errors_raise_with_the_code_and_the_stream_goes_on(self):
        x = exact_logits(1, 20, seed=22)
        with self.client.session() as session:
            session.add(1, {"temperature": 0})
            for call, code, words in (
                    (lambda: session.add(1), grpc.StatusCode.ALREADY_EXISTS,
                     "add[0]: sequence 1 already exists"),
                    (lambda: session.add(2, {"top_p": 0.0}), grpc.StatusCode.INVALID_ARGUMENT,
                     "add[0].params.top_p must be in (0, 1], got 0"),
                    (lambda: session.add(2, {"n": 2}), grpc.StatusCode.INVALID_ARGUMENT,
                     "add[0].params.n must be 1 in a session (fork the sequence for more "
                     "samples), got 2"),
                    (lambda: session.fork(9, [10]), grpc.StatusCode.NOT_FOUND,
                     "fork[0]: sequence 9 is not in this session"),
                    (lambda: session.release(9), grpc.StatusCode.NOT_FOUND,
                     "release[0]: sequence 9 is not in this session"),
                    (lambda: session.step(x, [1, 2]), grpc.StatusCode.INVALID_ARGUMENT,
                     "step: logits.rows is 1 but the stepped sequences need 2")):
                with self.subTest(words=words):
                    with self.assertRaises(tokensampler.TokenSamplerError) as caught:
                        call()
                    self.assertEqual(caught.exception.code, code)
                    self.assertEqual(caught.exception.details, words)
                    self.assertEqual(session.step(x, [1]).token_ids[0], x.argmax())
            with self.assertRaises(ValueError):
                session.step(x, [1.5])
            with self.assertRaises(ValueError):
                session.add([3, 4], [{}, {}, {}])

    @staticmethod
    def toy_beam_logits(prefix, vocab):
        """A toy model: float32 logits seeded by the whole prefix (deterministic)."""
        rng = np.random.default_rng([7] + [int(t) for t in prefix])
        row = rng.uniform(-4.0, 4.0, vocab).astype(np.float32)
        row[0] += np.float32(0.6 * (len(prefix) - 2))  # token 0 = EOS grows likelier
        return row

    @classmethod
    def reference_beam_search(cls, prompt, vocab, width, max_tokens, length_penalty):
        """HF beam search (EARLY_STOPPING_HEURISTIC, EOS = 0), written plainly with numpy in
        float64: K = 2·width continuations, only the `width` best may finish, hypothesis score
        = sum / (generated length incl. EOS)^length_penalty."""
        running = [([], 0.0)]
        finished = []  # (score, tokens)
        steps = []
        for step in range(max_tokens):
            cands = []
            for b, (out, score) in enumerate(running):
                x = cls.toy_beam_logits(prompt + out, vocab).astype(np.float64)
                logp = x - x.max() - np.log(np.exp(x - x.max()).sum())
                cands += [(score + logp[v], b, v) for v in range(vocab)]
            cands.sort(key=lambda c: (-c[0], c[1], c[2]))
            nxt, slots = [], []
            for rank, (score, b, v) in enumerate(cands[:2 * width]):
                out = running[b][0] + [v]
                if v == 0 or len(out) == max_tokens:
                    if rank < width:
                        finished.append((score / len(out) ** length_penalty, out))
                        finished.sort(key=lambda h: -h[0])
                        del finished[width:]
                    continue
                nxt.append((out, score))
                slots.append((b, v))
                if len(nxt) == width:
                    break
            steps.append(slots)
            done = not nxt or (len(finished) == width and
                               finished[-1][0] >= nxt[0][1] / (step + 1) ** length_penalty)
            if done:
                return steps, finished
            running = nxt
        raise AssertionError("max_tokens ends every search")

    def test_beam_search_follows_parent_beams_and_matches_a_reference(self):
        vocab, width, max_tokens, prompt = 30, 3, 8, [5, 6]
        want_steps, want_hyps = self.reference_beam_search(prompt, vocab, width, max_tokens, 1.0)
        with self.client.session() as session:
            session.add_beam_search(4, {"eos_token_ids": [0], "max_tokens": max_tokens},
                                    beam_width=width, num_return_sequences=width,
                                    early_stopping="heuristic", prompt_token_ids=prompt)
            session.add(1, {"temperature": 0})  # a plain sequence in the same steps
            beams = [[]]  # the worker's per-beam state: here, the generated tokens
            for want in want_steps:
                rows = [self.toy_beam_logits(prompt + b, vocab) for b in beams]
                result = session.step(np.stack([rows[0]] + rows), [1, 4])
                self.assertIsNone(result.beams[0])
                self.assertEqual(result.token_ids[0], rows[0].argmax())
                beam = result.beams[1]
                self.assertEqual(list(zip(beam.parent_beams.tolist(), beam.token_ids.tolist())),
                                 want)
                beams = [beams[p] + [t] for p, t in zip(beam.parent_beams, beam.token_ids)]
            self.assertTrue(beam.finished)
            self.assertEqual([h.token_ids for h in beam.hypotheses], [h[1] for h in want_hyps])
            np.testing.assert_allclose([h.score for h in beam.hypotheses],
                                       [h[0] for h in want_hyps], rtol=1e-5)
            self.assertEqual(beam.finish_reason, beam.hypotheses[0].finish_reason)
            with self.assertRaises(tokensampler.TokenSamplerError) as caught:
                session.add_beam_search(5, beam_width=0)
            self.assertEqual(caught.exception.details,
                             "add[0].beam.beam_width must be in [1, 16] (the server's "
                             "--max_beam_width), got 0")
            with self.assertRaises(ValueError):
                session.add_beam_search(5, beam_width=2, early_stopping="soon")

    def test_beam_search_next_to_a_drafted_sequence(self):
        """A step with drafts for a plain sequence also advances a beam search (as without
        drafts); drafts for the beam search itself are refused."""
        vocab, width, max_tokens, prompt = 30, 2, 6, [5, 6]
        want_steps, _ = self.reference_beam_search(prompt, vocab, width, max_tokens, 1.0)
        with self.client.session() as session:
            session.add_beam_search(4, {"eos_token_ids": [0], "max_tokens": max_tokens},
                                    beam_width=width, prompt_token_ids=prompt)
            session.add(1, {"temperature": 0}, prompt_token_ids=[[3]])
            beams, plain = [[]], [3]
            for step, want in enumerate(want_steps):
                # Greedy drafts: the first is the target's argmax (accepted), the second not.
                row0 = self.toy_beam_logits(plain, vocab)
                d0 = int(row0.argmax())
                row1 = self.toy_beam_logits(plain + [d0], vocab)
                d1 = (int(row1.argmax()) + 1) % vocab
                row2 = self.toy_beam_logits(plain + [d0, d1], vocab)
                beam_rows = [self.toy_beam_logits(prompt + b, vocab) for b in beams]
                logits = np.stack([row0, row1, row2] + beam_rows)
                if step == 1:
                    with self.assertRaises(tokensampler.TokenSamplerError) as caught:
                        session.step(logits, [1, 4], drafts={4: [d0, d1]})
                    self.assertEqual(caught.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
                    self.assertEqual(caught.exception.details,
                                     "step: drafts[0]: sequence 4 is a beam search; drafts "
                                     "apply to plain sequences only")
                result = session.step(logits, [1, 4], drafts={1: [d0, d1]})
                self.assertIsNone(result.beams[0])
                self.assertEqual(result.emitted[0].tolist(), [d0, int(row1.argmax())])
                self.assertEqual(result.num_accepted[0], 1)
                self.assertEqual(len(result.emitted[1]), 0)
                beam = result.beams[1]
                self.assertEqual(list(zip(beam.parent_beams.tolist(), beam.token_ids.tolist())),
                                 want)
                beams = [beams[p] + [t] for p, t in zip(beam.parent_beams, beam.token_ids)]
                plain += result.emitted[0].tolist()
            self.assertTrue(beam.finished)

    def test_limits_and_the_end_of_the_stream(self):
        with tokensampler.Daemon(os.environ["TOKENSAMPLERD"],
                                 args=["--threads=1", "--session_max_sequences=2"]) as daemon:
            with tokensampler.Client(daemon.target, timeout=30) as client:
                session = client.session()
                with self.assertRaises(tokensampler.TokenSamplerError) as caught:
                    session.add([1, 2, 3])
                self.assertEqual(caught.exception.code, grpc.StatusCode.RESOURCE_EXHAUSTED)
                self.assertEqual(caught.exception.details,
                                 "add[2]: the session would hold 3 sequences; the limit is 2 "
                                 "(a beam search counts as beam_width sequences)")
                self.assertEqual(daemon.stop(), 0)  # SIGTERM ends the stream: UNAVAILABLE
                with self.assertRaises(tokensampler.TokenSamplerError) as caught:
                    session.add(5)
                self.assertEqual(caught.exception.code, grpc.StatusCode.UNAVAILABLE)
                with self.assertRaises(tokensampler.TokenSamplerError) as caught:
                    session.add(6)
                self.assertEqual(caught.exception.code, grpc.StatusCode.FAILED_PRECONDITION)


if __name__ == "__main__":
    unittest.main()
