"""Soak test: a started tokensamplerd under steady Session (and Sample) load for a while; its
memory must stay flat and no call may fail.

    PYTHONPATH=build/python /usr/bin/python3 tests/soak/soak.py \
        --tokensamplerd build/service/tokensamplerd --seconds 600 \
        --csv docs/bench/soak_rss.csv --plot docs/img/soak_rss.png

8 threads each drive one Session stream: 16 sequences with varied, seeded parameters (top_p,
min_p, top_k, penalties, max_tokens, stop tokens, logprobs), stepped with realistically shaped
bf16 logits (vocab 32000); finished sequences are replaced, every 20th step forks one sequence
and releases another, and every 300 steps the stream is closed and a new one opened (so stream
teardown is soaked too). 2 more threads send unary Sample calls (8 rows). Every answer is
checked (one result per row, token ids inside the vocabulary, the finish reasons the params
allow). Once a second the daemon's RSS is read from /proc/<pid>/status.

Fails (exit 1) when any call fails or returns a malformed answer, when the daemon does not
exit 0 on SIGTERM at the end, or when the RSS drifts after the warm-up (the first
--warmup_fraction of the run, at least 10 s): the median RSS of each later 10 s window must be
within --tolerance (default 10 %) of the first window's median. Single samples are not held to
it: they jump by several MiB as 1 MiB requests come and go; a leak moves every later window.
Prints one JSON line of figures; --csv writes the RSS curve (seconds, rss_kib, steps,
sample_calls), --plot draws it (matplotlib).
"""

import argparse
import csv
import json
import os
import sys
import threading
import time

import numpy as np

import tokensampler

VOCAB = 32000
SEQUENCES = 16
STEPS_PER_STREAM = 300


def realistic_logits(rng, rows):
    """DESIGN.md's benchmark rows: bulk σ·N(0,1), σ ∈ [2,3); 1–8 peaked tokens; as bfloat16
    bit patterns (uint16, truncated), what a GPU worker sends."""
    sigma = rng.uniform(2.0, 3.0, size=(rows, 1)).astype(np.float32)
    logits = (rng.standard_normal((rows, VOCAB), dtype=np.float32) * sigma)
    for r in range(rows):
        top = np.log(VOCAB) + sigma[r, 0] ** 2 / 2 + rng.uniform(-1.0, 6.0)
        for _ in range(rng.integers(1, 9)):
            logits[r, rng.integers(VOCAB)] = top
            top -= rng.exponential(1.0)
    return (logits.view(np.uint32) >> 16).astype(np.uint16)


def params_for(sequence_id):
    """Varied parameters, seeded (reproducible), each family of stages exercised."""
    kind = sequence_id % 6
    p = {"seed": sequence_id, "logprobs": sequence_id % 4, "max_tokens": 50 + sequence_id % 200,
         "stop_token_ids": [7, 11]}
    if kind == 0:
        p.update(temperature=0.0)
    elif kind == 1:
        p.update(temperature=0.8, top_p=0.95)
    elif kind == 2:
        p.update(temperature=1.0, min_p=0.05, repetition_penalty=1.1)
    elif kind == 3:
        p.update(top_k=40, frequency_penalty=0.5, presence_penalty=0.3)
    elif kind == 4:
        p.update(typical_p=0.9, logprobs_mode=tokensampler.LogprobsMode.PROCESSED_LOGPROBS)
    else:
        p.update(temperature=0.7, dry_multiplier=0.8, no_repeat_ngram_size=3)
    return p


def check_step(result, ids):
    if len(result.token_ids) != len(ids) or list(result.sequence_ids) != list(ids):
        raise AssertionError(f"step answered {len(result.token_ids)} rows for {len(ids)} ids")
    if result.token_ids.min() < 0 or result.token_ids.max() >= VOCAB:
        raise AssertionError(f"token id out of range: {result.token_ids}")
    allowed = {0, tokensampler.FinishReason.FINISH_REASON_LENGTH,
               tokensampler.FinishReason.FINISH_REASON_STOP}
    if not set(int(r) for r in result.finish_reasons) <= allowed:
        raise AssertionError(f"unexpected finish reasons {result.finish_reasons}")


