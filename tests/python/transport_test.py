"""Shared-memory logits and sparse candidates from Python, against the real tokensamplerd
(path in $TOKENSAMPLERD) on a temporary Unix socket (shared memory on, the default) and
127.0.0.1:0 (shared memory refused there by default)."""

import os
import unittest

import numpy as np

import tokensampler
from tokensampler import sampler_pb2

DAEMON = None


def setUpModule():
    global DAEMON
    DAEMON = tokensampler.Daemon(os.environ["TOKENSAMPLERD"], tcp=True, args=["--threads=2"])
    DAEMON.start()


def tearDownModule():
    exit_code = DAEMON.stop()
    if exit_code != 0 or "event=stop" not in DAEMON.stderr():
        raise AssertionError(f"tokensamplerd exited with {exit_code}:\n{DAEMON.stderr()}")


def realistic(rows, vocab, seed):
    """Peaked rows like DESIGN.md's: bulk N(0, 2.5²) plus a few high tokens."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 2.5, size=(rows, vocab)).astype(np.float32)
    for r in range(rows):
        x[r, rng.choice(vocab, 4, replace=False)] += np.float32(np.log(vocab) + 6)
    return x


class SharedMemoryTest(unittest.TestCase):
    def setUp(self):
        self.client = tokensampler.Client(DAEMON.target)  # the Unix socket

    def tearDown(self):
        self.client.close()

    def test_every_dtype_round_trips_like_bytes(self):
        x = realistic(4, 3000, seed=1)
        params = {"temperature": 0.9, "top_p": 0.95, "seed": 5, "n": 2, "logprobs": 2}
        for dtype, array in (("float32", x), ("float16", x.astype(np.float16)),
                             ("bfloat16", (x.view(np.uint32) >> 16).astype(np.uint16))):
            with self.subTest(dtype=dtype), \
                    self.client.shared_memory_logits(4, 3000, dtype) as shm:
                shm.array[:] = array
                by_reference = self.client.sample(shm, params)
                by_bytes = self.client.sample(array, params, dtype=dtype)
                np.testing.assert_array_equal(by_reference.token_ids, by_bytes.token_ids)
                np.testing.assert_array_equal(by_reference.logprobs, by_bytes.logprobs)
                listed = self.client.list_shared_memory([shm.region])
                self.assertEqual([r.key for r in listed], [shm.key])
        # Closed: unregistered on the server, unlinked here.
        with self.assertRaises(tokensampler.TokenSamplerError) as caught:
            self.client.unregister_shared_memory(shm.region)
        self.assertEqual(caught.exception.code.name, "NOT_FOUND")
        self.assertFalse(os.path.exists("/dev/shm" + shm.key))

    def test_tcp_is_refused_by_default(self):
        tcp = tokensampler.Client(DAEMON.addresses[1])
        with self.client.shared_memory_logits(1, 100, "float32") as shm:
            with self.assertRaises(tokensampler.TokenSamplerError) as caught:
                tcp.register_shared_memory("x", shm.key, 0, 400)
            self.assertEqual(caught.exception.code.name, "FAILED_PRECONDITION")
            self.assertIn("Unix sockets only", caught.exception.details)
        tcp.close()

    def test_truncated_region_is_an_error_and_the_server_lives(self):
        shm = self.client.shared_memory_logits(2, 500, "float32")
        shm.array[:] = realistic(2, 500, seed=2)
        self.client.sample(shm, {"temperature": 0})
        os.truncate("/dev/shm" + shm.key, 16)
        with self.assertRaises(tokensampler.TokenSamplerError) as caught:
            self.client.sample(shm, {"temperature": 0})
        self.assertEqual(caught.exception.code.name, "FAILED_PRECONDITION")
        self.assertIn('region "logits"', caught.exception.details)
        self.assertTrue(self.client.health())
        self.client.unregister_shared_memory(shm.region)
        shm._release_memory()


class VerifyFromSharedMemoryTest(unittest.TestCase):
    """Client.verify and Session steps with drafts read target logits from a region exactly as
    from bytes; sparse target logits are refused, naming the field."""

    def setUp(self):
        self.client = tokensampler.Client(DAEMON.target)

    def tearDown(self):
        self.client.close()

    def test_verify_and_session_drafts_match_bytes(self):
        x = realistic(3, 2000, seed=3)
        drafts = [int(x[0].argmax()), int(x[1].argmax())]  # 2 drafts: 3 target rows
        params = {"temperature": 0.8, "seed": 9, "logprobs": 1}
        with self.client.shared_memory_logits(3, 2000, "float32") as shm:
            shm.array[:] = x
            [by_reference] = self.client.verify(shm, [drafts], params)
            [by_bytes] = self.client.verify(x, [drafts], params)
            np.testing.assert_array_equal(by_reference.token_ids, by_bytes.token_ids)
            np.testing.assert_array_equal(by_reference.logprobs, by_bytes.logprobs)
            self.assertEqual(by_reference.num_accepted, by_bytes.num_accepted)
            session = self.client.session()
            session.add([4], params)
            step = session.step(shm, [4], drafts={4: drafts})
            np.testing.assert_array_equal(np.asarray(step.emitted[0]), by_bytes.token_ids)
            session.close()
        with self.assertRaises(tokensampler.TokenSamplerError) as caught:
            self.client.verify(tokensampler.sparse_from_dense(x, 10), [drafts], params)
        self.assertEqual(caught.exception.code.name, "INVALID_ARGUMENT")
        self.assertIn("logits.sparse is not accepted by Verify", caught.exception.details)


class SparseTest(unittest.TestCase):
    def test_top_k_matches_dense_and_whole_vocabulary_sampling_is_refused(self):
        client = tokensampler.Client(DAEMON.addresses[1])  # sparse works over TCP too
        x = realistic(6, 4000, seed=3)
        sparse = tokensampler.sparse_from_dense(x, k=256)
        self.assertEqual(sparse.WhichOneof("source"), "sparse")
        params = {"top_k": 40, "temperature": 0.8, "seed": 9, "n": 3, "logprobs": 3}
        a = client.sample(x, params)
        b = client.sample(sparse, params)
        np.testing.assert_array_equal(a.token_ids, b.token_ids)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-4)
        with self.assertRaises(tokensampler.TokenSamplerError) as caught:
            client.sample(sparse, {"temperature": 0.8})
        self.assertEqual(caught.exception.code.name, "INVALID_ARGUMENT")
        self.assertIn("samples from the whole vocabulary", caught.exception.details)
        client.close()

    def test_sparse_logits_layout(self):
        logits = tokensampler.sparse_logits([[3, 1]], np.array([[2.0, 1.0]], np.float32),
                                            [0.5], 10)
        self.assertEqual((logits.rows, logits.vocab_size, logits.sparse.k), (1, 10, 2))
        self.assertEqual(logits.dtype, sampler_pb2.DTYPE_FLOAT32)
        self.assertEqual(np.frombuffer(logits.sparse.token_ids, "<i4").tolist(), [3, 1])
        self.assertEqual(list(logits.sparse.rest_logsumexp), [0.5])


if __name__ == "__main__":
    unittest.main()
