#!/usr/bin/python3
"""Runs tokensampler-bench for docs/performance.md and draws its plot.

Usage: /usr/bin/python3 scripts/bench_report.py [--bench build/tests/bench/tokensampler-bench]
           [--out docs] [--repetitions 5] [--runs 3]

Runs the default chains (a–f and typical_p) on DESIGN.md's realistic rows (64 rows, seed 1):
the fast pipeline with 1 and 2 threads at every vocabulary size, the reference pipeline with 1
thread at V = 128256; writes every JSON line to OUT/bench/results.jsonl, a Markdown table to
stdout and the plot to OUT/img/performance.png. Measure on a quiet machine. With --runs N every
measurement is made N times (the runs interleaved) and each table cell is the run with the
median ratio to the floor: a shared VM drifts by tens of percent from one minute to the next.
"""
import argparse
import json
import os
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

VOCABS = [32000, 128256, 151936, 262144]
LABELS = {
    "temperature=0": "a greedy",
    "temperature=0.8": "b temp 0.8",
    "top_k=50,top_p=0.95,temperature=0.8": "c top-k+top-p+T",
    "top_p=0.9": "d top-p 0.9",
    "min_p=0.05,temperature=0.8": "e min-p+T",
    "repetition_penalty=1.1,frequency_penalty=0.5,presence_penalty=0.5,history=64,"
    "top_k=40,top_p=0.95,temperature=0.8": "f penalties+top-k+top-p+T",
    "typical_p=0.9": "typical-p 0.9",
}
TARGETS = {"a greedy": 1.5, "b temp 0.8": 2.5, "c top-k+top-p+T": 2.5, "d top-p 0.9": 3.0,
           "e min-p+T": 2.5, "f penalties+top-k+top-p+T": 3.0, "typical-p 0.9": 6.0}


def run(bench, args):
    out = subprocess.run([bench, "--generate", "--rows", "64", "--seed", "1"] + args,
                         check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bench", default="build/tests/bench/tokensampler-bench")
    parser.add_argument("--out", default="docs")
    parser.add_argument("--repetitions", default="5")
    parser.add_argument("--runs", type=int, default=1)
    opts = parser.parse_args()
    reps = ["--repetitions", opts.repetitions]
    results = []
    for run_index in range(opts.runs):
        for vocab in VOCABS:
            results += run(opts.bench, ["--vocab", str(vocab), "--threads", "1"] + reps)
            results += run(opts.bench, ["--vocab", str(vocab), "--threads", "1", "--batch"] + reps)
            results += run(opts.bench, ["--vocab", str(vocab), "--threads", "2"] + reps)
        if run_index == 0:
            results += run(opts.bench, ["--vocab", "128256", "--reference", "--repetitions", "1"])
        for dtype in ("bf16", "f16"):
            results += run(opts.bench, ["--vocab", "128256", "--dtype", dtype] + reps)
    os.makedirs(os.path.join(opts.out, "bench"), exist_ok=True)
    os.makedirs(os.path.join(opts.out, "img"), exist_ok=True)
    with open(os.path.join(opts.out, "bench", "results.jsonl"), "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")

    def pick(chain, vocab, threads, pipeline="fast", mode=None, dtype="f32"):
        """The run with the median ratio to the floor (of an odd number; the lower middle)."""
        mode = mode or ("row" if threads == 1 else "batch")
        runs = sorted((r for r in results
                       if (r["chain"], r["vocab"], r["threads"], r["pipeline"], r["mode"],
                           r["dtype"]) == (chain, vocab, threads, pipeline, mode, dtype)),
                      key=lambda r: r["ratio_to_floor"])
        return runs[(len(runs) - 1) // 2] if runs else None

    print("| chain | reference µs | fast µs median | mean | floor µs | median / floor | "
          "mean / floor | target | bf16 µs | 1 thread batch µs/row | 2 threads | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for chain, label in LABELS.items():
        ref = pick(chain, 128256, 1, "reference")
        one = pick(chain, 128256, 1)
        bf16 = pick(chain, 128256, 1, dtype="bf16")
        batch = pick(chain, 128256, 1, mode="batch")
        two = pick(chain, 128256, 2)
        print(f"| {label} | {ref['us_per_row_median']:.0f} | {one['us_per_row_median']:.1f} | "
              f"{one['us_per_row_mean']:.1f} | {one['floor_us_per_row']:.1f} | "
              f"{one['ratio_to_floor']:.2f} | "
              f"{one['us_per_row_mean'] / one['floor_us_per_row']:.2f} | ≤ {TARGETS[label]} | "
              f"{bf16['us_per_row_median']:.1f} | {batch['us_per_row_median']:.1f} | "
              f"{two['us_per_row_median']:.1f} | "
              f"{batch['us_per_row_median'] / two['us_per_row_median']:.2f}× |")
    print()
    print("| chain | " + " | ".join(f"V={v} µs (×floor)" for v in VOCABS) + " |")
    print("|---|" + "---|" * len(VOCABS))
    for chain, label in LABELS.items():
        cells = []
        for v in VOCABS:
            r = pick(chain, v, 1)
            cells.append(f"{r['us_per_row_median']:.1f} ({r['ratio_to_floor']:.2f})")
        print(f"| {label} | " + " | ".join(cells) + " |")

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    labels = list(LABELS.values())
    xs = range(len(labels))
    ratio = [pick(c, 128256, 1)["ratio_to_floor"] for c in LABELS]
    ref_ratio = [pick(c, 128256, 1, "reference")["ratio_to_floor"] for c in LABELS]
    left.bar([x - 0.2 for x in xs], ref_ratio, 0.4, label="reference (sorts)", color="#bbb")
    left.bar([x + 0.2 for x in xs], ratio, 0.4, label="fast, 1 thread", color="#2a6")
    left.scatter(xs, [TARGETS[lab] for lab in labels], marker="_", s=400, color="k",
                 label="target", zorder=3)
    left.set_yscale("log")
    left.set_xticks(list(xs))
    left.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    left.set_ylabel("time per row / one streaming read of the row")
    left.set_title("V = 128256, 64 realistic rows")
    left.legend(fontsize=8)
    for chain, label in LABELS.items():
        ys = [pick(chain, v, 1)["us_per_row_median"] for v in VOCABS]
        right.plot(VOCABS, ys, marker="o", label=label)
    floor = [pick("temperature=0", v, 1)["floor_us_per_row"] for v in VOCABS]
    right.plot(VOCABS, floor, "k--", label="floor (one read)")
    right.set_xlabel("vocabulary size")
    right.set_ylabel("µs per row (median, 1 thread)")
    right.set_title("fast pipeline by vocabulary")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(opts.out, "img", "performance.png"), dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