class Load:
    def __init__(self, target, deadline):
        self.target = target
        self.deadline = deadline
        self.lock = threading.Lock()
        self.steps = 0
        self.sample_calls = 0
        self.streams_opened = 0
        self.errors = []

    def failed(self, what):
        with self.lock:
            self.errors.append(what)

    def stream_worker(self, index):
        client = tokensampler.Client(self.target, timeout=60.0)
        rng = np.random.default_rng(index)
        pool = [realistic_logits(rng, SEQUENCES) for _ in range(4)]
        next_id = index * 10_000_000
        try:
            while time.monotonic() < self.deadline:
                with client.session() as session:
                    with self.lock:
                        self.streams_opened += 1
                    live = []
                    for _ in range(SEQUENCES):
                        session.add(next_id, params_for(next_id),
                                    prompt_token_ids=[rng.integers(VOCAB, size=64)])
                        live.append(next_id)
                        next_id += 1
                    for step in range(STEPS_PER_STREAM):
                        if time.monotonic() >= self.deadline:
                            break
                        if step % 20 == 19:
                            # Fork one live sequence, release another: the table churns.
                            session.fork(live[0], [next_id])
                            session.release([live[1]])
                            live = [live[0], next_id] + live[2:]
                            next_id += 1
                        logits = pool[step % len(pool)][: len(live)]
                        result = session.step(logits, live, dtype="bfloat16")
                        check_step(result, live)
                        finished = [i for i, done in zip(live, result.finished) if done]
                        live = [i for i, done in zip(live, result.finished) if not done]
                        for _ in finished:  # replaced by new sequences
                            session.add(next_id, params_for(next_id),
                                        prompt_token_ids=[rng.integers(VOCAB, size=64)])
                            live.append(next_id)
                            next_id += 1
                        with self.lock:
                            self.steps += 1
        except Exception as error:  # any failure fails the soak
            self.failed(f"stream {index}: {type(error).__name__}: {error}")
        finally:
            client.close()

    def unary_worker(self, index):
        client = tokensampler.Client(self.target, timeout=60.0)
        rng = np.random.default_rng(1000 + index)
        pool = [realistic_logits(rng, 8) for _ in range(4)]
        params = [params_for(i) for i in range(8)]
        calls = 0
        try:
            while time.monotonic() < self.deadline:
                result = client.sample(pool[calls % len(pool)], params, dtype="bfloat16",
                                       output_token_ids=[rng.integers(VOCAB, size=calls % 50)
                                                         for _ in range(8)])
                if result.token_ids.shape != (8, 1):
                    raise AssertionError(f"Sample answered {result.token_ids.shape}")
                calls += 1
                with self.lock:
                    self.sample_calls += 1
        except Exception as error:
            self.failed(f"unary {index}: {type(error).__name__}: {error}")
        finally:
            client.close()


