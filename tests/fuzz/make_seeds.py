"""Writes the seed corpora of the fuzz targets (tests/fuzz/corpus/<target>/), reproducibly.

    PYTHONPATH=build/python /usr/bin/python3 tests/fuzz/make_seeds.py

request:  one byte (even: SampleRequest; odd: SessionRequest, or VerifyRequest when bit 1 is
          set too) + a serialized message: valid requests of every kind (dtypes, parameter
          families, histories, adds, forks, steps, draft chains and trees) and a few invalid ones,
          so that mutation starts from the real wire format.
pipeline, session, verify: FuzzInput programs (tests/fuzz/fuzz_support.h) — bytes from a
          fixed-seed generator, of several lengths (every byte string is a valid program).
Besides these named seeds, each corpus holds inputs the fuzzers found (files named by their
SHA-1), minimized with libFuzzer's -merge=1 over the seeds and a run's scratch corpus:
    build-fuzz/tests/fuzz/fuzz_<t> -merge=1 <new dir> tests/fuzz/corpus/<t> <scratch corpus>
An input that made a target crash, once fixed, is added with a name saying what it found.
"""

import os
import random
import struct

from tokensampler.v1 import sampler_pb2 as pb

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    directory = os.path.join(HERE, "corpus", target)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, name), "wb") as f:
        f.write(data)


def logits(rows, vocab, dtype=pb.DTYPE_FLOAT32, rng=None, special=()):
    rng = rng or random.Random(0)
    values = [rng.gauss(0.0, 2.5) for _ in range(rows * vocab)]
    for i, v in special:
        values[i] = v
    out = pb.Logits(dtype=dtype, rows=rows, vocab_size=vocab)
    if dtype == pb.DTYPE_FLOAT32:
        out.data = struct.pack(f"<{len(values)}f", *values)
    else:  # bf16 by truncation, fp16 through struct's 'e' (the fuzzer only needs bytes)
        if dtype == pb.DTYPE_BFLOAT16:
            out.data = b"".join(struct.pack("<f", v)[2:] for v in values)
        else:
            out.data = struct.pack(f"<{len(values)}e", *values)
    return out


def sample_seeds():
    rng = random.Random(1)
    params = [
        pb.SamplingParams(),
        pb.SamplingParams(temperature=0.0, logprobs=3),
        pb.SamplingParams(temperature=0.8, top_p=0.9, top_k=5, seed=1, n=3),
        pb.SamplingParams(min_p=0.1, typical_p=0.9, logprobs=-1,
                          logprobs_mode=pb.PROCESSED_LOGPROBS),
        pb.SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2,
                          dry_multiplier=0.8, no_repeat_ngram_size=2),
        pb.SamplingParams(mirostat_mode=2, mirostat_tau=3.0, seed=4),
        pb.SamplingParams(top_n_sigma=1.0, xtc_probability=0.5, xtc_threshold=0.1,
                          epsilon_cutoff=3e-4, eta_cutoff=1e-3),
        pb.SamplingParams(preset="creative", max_tokens=2, min_tokens=1,
                          eos_token_ids=[1], stop_token_ids=[2]),
        pb.SamplingParams(logit_bias={0: -100.0, 3: 5.0}, allowed_token_ids=[0, 3, 5],
                          bad_words=[pb.TokenSequence(token_ids=[4, 5])]),
        pb.SamplingParams(sampler_order=[pb.SAMPLER_STAGE_TOP_K, pb.SAMPLER_STAGE_TEMPERATURE],
                          top_k=3, dynatemp_range=0.5),
        pb.SamplingParams(top_p=1.5),  # invalid
    ]
    for i, p in enumerate(params):
        vocab = rng.choice([1, 7, 16, 64, 300])
        dtype = [pb.DTYPE_FLOAT32, pb.DTYPE_BFLOAT16, pb.DTYPE_FLOAT16][i % 3]
        special = [(0, float("inf")), (1 % vocab, float("-inf"))] if i % 4 == 1 else []
        request = pb.SampleRequest(logits=logits(2, vocab, dtype, rng, special))
        for r in range(2):
            row = request.rows.add(params=p)
            row.prompt_token_ids.extend(rng.randrange(vocab) for _ in range(5))
            row.output_token_ids.extend(rng.randrange(vocab) for _ in range(r * 3))
        write("request", f"sample_{i:02d}", b"\x00" + request.SerializeToString())
    # A bitmask, a NaN, a size mismatch.
    request = pb.SampleRequest(logits=logits(1, 16))
    request.rows.add(params=pb.SamplingParams(token_bitmask=b"\xf0\x0f"))
    write("request", "sample_bitmask", b"\x00" + request.SerializeToString())
    request = pb.SampleRequest(logits=logits(1, 8, special=[(3, float("nan"))]))
    request.rows.add()
    write("request", "sample_nan", b"\x00" + request.SerializeToString())
    request = pb.SampleRequest(logits=logits(2, 8))
    request.rows.add()
    write("request", "sample_row_mismatch", b"\x00" + request.SerializeToString())


