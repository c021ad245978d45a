#!/usr/bin/python3
"""A toy model worker: a word trigram language model whose next-token logits are sampled by
tokensampler, for a batch of rows with different settings — first statelessly (one `Sample` call
per step, every row carrying its full history), then through a `Session` stream (the server keeps
each sequence's history; a step sends only the logits and the sequence ids), which must give
exactly the same text.

The model is trained at start-up from client/examples/data/corpus.txt (original text written for
this example, dedicated to the public domain): interpolated Witten-Bell trigram → bigram →
add-one unigram, so every word has a non-zero probability. Each row of the batch carries its own
sampling parameters. It prints each row's text and the effect of its setting: distinct-word
ratio, the model's perplexity of the text, and the share of trigrams not found in the corpus.

    PYTHONPATH=build/python /usr/bin/python3 client/examples/ngram_worker.py \\
        --daemon build/service/tokensamplerd          # or --target unix:/path | host:port
"""

import argparse
import collections
import math
import os
import re
import sys
import textwrap

import numpy as np

import tokensampler

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "corpus.txt")

# (name, sampling parameters): one batch row each.
SETTINGS = [
    ("greedy", {"temperature": 0}),
    ("temperature=0.5", {"temperature": 0.5}),
    ("temperature=1.0", {"temperature": 1.0}),
    ("temperature=1.5", {"temperature": 1.5}),
    ("top_p=0.5", {"top_p": 0.5}),
    ("top_p=0.9", {"top_p": 0.9}),
    ("min_p=0.1", {"min_p": 0.1}),
]


def tokenize(text):
    return re.findall(r"[a-z']+|[.,]", text.lower())


def detokenize(words):
    return re.sub(r" ([.,])", r"\1", " ".join(words))


class TrigramModel:
    """Interpolated Witten-Bell trigram model over the words of a text."""

    def __init__(self, words):
        self.vocab = sorted(set(words))
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        ids = [self.ids[w] for w in words]
        counts = np.bincount(ids, minlength=len(self.vocab)).astype(np.float64)
        self.unigram = (counts + 1) / (counts.sum() + len(self.vocab))
        followers = collections.defaultdict(collections.Counter)  # context tuple → Counter
        for n in (2, 3):
            for i in range(len(ids) - n + 1):
                followers[tuple(ids[i:i + n - 1])][ids[i + n - 1]] += 1
        # context → (follower ids, their counts) as arrays, for one vectorised update per level
        self.followers = {
            ctx: (np.fromiter(c.keys(), np.int64), np.fromiter(c.values(), np.float64))
            for ctx, c in followers.items()}
        self.trigrams = {tuple(ids[i:i + 3]) for i in range(len(ids) - 2)}

    def _interpolate(self, context, lower):
        seen = self.followers.get(context)
        if seen is None:
            return lower
        ids, counts = seen
        distinct, total = len(ids), counts.sum()
        p = lower * distinct  # Witten-Bell: P = (c(ctx, w) + T(ctx) · P_lower(w)) / (c(ctx) + T)
        p[ids] += counts
        return p / (total + distinct)

    def logits(self, history):
        """log P(next word | last two words of `history`) as float32 [vocab]."""
        p = self.unigram
        if len(history) >= 1:
            p = self._interpolate(tuple(history[-1:]), p)
        if len(history) >= 2:
            p = self._interpolate(tuple(history[-2:]), p)
        return np.log(p).astype(np.float32)


def generate(client, model, prompt, settings, steps, seed):
    """Generates `steps` words for every (name, params) in `settings`, one batch row each.
    Returns per row (output ids, raw logprobs of the chosen words, last finish reason)."""
    rows = len(settings)
    params = [dict(p, seed=seed, logprobs=0, max_tokens=steps) for _, p in settings]
    outputs = [[] for _ in range(rows)]
    logprobs = [[] for _ in range(rows)]
    finish = [0] * rows
    for _ in range(steps):
        logits = np.stack([model.logits(prompt + out) for out in outputs])
        result = client.sample(logits, params, prompt_token_ids=[prompt] * rows,
                               output_token_ids=outputs)
        for row in range(rows):
            outputs[row].append(int(result.token_ids[row, 0]))
            logprobs[row].append(float(result.logprobs[row, 0]))
            finish[row] = int(result.finish_reasons[row, 0])
    return outputs, logprobs, finish


