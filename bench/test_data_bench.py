"""Tokenising micro-benchmark: the Alpaca pipeline's tokenisation of a large synthetic set.

Times `ftcore.inputs.token_rows.tokenize_records` (Alpaca prompt formatting, two batched tokenizer calls,
truncation and prompt masking) on N generated Alpaca-format records with the tiny preset's
tokenizer, in this process (no model involved). Record generation and tokenizer loading are not
timed. TOKENIZERS_PARALLELISM=false, as in every ftcore process (ftcore.run.backend_process.OFFLINE_ENV).
extra_info: records_per_s and tokens_per_s (tokens of the returned rows, i.e. prompt + response
+ EOS after truncation to max_seq_len), from the median round.
"""

from __future__ import annotations

import statistics
import time

MAX_SEQ_LEN = 256
TOKENIZE_ROUNDS, TOKENIZE_WARMUP = 5, 1  # unless --bench-rounds / --bench-warmup-rounds say


def test_tokenize_alpaca(benchmark, bench_opts, tokenize_n, tiny_model_dir, monkeypatch):
    from ftcore.inputs.synthetic import synthetic_records
    from ftcore.inputs.token_rows import tokenize_records
    from ftcore.inputs.tokenizer import load_tokenizer

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    n, preset = tokenize_n, "tiny"
    records = synthetic_records(n, seed=1)
    tok = load_tokenizer(tiny_model_dir)
    durations: list[float] = []
    first: list = []  # the first round's output; later rounds must match it
    deterministic = []

    def one_round() -> None:
        t0 = time.perf_counter()
        out = tokenize_records(records, tok, MAX_SEQ_LEN, mask_prompt=True)
        durations.append(time.perf_counter() - t0)
        if first:
            deterministic.append(out.ids == first[0].ids and out.labels == first[0].labels)
        else:
            first.append(out)

    benchmark.group = f"tokenize {preset} {n} records"
    rounds = bench_opts.rounds or TOKENIZE_ROUNDS
    warmup = TOKENIZE_WARMUP if bench_opts.warmup_rounds is None else bench_opts.warmup_rounds
    benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=warmup, iterations=1)

    timed = durations[warmup:] if benchmark.enabled else durations
    out = first[0]
    tokens = sum(len(ids) for ids in out.ids)
    median = statistics.median(timed)
    benchmark.extra_info.update({
        "records": n,
        "kept_records": len(out.ids),
        "dropped_records": out.dropped,
        "tokens": tokens,
        "max_seq_len": MAX_SEQ_LEN,
        "tokenizer": f"{type(tok).__name__} ({preset} preset, vocab {len(tok)})",
        "seconds_median": median,
        "records_per_s": n / median,
        "tokens_per_s": tokens / median,
        "rounds": len(timed),
    })
    assert len(out.ids) + out.dropped == n
    assert tokens > n  # every kept record has several tokens
    assert all(deterministic), "tokenisation is not deterministic across rounds"
