"""Runs client/examples/ngram_worker.py and scripts/plot_sampling.py against the real
tokensamplerd ($TOKENSAMPLERD), short runs."""

import importlib.util
import os
import subprocess
import sys
import tempfile
import unittest

import numpy as np

import tokensampler

SOURCE_DIR = os.environ["TOKENSAMPLER_SOURCE_DIR"]
NGRAM_WORKER = os.path.join(SOURCE_DIR, "client", "examples", "ngram_worker.py")
PLOT_SAMPLING = os.path.join(SOURCE_DIR, "scripts", "plot_sampling.py")
DAEMON = None


def setUpModule():
    global DAEMON
    DAEMON = tokensampler.Daemon(os.environ["TOKENSAMPLERD"], args=["--threads=2"]).start()


def tearDownModule():
    exit_code = DAEMON.stop()
    if exit_code != 0:
        raise AssertionError(f"tokensamplerd exited with {exit_code}:\n{DAEMON.stderr()}")


def load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120,
                          check=False)


class NgramWorkerTest(unittest.TestCase):
    def test_prints_text_for_every_setting(self):
        steps = 12
        done = run([NGRAM_WORKER, "--target", DAEMON.target, "--steps", str(steps)])
        self.assertEqual(done.returncode, 0, done.stderr)
        lines = done.stdout.splitlines()
        worker = load(NGRAM_WORKER)
        for name, _ in worker.SETTINGS:
            with self.subTest(setting=name):
                header = next(i for i, line in enumerate(lines) if line.startswith(f"== {name} "))
                self.assertIn("distinct words", lines[header])
                self.assertIn("FINISH_REASON_LENGTH", lines[header])  # max_tokens = steps
                text = lines[header + 1]
                self.assertTrue(text.startswith("   the miller"), text)
                self.assertGreaterEqual(len(text.split()), steps)
        self.assertIn("Session: 7 sequences decoded through one stream, the server keeping "
                      "their histories: the same tokens, logprobs and finish reasons as with "
                      "Sample", done.stdout)

    def test_greedy_is_the_models_argmax_and_seeded_rows_repeat(self):
        worker = load(NGRAM_WORKER)
        with open(worker.CORPUS, encoding="utf-8") as f:
            model = worker.TrigramModel(worker.tokenize(f.read()))
        prompt = [model.ids["the"], model.ids["river"]]
        expected = []
        for _ in range(10):
            expected.append(int(np.argmax(model.logits(prompt + expected))))
        settings = [("greedy", {"temperature": 0}), ("hot", {"temperature": 1.5})]
        with tokensampler.Client(DAEMON.target) as client:
            first = worker.generate(client, model, prompt, settings, steps=10, seed=3)
            again = worker.generate(client, model, prompt, settings, steps=10, seed=3)
        self.assertEqual(first[0][0], expected)
        self.assertEqual(first, again)  # same seed, same history → same tokens
        self.assertNotEqual(first[0][1], expected)

    def test_session_gives_the_tokens_of_sample_and_ends_sequences_by_itself(self):
        worker = load(NGRAM_WORKER)
        with open(worker.CORPUS, encoding="utf-8") as f:
            model = worker.TrigramModel(worker.tokenize(f.read()))
        prompt = [model.ids["the"], model.ids["miller"]]
        # Settings ending at different steps: EOS on "." for one, max_tokens for the others.
        period = model.ids["."]
        settings = [("greedy", {"temperature": 0}), ("hot", {"temperature": 1.5}),
                    ("until a period", {"eos_token_ids": [period], "min_p": 0.05}),
                    ("top_p", {"top_p": 0.8})]
        with tokensampler.Client(DAEMON.target) as client:
            sampled = worker.generate(client, model, prompt, settings, steps=25, seed=9)
            streamed = worker.generate_session(client, model, prompt, settings, steps=25, seed=9)
        s_out, s_logprobs, s_finish = streamed
        f_out, f_logprobs, f_finish = sampled
        self.assertEqual(s_finish[2], tokensampler.FinishReason.Value("FINISH_REASON_EOS"))
        end = len(s_out[2])
        self.assertLess(end, 25)
        self.assertEqual(s_out[2][-1], period)
        # generate() (stateless) stepped that row on after its EOS; up to it, the same.
        self.assertEqual(s_out[2], f_out[2][:end])
        self.assertEqual(s_logprobs[2], f_logprobs[2][:end])
        for row in (0, 1, 3):
            self.assertEqual(s_out[row], f_out[row])
            self.assertEqual(s_logprobs[row], f_logprobs[row])
            self.assertEqual(s_finish[row], f_finish[row])


class PlotSamplingTest(unittest.TestCase):
    def test_writes_the_pictures_of_docs_sampling_md(self):
        if importlib.util.find_spec("matplotlib") is None:
            self.skipTest("matplotlib is not installed (Debian: python3-matplotlib)")
        with tempfile.TemporaryDirectory() as out:
            done = run([PLOT_SAMPLING, "--target", DAEMON.target, "--out", out])
            self.assertEqual(done.returncode, 0, done.stderr)
            pngs = sorted(os.listdir(out))
            self.assertEqual(len(pngs), 6, pngs)
            for png in pngs:
                with open(os.path.join(out, png), "rb") as f:
                    self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        rows = {line.split("|")[1].strip(): line.split("|")[2:-1]
                for line in done.stdout.splitlines() if line.startswith("| ")}
        self.assertEqual(rows["T = 1.0"], rows["raw"])  # temperature 1 changes nothing
        self.assertEqual(rows["raw"][0].strip(), "32000")


if __name__ == "__main__":
    unittest.main()
