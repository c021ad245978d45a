#!/usr/bin/python3
"""Runs `tokensampler-bench rpc` for docs/performance.md ("Transport") and draws its plot.

Usage: /usr/bin/python3 scripts/rpc_report.py [--bench build/tests/bench/tokensampler-bench]
           [--out docs] [--runs 3] [--steps 30] [--threads 2] [--load-duration 10]

Runs the whole matrix (batch 32 and 64 × V 128256 and 151936 × fp32 / bf16 × tcp, uds, shm,
sparse top-1024) `--runs` times, each run in its own process with its own in-process server,
and reports per configuration the median over the runs of each run's p50 / p99 (a run's own
core-only time is its reference); then the same matrix with gRPC's default settings
(--tuned=false) once, and a few --load runs. Every JSON line goes to OUT/bench/rpc.jsonl, the
Markdown tables to stdout, the plot to OUT/img/transport.png. Measure on a machine as quiet as
you can get it: other processes compiling show up in every figure.
"""
import argparse
import json
import os
import statistics
import subprocess

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PATHS = ["tcp", "uds", "shm", "sparse"]
PATH_LABELS = {"tcp": "bytes / TCP", "uds": "bytes / UDS", "shm": "shared memory",
               "sparse": "sparse top-1024"}


def run(bench, args):
    out = subprocess.run([bench, "rpc"] + args, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def key(line):
    return (line["rows"], line["vocab"], line["dtype"], line["path"])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bench", default="build/tests/bench/tokensampler-bench")
    parser.add_argument("--out", default="docs")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", default="30")
    parser.add_argument("--threads", default="2")
    parser.add_argument("--load-duration", default="10")
    parser.add_argument("--from-jsonl", help="rebuild the tables and plot from a saved rpc.jsonl")
    opts = parser.parse_args()
    common = ["--steps", opts.steps, "--threads", opts.threads]

    lines = []
    if opts.from_jsonl:
        with open(opts.from_jsonl) as f:
            lines = [json.loads(line) for line in f if line.strip()]
    else:
        for i in range(opts.runs):
            for line in run(opts.bench, common):
                line["run"] = i
                lines.append(line)
        for line in run(opts.bench, common + ["--tuned=false", "--paths", "tcp,uds"]):
            line["run"] = "untuned"
            lines.append(line)
        for args in (["--paths", "uds", "--concurrency", "1"],
                     ["--paths", "uds", "--concurrency", "8"],
                     ["--paths", "shm", "--concurrency", "8"],
                     ["--paths", "tcp", "--concurrency", "8"],
                     ["--paths", "shm", "--concurrency", "8", "--load_rpc", "session"]):
            lines += run(opts.bench, ["--load", "--rows", "32", "--vocab", "128256", "--dtype",
                                      "bf16", "--duration", opts.load_duration,
                                      "--threads", opts.threads] + args)
        os.makedirs(os.path.join(opts.out, "bench"), exist_ok=True)
        with open(os.path.join(opts.out, "bench", "rpc.jsonl"), "w") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")
    tuned, untuned, loads = {}, {}, []
    for line in lines:
        if line["bench"] == "load":
            loads.append(line)
        elif line.get("run") == "untuned":
            untuned[key(line)] = line
        else:
            tuned.setdefault(key(line), []).append(line)

    def med(entries, field):
        return statistics.median(e[field] for e in entries)

    print("Medians over the runs (each run: p50 / p99 of its steps); core = Sampler::Run alone on "
          "the same batch, timed before each step (median over every path's steps); × core = "
          "the median over the runs of each run's p50 / its own core p50; GB/s = dense bytes / "
          "p50.\n")
    print("| batch × V | dtype | MiB | core ms | " +
          " | ".join(f"{PATH_LABELS[p]} p50 / p99 ms (GB/s, × core)" for p in PATHS) + " |")
    print("|---|---|---|---|" + "---|" * len(PATHS))
    configs = sorted({k[:3] for k in tuned}, key=lambda c: (c[2], c[0], c[1]))
    for rows, vocab, dtype in configs:
        cells = []
        every = [e for p in PATHS for e in tuned.get((rows, vocab, dtype, p), [])]
        core = med(every, "core_ms")
        mib = every[0]["dense_bytes"] / 2**20
        for path in PATHS:
            entries = tuned.get((rows, vocab, dtype, path))
            if not entries:
                cells.append("–")
                continue
            p50, p99 = med(entries, "p50_ms"), med(entries, "p99_ms")
            cells.append(f"{p50:.2f} / {p99:.2f} ({entries[0]['dense_bytes'] / p50 / 1e6:.2f}, "
                         f"{med(entries, 'ratio_to_core'):.2f}×)")
        print(f"| {rows} × {vocab} | {dtype} | {mib:.1f} | {core:.2f} | " + " | ".join(cells) + " |")

    print("\ngRPC's default settings (--tuned=false, one run), p50 ms (GB/s):\n")
    print("| batch × V | dtype | bytes / TCP | bytes / UDS |")
    print("|---|---|---|---|")
    for rows, vocab, dtype in configs:
        cells = []
        for path in ("tcp", "uds"):
            e = untuned.get((rows, vocab, dtype, path))
            cells.append("–" if e is None else f"{e['p50_ms']:.2f} ({e['effective_gbps']:.2f})")
        print(f"| {rows} × {vocab} | {dtype} | " + " | ".join(cells) + " |")

    print("\nLoad (32 × 128256 bf16 per request):\n")
    print("| rpc | path | callers | req/s | rows/s | p50 ms | p99 ms | p99.9 ms | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for e in loads:
        errors = ", ".join(f"{k} {v}" for k, v in e["errors"].items()) or "0"
        print(f"| {e['rpc']} | {e['path']} | {e['concurrency']} | {e['throughput_rps']:.1f} | "
              f"{e['rows_per_s']:.0f} | {e['p50_ms']:.2f} | {e['p99_ms']:.2f} | "
              f"{e['p999_ms']:.2f} | {errors} |")

    # Plot: p50 per path against the core time, one group per configuration.
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.8 / (len(PATHS) + 1)
    labels = []
    for i, (rows, vocab, dtype) in enumerate(configs):
        labels.append(f"{rows}×{vocab}\n{dtype}")
        for j, path in enumerate(["core"] + PATHS):
            if path == "core":
                entries = [e for p in PATHS for e in tuned.get((rows, vocab, dtype, p), [])]
                value = med(entries, "core_ms") if entries else 0
            else:
                entries = tuned.get((rows, vocab, dtype, path))
                value = med(entries, "p50_ms") if entries else 0
            ax.bar(i + (j - len(PATHS) / 2) * width, value, width,
                   label=("core only" if path == "core" else PATH_LABELS[path]) if i == 0 else None,
                   color=["#444444", "#d62728", "#ff7f0e", "#2ca02c", "#1f77b4"][j])
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("ms per Sample step (p50)")
    ax.set_yscale("log")
    ax.set_title("One Sample step by transport (top_k 50 + top_p 0.95 + T 0.8; 2 server threads)")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.join(opts.out, "img"), exist_ok=True)
    fig.savefig(os.path.join(opts.out, "img", "transport.png"), dpi=110)


if __name__ == "__main__":
    main()