def generate_session(client, model, prompt, settings, steps, seed):
    """As `generate`, through one Session stream: each setting is a sequence added once with its
    prompt; a step sends only the live sequences' logits and ids. A sequence ends when a result
    has a finish reason (the server then releases it). Returns what `generate` returns."""
    rows = len(settings)
    outputs = [[] for _ in range(rows)]
    logprobs = [[] for _ in range(rows)]
    finish = [0] * rows
    with client.session() as session:
        session.add(range(rows), [dict(p, seed=seed, logprobs=0, max_tokens=steps)
                                  for _, p in settings], prompt_token_ids=[prompt] * rows)
        live = list(range(rows))
        while live:
            logits = np.stack([model.logits(prompt + outputs[row]) for row in live])
            result = session.step(logits, live)
            for row, token, logprob, reason in zip(live, result.token_ids, result.logprobs,
                                                   result.finish_reasons):
                outputs[row].append(int(token))
                logprobs[row].append(float(logprob))
                finish[row] = int(reason)
            live = [row for row, done in zip(live, result.finished) if not done]
    return outputs, logprobs, finish


def report(model, prompt, settings, outputs, logprobs, finish, out=sys.stdout):
    for (name, _), ids, lps, reason in zip(settings, outputs, logprobs, finish):
        words = [model.vocab[i] for i in ids]
        history = prompt + ids
        trigrams = [tuple(history[i:i + 3]) for i in range(len(history) - 2)]
        novel = sum(t not in model.trigrams for t in trigrams) / max(1, len(trigrams))
        print(f"== {name:<16} distinct words {len(set(words)) / len(words):.2f}   "
              f"perplexity {math.exp(-sum(lps) / len(lps)):6.2f}   "
              f"novel trigrams {novel:4.0%}   finish "
              f"{tokensampler.FinishReason.Name(reason)}", file=out)
        text = detokenize([model.vocab[i] for i in prompt] + words)
        print(textwrap.indent(textwrap.fill(text, 96), "   "), file=out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", help="a running tokensamplerd: host:port or unix:/path")
    where.add_argument("--daemon", help="path of tokensamplerd to start for this run")
    parser.add_argument("--corpus", default=CORPUS, help="training text (default: %(default)s)")
    parser.add_argument("--prompt", default="the miller")
    parser.add_argument("--steps", type=int, default=60, help="words to generate per row")
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args(argv)

    with open(args.corpus, encoding="utf-8") as f:
        words = tokenize(f.read())
    model = TrigramModel(words)
    prompt = [model.ids[w] for w in tokenize(args.prompt) if w in model.ids]
    if not prompt:
        parser.error(f"no word of --prompt {args.prompt!r} is in the corpus")
    print(f"trained a word trigram model on {len(words)} words, vocabulary {len(model.vocab)}; "
          f"{len(SETTINGS)} rows x {args.steps} steps, one Sample call per step, then the same "
          "through a Session\n"
          "distinct words: unique / total; perplexity: exp(-mean log P) of the text under the "
          "model; novel trigrams: share not in the corpus\n")

    daemon = tokensampler.Daemon(args.daemon).start() if args.daemon else None
    try:
        with tokensampler.Client(daemon.target if daemon else args.target) as client:
            sampled = generate(client, model, prompt, SETTINGS, args.steps, args.seed)
            streamed = generate_session(client, model, prompt, SETTINGS, args.steps, args.seed)
    finally:
        if daemon:
            daemon.stop()
    report(model, prompt, SETTINGS, *sampled)
    same = streamed == sampled
    print(f"\nSession: {len(SETTINGS)} sequences decoded through one stream, the server keeping "
          f"their histories: {'the same' if same else 'DIFFERENT'} tokens, logprobs and finish "
          "reasons as with Sample")
    if not same:
        report(model, prompt, SETTINGS, *streamed)
        sys.exit(1)


if __name__ == "__main__":
    main()