def rss_kib(pid):
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def plot(path, samples, warmup, reference, tolerance, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = [s[0] for s in samples]
    mib = [s[1] / 1024 for s in samples]
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=110)
    ax.plot(seconds, mib, lw=1.2, label="tokensamplerd RSS")
    ax.axvspan(0, warmup, color="0.9", label="warm-up")
    ref = reference / 1024
    ax.axhspan(ref * (1 - tolerance), ref * (1 + tolerance), color="tab:green", alpha=0.12,
               label=f"±{tolerance:.0%} of the first window's median after warm-up")
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS (MiB)")
    ax.set_ylim(0, max(mib) * 1.25)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokensamplerd", required=True, help="path of the daemon binary")
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--unary", type=int, default=2, help="threads of unary Sample calls")
    parser.add_argument("--threads", type=int, default=2, help="the daemon's --threads")
    parser.add_argument("--daemon_arg", action="append", default=[],
                        help="one more tokensamplerd flag (repeatable), e.g. "
                             "--daemon_arg=--large_message_tuning=false")
    parser.add_argument("--warmup_fraction", type=float, default=0.25)
    parser.add_argument("--tolerance", type=float, default=0.10,
                        help="largest drift of a window's median RSS from the first window's")
    parser.add_argument("--window", type=int, default=10, help="RSS samples (seconds) per window")
    parser.add_argument("--csv", help="write the RSS curve here")
    parser.add_argument("--plot", help="draw the RSS curve here (PNG)")
    args = parser.parse_args()

    warmup = max(10.0, args.seconds * args.warmup_fraction)
    with tokensampler.Daemon(args.tokensamplerd, args=[f"--threads={args.threads}", *args.daemon_arg]) as daemon:
        pid = daemon.pid
        start = time.monotonic()
        load = Load(daemon.target, start + args.seconds)
        workers = [threading.Thread(target=load.stream_worker, args=(i,))
                   for i in range(args.streams)]
        workers += [threading.Thread(target=load.unary_worker, args=(i,))
                    for i in range(args.unary)]
        for worker in workers:
            worker.start()
        samples = []  # (seconds, rss_kib, steps, sample_calls)
        while any(worker.is_alive() for worker in workers):
            with load.lock:
                steps, calls = load.steps, load.sample_calls
            samples.append((round(time.monotonic() - start, 1), rss_kib(pid), steps, calls))
            time.sleep(1.0)
        for worker in workers:
            worker.join()
        exit_code = daemon.stop()

    after = [s for s in samples if s[0] >= warmup]
    # Flat = no trend. Single samples jump by several MiB as 1 MiB requests and their responses
    # come and go (and allocator arenas grow and trim), so the criterion compares the medians of
    # consecutive windows: a leak moves every later window, a transient moves none.
    windows = [after[i:i + args.window] for i in range(0, len(after), args.window)]
    windows = [w for w in windows if len(w) * 2 >= args.window]  # drop a short last window
    medians = [int(np.median([s[1] for s in w])) for w in windows]
    failures = list(load.errors)
    if exit_code != 0:
        failures.append(f"tokensamplerd exited with {exit_code}")
    if not medians:
        failures.append("no RSS window after the warm-up")
        reference = samples[-1][1]
    else:
        reference = medians[0]
        for i, median in enumerate(medians):
            drift = (median - reference) / reference
            if abs(drift) > args.tolerance:
                failures.append(
                    f"RSS drifted {drift:+.1%}: median {median} KiB in the window from "
                    f"{windows[i][0][0]} s vs {reference} KiB in the first window after warm-up")
    figures = {
        "seconds": args.seconds, "streams": args.streams, "unary_threads": args.unary,
        "steps": load.steps, "sample_calls": load.sample_calls,
        "streams_opened": load.streams_opened,
        "rss_kib_start": samples[0][1],
        "rss_kib_window_medians": medians,
        "rss_kib_end": samples[-1][1],
        "rss_kib_min_max_after_warmup": [min(s[1] for s in after), max(s[1] for s in after)]
        if after else None,
        "drift_last_window": round((medians[-1] - reference) / reference, 4) if medians else None,
        "errors": len(load.errors),
    }
    print(json.dumps(figures))
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "w", newline="", encoding="ascii") as f:
            writer = csv.writer(f)
            writer.writerow(["seconds", "rss_kib", "steps", "sample_calls"])
            writer.writerows(samples)
    if args.plot:
        plot(args.plot, samples, warmup, reference, args.tolerance,
             f"{args.streams} Session streams + {args.unary} Sample callers, "
             f"{args.seconds:.0f} s: {load.steps} steps, {load.sample_calls} Sample calls")
    for failure in failures:
        print(f"soak: FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
