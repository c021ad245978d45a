#!/usr/bin/python3
"""Plots how the truncation controls reshape one realistic next-token distribution, from real
runs of the service (the pictures of docs/sampling.md).

One synthetic row as DESIGN.md's benchmark data (V = 32000, bulk σ·N(0,1) with σ ~ U[2,3), 1–8
peaked tokens, fixed seed) is sent once per setting with `logprobs: -1` and
`logprobs_mode: PROCESSED_LOGPROBS`: the response is the whole distribution the service would
draw from. Writes PNGs (matplotlib, Agg) and prints the numbers quoted in docs/sampling.md.

    PYTHONPATH=build/python /usr/bin/python3 scripts/plot_sampling.py \\
        --daemon build/service/tokensamplerd --out docs/img
"""

import argparse
import math
import os
import sys

import numpy as np

try:
    import tokensampler
except ImportError as error:
    sys.exit(f"{error}: build the `tokensampler_python` target and set PYTHONPATH=<build>/python")

TOP = 50  # tokens shown, by raw probability

# (control, [(label, params)]): one figure per control (sampling_<control>.png), one request row
# per setting.
CONTROLS = [
    ("temperature", [("T = 0.5", {"temperature": 0.5}), ("T = 1.0", {"temperature": 1.0}),
                     ("T = 1.5", {"temperature": 1.5})]),
    ("top_p", [("top_p = 0.9", {"top_p": 0.9}), ("top_p = 0.5", {"top_p": 0.5})]),
    ("min_p", [("min_p = 0.05", {"min_p": 0.05}), ("min_p = 0.2", {"min_p": 0.2})]),
    ("typical_p", [("typical_p = 0.9", {"typical_p": 0.9}),
                   ("typical_p = 0.5", {"typical_p": 0.5}),
                   ("typical_p = 0.2", {"typical_p": 0.2})]),
    ("top_n_sigma", [("top_n_sigma = 2", {"top_n_sigma": 2.0}),
                     ("top_n_sigma = 1", {"top_n_sigma": 1.0})]),
]
COLORS = ["tab:blue", "tab:red", "tab:green"]


def realistic_row(vocab, seed):
    """DESIGN.md's benchmark row: σ ~ U[2,3), bulk σ·N(0,1), 1–8 peaked tokens, the top one at
    ln V + σ²/2 + U[−1,6), each next lower by an Exp(1) gap. Returns (logits, peak ids, u)."""
    rng = np.random.default_rng(seed)
    sigma = rng.uniform(2, 3)
    logits = sigma * rng.standard_normal(vocab)
    peaks = rng.integers(1, 9)
    u = rng.uniform(-1, 6)
    value = math.log(vocab) + sigma**2 / 2 + u
    ids = rng.choice(vocab, peaks, replace=False)
    for token in ids:
        logits[token] = value
        value -= rng.exponential()
    return logits.astype(np.float32), sigma, ids, u


def distributions(client, logits, settings):
    """The processed distribution (float64 [rows, V]) for each params dict in `settings`."""
    params = [dict(p, logprobs=-1, logprobs_mode="PROCESSED_LOGPROBS", seed=1) for p in settings]
    batch = np.repeat(logits[None, :], len(settings), axis=0)
    result = client.sample(batch, params)
    probs = np.zeros(batch.shape, np.float64)
    for row, samples in enumerate(result.top_logprobs):
        ids = np.fromiter(samples[0].keys(), np.int64)
        probs[row, ids] = np.exp(np.fromiter(samples[0].values(), np.float64))
    return probs


def describe(probs, raw):
    """Numbers for one processed distribution against the raw one."""
    kept = probs > 0
    entropy = -np.sum(probs[kept] * np.log(probs[kept]))
    return {"kept": int(kept.sum()), "raw_mass": float(raw[kept].sum()),
            "top1": float(probs.max()), "perplexity": float(math.exp(entropy))}