def session_seeds():
    rng = random.Random(2)
    add = pb.SessionRequest(request_id=1)
    for i in range(3):
        a = add.add.add(sequence_id=i, params=pb.SamplingParams(seed=i, temperature=0.7))
        a.prompt_token_ids.extend(rng.randrange(16) for _ in range(4))
    add.fork.add(parent_id=0, child_ids=[7, 8])
    add.step.logits.CopyFrom(logits(5, 16, rng=rng))
    add.step.sequence_ids.extend([0, 1, 2, 7, 8])
    write("request", "session_add_fork_step", b"\x01" + add.SerializeToString())
    bad = pb.SessionRequest(request_id=2, release=[5])
    write("request", "session_release_unknown", b"\x01" + bad.SerializeToString())
    bad = pb.SessionRequest(request_id=3)
    bad.add.add(sequence_id=1, params=pb.SamplingParams(n=2))
    write("request", "session_add_n2", b"\x01" + bad.SerializeToString())
    step = pb.SessionRequest(request_id=4)
    step.add.add(sequence_id=4, params=pb.SamplingParams(max_tokens=1, logprobs=2))
    step.step.logits.CopyFrom(logits(1, 32, pb.DTYPE_BFLOAT16, rng))
    step.step.sequence_ids.append(4)
    write("request", "session_step_bf16", b"\x01" + step.SerializeToString())


def probs(rows, vocab, dtype=pb.DTYPE_FLOAT32, rng=None, tokens=()):
    """Draft probabilities: a random distribution per row, rows[j] giving tokens[j] mass."""
    rng = rng or random.Random(0)
    values = []
    for j in range(rows):
        row = [rng.random() ** 4 for _ in range(vocab)]
        if j < len(tokens):
            row[tokens[j]] += 0.5
        total = sum(row)
        values.extend(v / total for v in row)
    out = pb.Logits(dtype=dtype, rows=rows, vocab_size=vocab)
    if dtype == pb.DTYPE_FLOAT32:
        out.data = struct.pack(f"<{len(values)}f", *values)
    elif dtype == pb.DTYPE_BFLOAT16:
        out.data = b"".join(struct.pack("<f", v)[2:] for v in values)
    else:
        out.data = struct.pack(f"<{len(values)}e", *values)
    return out


def verify_seeds():
    """VerifyRequests (first byte 3): chains and trees, with and without draft_probs, greedy and
    sampled, and a few invalid ones (a cycle, a forward reference, a row-count mismatch)."""
    rng = random.Random(3)
    cases = [
        # name, vocab, drafts, parents, probs dtype (None: point masses), params
        ("chain_point", 16, [3, 5, 7], [], None, pb.SamplingParams(temperature=0.8, seed=1)),
        ("chain_q_f32", 32, [1, 2, 3, 4], [], pb.DTYPE_FLOAT32,
         pb.SamplingParams(temperature=1.0, top_p=0.9, seed=2, logprobs=2)),
        ("chain_q_bf16_penalties", 64, [9, 9, 9], [], pb.DTYPE_BFLOAT16,
         pb.SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, seed=3,
                           logprobs=1, logprobs_mode=pb.PROCESSED_LOGPROBS)),
        ("chain_greedy_stop", 16, [2, 4, 6, 8], [], None,
         pb.SamplingParams(temperature=0.0, stop_token_ids=[4], max_tokens=10)),
        ("tree_q_fp16", 32, [1, 2, 3, 4, 5], [-1, -1, 0, 0, 2], pb.DTYPE_FLOAT16,
         pb.SamplingParams(temperature=0.7, top_k=8, seed=5)),
        ("tree_greedy", 16, [0, 1, 2, 3], [-1, -1, 1, 1], None,
         pb.SamplingParams(temperature=0.0, logprobs=3)),
        ("no_drafts_mirostat", 16, [], [], None, pb.SamplingParams(mirostat_mode=2, seed=6)),
        ("bad_cycle", 16, [1, 2, 3], [1, 0, -1], None, pb.SamplingParams(seed=7)),
        ("bad_forward", 16, [1, 2, 3], [-1, 2, 0], None, pb.SamplingParams(seed=8)),
    ]
    for name, vocab, drafts, parents, dtype, params in cases:
        request = pb.VerifyRequest(logits=logits(len(drafts) + 1, vocab, rng=rng))
        row = request.rows.add(params=params, draft_token_ids=drafts, draft_parents=parents)
        row.prompt_token_ids.extend(rng.randrange(vocab) for _ in range(4))
        row.output_token_ids.extend(rng.randrange(vocab) for _ in range(2))
        if dtype is not None:
            row.draft_probs.CopyFrom(probs(len(drafts), vocab, dtype, rng, drafts))
        write("request", f"verify_{name}", b"\x03" + request.SerializeToString())
    request = pb.VerifyRequest(logits=logits(2, 8, rng=rng))
    request.rows.add(draft_token_ids=[1, 2])
    write("request", "verify_bad_rows", b"\x03" + request.SerializeToString())


def program_seeds(target, count):
    rng = random.Random(len(target))  # fixed per target
    for i in range(count):
        length = [8, 32, 64, 128, 256, 512][i % 6]
        write(target, f"random_{i:02d}", bytes(rng.randrange(256) for _ in range(length)))
    write(target, "zeros_64", bytes(64))


if __name__ == "__main__":
    sample_seeds()
    session_seeds()
    program_seeds("pipeline", 24)
    program_seeds("session", 24)
    verify_seeds()
    program_seeds("verify", 30)
    program_seeds("beam", 30)