def plot_row(raw, peaks, path, plt):
    order = np.argsort(-raw)
    rank_of = np.empty(raw.size, np.int64)
    rank_of[order] = np.arange(1, raw.size + 1)
    fig, ax = plt.subplots(figsize=(8, 3.8))
    ranks = np.arange(1, raw.size + 1)
    ax.loglog(ranks, raw[order], color="0.3", lw=1.2, label="every token")
    ax.plot(rank_of[peaks], raw[peaks], "o", color="tab:orange", ms=5,
            label=f"the {len(peaks)} peaked tokens")
    ax.axvspan(1, TOP, color="tab:orange", alpha=0.10, label=f"top {TOP}: the other plots")
    cumulative = np.cumsum(raw[order])
    for r in (1, 10, TOP, 1000):
        ax.annotate(f"top {r}: {cumulative[r - 1]:.0%} of the mass", (r, raw[order][r - 1]),
                    xytext=(8, -2), textcoords="offset points", fontsize=8)
    ax.set_ylim(raw.min() / 3, 3)
    ax.set_xlabel("rank by raw probability")
    ax.set_ylabel("raw probability")
    ax.set_title(f"The row: softmax of the logits as received (V = {raw.size})")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_control(name, labels, processed, stats, raw, peaks, path, plt):
    order = np.argsort(-raw)[:TOP]
    x = np.arange(1, TOP + 1)
    shown = np.concatenate([raw[order]] + [p[order] for p in processed])
    floor = min(1e-5, shown[shown > 0].min()) / 4
    fig, ax = plt.subplots(figsize=(8, 4.4))
    is_peak = np.isin(order, peaks)
    ax.bar(x[is_peak], raw[order][is_peak], width=0.8, color="0.62",
           label="raw (T = 1, nothing removed): peaked tokens")
    ax.bar(x[~is_peak], raw[order][~is_peak], width=0.8, color="0.85", label="raw: bulk")
    for i, (label, probs, s) in enumerate(zip(labels, processed, stats)):
        p = probs[order]
        kept = p > 0
        shift = (i - (len(labels) - 1) / 2) * 0.2  # keep the settings' markers apart
        if name == "temperature":
            what = f"top-1 {s['top1']:.2f}, perplexity {s['perplexity']:.1f}"
        else:
            what = (f"keeps {s['kept']} tokens = {s['raw_mass']:.1%} of the raw mass, "
                    f"top-1 {s['top1']:.2f}")
        ax.plot(x[kept] + shift, p[kept], "o-", color=COLORS[i], ms=4, lw=1,
                label=f"{label}: {what}")
        if (~kept).any():
            ax.plot(x[~kept] + shift, np.full((~kept).sum(), floor * 1.7), "x", color=COLORS[i],
                    ms=5, mew=1.2)
    ax.set_yscale("log")
    ax.set_ylim(floor, 1.5)
    ax.set_xlim(0, TOP + 1)
    ax.set_xlabel(f"token, ranked by raw probability (top {TOP} of {raw.size}); x = removed")
    ax.set_ylabel("probability sampled from")
    ax.set_title(f"{name}: the distribution the service draws from")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(True, axis="y", which="major", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", help="a running tokensamplerd: host:port or unix:/path")
    where.add_argument("--daemon", help="path of tokensamplerd to start for this run")
    parser.add_argument("--out", default="docs/img", help="directory for the PNGs")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seed", type=int, default=10,
                        help="row seed; 10 gives 7 peaked tokens and U = 1.93, a middling row")
    args = parser.parse_args(argv)

    import matplotlib  # noqa: PLC0415 (only this script needs it)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    logits, sigma, peaks, u = realistic_row(args.vocab, args.seed)
    settings = [{}] + [p for _, rows in CONTROLS for _, p in rows]
    daemon = tokensampler.Daemon(args.daemon).start() if args.daemon else None
    try:
        with tokensampler.Client(daemon.target if daemon else args.target) as client:
            probs = distributions(client, logits, settings)
    finally:
        if daemon:
            daemon.stop()

    raw = probs[0]
    os.makedirs(args.out, exist_ok=True)
    print(f"row: V = {args.vocab}, seed {args.seed}, sigma = {sigma:.2f}, {len(peaks)} peaked "
          f"tokens, U = {u:.2f}, logit std = {logits.std():.2f}; raw: top-1 {raw.max():.3f}, "
          f"top-{TOP} mass {np.sort(raw)[::-1][:TOP].sum():.3f}")
    plot_row(raw, peaks, os.path.join(args.out, "sampling_row.png"), plt)
    print("| setting | kept tokens | raw mass kept | top-1 prob | perplexity |")
    print("|---|---|---|---|---|")
    s = describe(raw, raw)
    print(f"| raw | {s['kept']} | {s['raw_mass']:.3f} | {s['top1']:.3f} | {s['perplexity']:.1f} |")
    row = 1
    for name, rows in CONTROLS:
        labels = [label for label, _ in rows]
        processed = probs[row:row + len(rows)]
        stats = [describe(p, raw) for p in processed]
        for label, s in zip(labels, stats):
            print(f"| {label} | {s['kept']} | {s['raw_mass']:.3f} | {s['top1']:.3f} | "
                  f"{s['perplexity']:.1f} |")
        plot_control(name, labels, processed, stats, raw, peaks,
                     os.path.join(args.out, f"sampling_{name}.png"), plt)
        row += len(rows)
    print(f"wrote {len(CONTROLS) + 1} PNGs to {args.out}")


if __name__ == "__main__":
    main()
