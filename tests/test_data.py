"""Data pipeline: loading each format, prompt template, masking, truncation, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from ftcore.config import Batching, RunConfig, UserError
from ftcore.inputs.batches import build_batches
from ftcore.inputs.loss_contract import IGNORE_INDEX, target_count
from ftcore.inputs.records import (
    PROMPT_NO_INPUT,
    PROMPT_WITH_INPUT,
    format_prompt,
    load_records,
    select_records,
)
from ftcore.inputs.synthetic import synthetic_records
from ftcore.inputs.token_rows import tokenize_records
from ftcore.inputs.tokenizer import load_tokenizer

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def test_prompt_with_and_without_input():
    with_input = format_prompt({"instruction": "Add.", "input": "2 + 3", "output": "5"})
    assert with_input == PROMPT_WITH_INPUT.format(instruction="Add.", input="2 + 3")
    assert "### Input:\n2 + 3\n\n### Response:\n" in with_input
    no_input = format_prompt({"instruction": "Say hi.", "input": "", "output": "hi"})
    assert no_input == PROMPT_NO_INPUT.format(instruction="Say hi.")
    assert "### Input" not in no_input and no_input.endswith("### Response:\n")


@pytest.mark.parametrize("fmt, name", [("json", "a.json"), ("jsonl", "a.jsonl"), ("jsonl", "A.JSONL"), ("json", "A.JSON"),
                                       ("hf", "alpaca_hf")])
def test_load_each_format(tmp_path, write_alpaca, alpaca_records, fmt, name):
    path = write_alpaca(tmp_path / name, alpaca_records, fmt)
    assert load_records(path) == [
        {"instruction": r["instruction"], "input": r["input"], "output": r["output"]} for r in alpaca_records
    ]


def test_missing_input_field_means_empty(tmp_path, write_alpaca):
    path = write_alpaca(tmp_path / "a.json", [{"instruction": "x", "output": "y"}])
    assert load_records(path) == [{"instruction": "x", "input": "", "output": "y"}]


def test_synthetic_is_deterministic_and_exact():
    """Every family's answer is exact; the built-in data draws from the held-out (fine-tuning)
    families only, whose instructions never occur in the pretraining families."""
    import re

    from ftcore.inputs.synthetic import ALL_FAMILIES, FINETUNE_FAMILIES, PRETRAIN_FAMILIES, WORDS

    a, b = synthetic_records(200, seed=3), synthetic_records(200, seed=3)
    assert a == b and a != synthetic_records(200, seed=4)
    rules = {  # instruction pattern -> the exact answer
        r"Write the word (\w+) backwards\.": lambda w: w[::-1],
        r"Write the word (\w+) in capital letters\.": str.upper,
        r"What is the first letter of the word (\w+)\?": lambda w: w[0],
        r"How many letters does the word (\w+) have\?": lambda w: str(len(w)),
        r"What is the last letter of the word (\w+)\?": lambda w: w[-1],
        r"Spell (\w+) in reverse\.": lambda w: w[::-1],
    }
    records = synthetic_records(600, seed=5, families=ALL_FAMILIES)
    checked = 0
    for r in records:
        for pattern, answer in rules.items():
            if m := re.fullmatch(pattern, r["instruction"]):
                assert m[1] in WORDS and r["output"] == answer(m[1]) and r["input"] == ""
                checked += 1
        if r["instruction"] == "Write the first word of the list.":
            assert r["output"] == r["input"].split()[0]
            checked += 1
        if m := re.fullmatch(r"Convert (\d+) (\w+) to (\w+)\.", r["instruction"]):
            factor = int(r["output"].split(" is ")[1].split()[0]) // int(m[1])
            assert factor in (100, 1000) and r["output"] == f"{m[1]} {m[2]} is {int(m[1]) * factor} {m[3]}."
            checked += 1
    assert checked == len(records)  # every record matched one family's rule
    held_out = {re.sub(r"\w+(?=[.?]$)|\b[a-z]+(?= in reverse)", "W", r["instruction"]) for r in a}
    pretrain = {re.sub(r"\w+(?=[.?]$)|\b[a-z]+(?= in reverse)", "W", r["instruction"])
                for r in synthetic_records(600, seed=5, families=PRETRAIN_FAMILIES)}  # fmt: skip
    assert not held_out & pretrain and len(FINETUNE_FAMILIES) == 2


def test_masking_marks_prompt_and_padding_only(tok):
    cfg = RunConfig(num_samples=8, eval_samples=2, batch_size=2, steps=4, max_seq_len=96, batching="padded")
    b = build_batches(cfg, tok)
    ids, labels, mask = b.train["input_ids"], b.train["labels"], b.train["attention_mask"]
    assert ids.shape == labels.shape == mask.shape == (4, 2, 96)
    for s in range(4):
        for r in range(2):
            n = int(mask[s, r].sum())
            assert (mask[s, r, :n] == 1).all() and (mask[s, r, n:] == 0).all()  # right padding
            assert (labels[s, r, n:] == IGNORE_INDEX).all()  # padding never a target
            target = labels[s, r, :n] != IGNORE_INDEX
            start = int(np.argmax(target))
            # ignored exactly up to the end of the prompt, then equal to the input ids
            assert not target[:start].any() and target[start:].all()
            np.testing.assert_array_equal(labels[s, r, start:n], ids[s, r, start:n])
            prompt = tok.decode(ids[s, r, :start], skip_special_tokens=True)
            assert prompt.endswith("### Response:\n")
            assert ids[s, r, n - 1] == tok.eos_token_id  # EOS appended to the response


def test_no_masking_keeps_prompt_in_loss(tok):
    cfg = RunConfig(num_samples=8, eval_samples=0, batch_size=2, steps=2, max_seq_len=96, mask_prompt=False)
    b = build_batches(cfg, tok)
    mask = b.train["attention_mask"].astype(bool)
    np.testing.assert_array_equal(b.train["labels"][mask], b.train["input_ids"][mask])


def test_truncation_to_max_len(tok):
    long = {"instruction": "Repeat.", "input": "", "output": " ".join(["apple"] * 200)}
    out = tokenize_records([long], tok, max_seq_len=48, mask_prompt=True)
    assert len(out.ids[0]) == 48 and len(out.labels[0]) == 48
    assert out.ids[0][-1] != tok.eos_token_id  # EOS cut off with the rest


def test_records_without_loss_tokens_are_dropped(tok):
    long_prompt = {"instruction": " ".join(["apple"] * 100), "input": "", "output": "x"}
    out = tokenize_records([long_prompt], tok, max_seq_len=48, mask_prompt=True)
    assert out.dropped == 1 and out.ids == []


def test_subset_split_and_batches_are_deterministic(tok):
    records = synthetic_records(300, seed=1)
    train1, eval1 = select_records(records, 50, 10, seed=5)
    train2, eval2 = select_records(records, 50, 10, seed=5)
    assert train1 == train2 and eval1 == eval2
    assert not {id(r) for r in train1} & {id(r) for r in eval1}
    assert select_records(records, 50, 10, seed=6)[0] != train1
    cfg = RunConfig(num_samples=32, eval_samples=8, batch_size=4, steps=10)
    a, b = build_batches(cfg, tok), build_batches(cfg, tok)
    assert a.fingerprint == b.fingerprint
    for k in a.train:
        np.testing.assert_array_equal(a.train[k], b.train[k])
    assert build_batches(cfg.replace(seed=1), tok).fingerprint != a.fingerprint


def test_batches_round_trip_through_npz(tok, tmp_path):
    b = build_batches(RunConfig(num_samples=8, eval_samples=5, batch_size=2, steps=3), tok)
    b.save(tmp_path / "b.npz")
    c = type(b).load(tmp_path / "b.npz")
    assert c.fingerprint == b.fingerprint and c.stats == b.stats and len(c.eval) == 3


@pytest.mark.parametrize("mode", list(Batching))
def test_batches_keep_their_mode_through_npz(tok, tmp_path, mode):
    b = build_batches(RunConfig(num_samples=8, eval_samples=2, batch_size=2, steps=3, batching=mode.value), tok)
    assert b.mode is mode and b.packed == (mode is Batching.PACKED) == ("position_ids" in b.train)
    b.save(tmp_path / "b.npz")
    c = type(b).load(tmp_path / "b.npz")
    assert c.mode is mode and c.row_keys == b.row_keys and c.fingerprint == b.fingerprint and c.steps == 3


def test_the_mode_not_the_arrays_says_what_a_step_feeds(tok):
    """A `longest` batch that happens to hold position_ids still feeds plain rows (no per-record mask)."""
    b = build_batches(RunConfig(num_samples=8, eval_samples=0, batch_size=2, steps=2, batching="longest"), tok)
    b.train["position_ids"] = np.zeros_like(b.train["input_ids"])
    assert not b.packed and sorted(b.step(0)) == ["attention_mask", "input_ids", "labels"]


def test_epochs_cycle_through_all_examples(tok):
    cfg = RunConfig(num_samples=4, eval_samples=0, batch_size=2, steps=6, batching="padded")  # 3 epochs
    rows = build_batches(cfg, tok).train["input_ids"].reshape(12, -1)
    for epoch in range(3):
        assert len({r.tobytes() for r in rows[4 * epoch : 4 * epoch + 4]}) == 4


def test_max_len_shorter_than_template(tok):
    with pytest.raises(UserError, match="shorter than the prompt template"):
        build_batches(RunConfig(max_seq_len=16), tok)


def test_subset_larger_than_data(tmp_path, write_alpaca, alpaca_records, tok):
    path = write_alpaca(tmp_path / "a.json", alpaca_records)
    with pytest.raises(UserError, match="only 40"):
        build_batches(RunConfig(data=str(path), num_samples=64, eval_samples=0), tok)


def test_answers_are_the_eval_records_prompts_and_exact_responses(tok, tmp_path):
    """Batches.answers: per eval record whose whole response fits, the prompt's tokens and the
    response's tokens + EOS, exactly as in the eval rows; saved and loaded with the batches and
    part of the fingerprint. A record cut by max_seq_len has no answer (it could never match)."""
    from ftcore.inputs.batches import Batches

    cfg = RunConfig(num_samples=8, eval_samples=6, batch_size=2, steps=2, max_seq_len=96)
    b = build_batches(cfg, tok)
    items = b.answer_items()
    assert len(items) == b.stats["answer_records"] == 6 and b.stats["eos_id"] == tok.eos_token_id
    rows = [(e["input_ids"][i], e["attention_mask"][i]) for e in b.eval for i in range(len(e["input_ids"]))]
    for (prompt, answer), (ids, mask) in zip(items, rows, strict=True):
        n = int(mask.sum())
        assert prompt + answer == ids[:n].tolist() and answer[-1] == tok.eos_token_id
        assert tok.decode(prompt, skip_special_tokens=True).endswith("### Response:\n")
    b.save(tmp_path / "b.npz")
    again = Batches.load(tmp_path / "b.npz")
    assert again.answer_items() == items and again.fingerprint == b.fingerprint
    b.answers["answer_ids"][0, 0] += 1
    assert b.fingerprint != again.fingerprint
    # half the records too long for their response to fit: those rows lose their EOS, and no answer
    long = [{"instruction": f"Spell {w} in reverse.", "input": "", "output": "x " * 80} for w in "abcdefgh"]
    mixed = [r for pair in zip(synthetic_records(8, seed=2), long, strict=True) for r in pair]
    b = build_batches(cfg, tok, mixed)
    whole = [int(e["input_ids"][i][int(e["attention_mask"][i].sum()) - 1] == tok.eos_token_id)
             for e in b.eval for i in range(len(e["input_ids"]))]  # fmt: skip
    assert 0 < sum(whole) < len(whole) and b.stats["answer_records"] == sum(whole)


# ----------------------------------------------------------------------------- batching


def _varied_records(n: int, seed: int = 0) -> list[dict]:
    """Records of 1-8 built-in tasks each: token lengths from ~80 to ~180 with the tiny tokenizer,
    so `longest` batches take several widths."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        parts = synthetic_records(rng.randint(1, 8), seed=seed * 1000 + i)
        out.append({"instruction": "Answer each task in order, one answer per line.",
                    "input": "\n".join(p["instruction"] for p in parts),
                    "output": "\n".join(p["output"] for p in parts)})  # fmt: skip
    return out


def test_longest_batches_are_mlx_lm_iterate_batches(tok):
    """`longest` makes the batches mlx-lm's trainer makes from the same records and seed: the same
    records per batch in the same order, padded to the same width (loop=True: 3+ epochs). mlx-lm
    sorts by each record's whole length, truncating only when it pads a batch: records longer than
    --max-seq-len must keep their order by whole length, not tie at the limit."""
    pytest.importorskip("mlx_lm")
    from mlx_lm.tuner.trainer import iterate_batches

    cfg = RunConfig(num_samples=30, eval_samples=4, batch_size=4, steps=24, max_seq_len=120, batching="longest", seed=3,
                    mask_prompt=False)  # nothing dropped: every record keeps targets however long
    records = _varied_records(40)
    ours = build_batches(cfg, tok, records)
    train, _ = select_records(records, cfg.num_samples, cfg.eval_samples, cfg.seed)
    whole = tokenize_records(train, tok, 10_000, cfg.mask_prompt).ids  # untruncated, as mlx-lm's dataset
    assert ours.stats["dropped_records"] == 0 and sum(len(ids) > cfg.max_seq_len for ids in whole) >= 8
    theirs = iterate_batches([(ids, 0) for ids in whole], cfg.batch_size, cfg.max_seq_len, loop=True, seed=cfg.seed)
    widths = set()
    for s in range(cfg.steps):
        tokens, offsets_lengths = (np.array(a) for a in next(theirs))
        step = ours.step(s)
        assert step["input_ids"].shape == tokens.shape, s
        np.testing.assert_array_equal(step["attention_mask"].sum(1), offsets_lengths[:, 1])
        real = step["attention_mask"].astype(bool)  # mlx-lm pads with 0, ftcore with EOS
        np.testing.assert_array_equal(step["input_ids"][real], tokens[real])
        widths.add(tokens.shape[1])
    assert len(widths) >= 2 and ours.stats["distinct_widths"] == len(set(ours.train["widths"].tolist()))


def test_longest_pads_each_batch_to_a_multiple_of_32_plus_one(tok):
    cfg = RunConfig(num_samples=30, eval_samples=6, batch_size=4, steps=7, max_seq_len=160, batching="longest")
    b = build_batches(cfg, tok, _varied_records(40))
    for s in range(cfg.steps):
        step = b.step(s)
        longest = int(step["attention_mask"].sum(1).max())
        assert step["input_ids"].shape[1] == min(1 + 32 * -(-longest // 32), 160)
        assert (step["labels"][step["attention_mask"] == 0] == IGNORE_INDEX).all()
    for e in b.eval:
        assert e["input_ids"].shape[1] == min(1 + 32 * -(-int(e["attention_mask"].sum(1).max()) // 32), 160)
    # every position fed is counted once: padded = sum of width x rows, real = the mask's sum
    t = b.step_tokens()
    assert t["fed"] == int(b.train["widths"].sum()) * 4 and t["real"] == int(b.train["attention_mask"].sum())
    assert b.stats["padding_share"] == pytest.approx(1 - t["real"] / t["fed"]) and b.stats["fed_tokens"] == t["fed"]
    assert b.stats["steps_per_epoch"] == -(-30 // 4)  # a whole pass ends with a short batch


def test_longest_wastes_less_than_padded_on_varied_lengths(tok):
    """The point of `longest`: on records of varied length most positions are real tokens."""
    kw = dict(num_samples=30, eval_samples=4, batch_size=4, steps=14, max_seq_len=256)
    records = _varied_records(40)
    padded = build_batches(RunConfig(**kw, batching="padded"), tok, records).stats["padding_share"]
    longest = build_batches(RunConfig(**kw, batching="longest"), tok, records).stats["padding_share"]
    assert longest < 0.5 * padded, (longest, padded)


def test_alpaca_length_profile_follows_alpaca_s_percentiles(tok):
    """`--data builtin:alpaca-lengths`: token lengths (this tokenizer, prompt + response + EOS)
    within 15% of Stanford Alpaca's 50th / 90th / 99th percentiles; answers exact; deterministic."""
    from ftcore.inputs import length_profile

    def tokens(r):
        return len(tok(format_prompt(r) + r["output"])["input_ids"]) + 1

    records = length_profile.alpaca_length_records(tokens, 2000, seed=0)
    lengths = [len(ids) for ids in tokenize_records(records, tok, 4096, mask_prompt=True).ids]
    for q, want in ((50, 150), (90, 425), (99, 594)):
        got = np.percentile(lengths, q)
        assert abs(got - want) <= 0.15 * want, (q, got, want)
    assert np.percentile(lengths, 10) <= 50  # Alpaca's 36; one task in the template is ~42 here
    assert records == length_profile.alpaca_length_records(tokens, 2000, seed=0)
    r = records[0]
    assert len(r["input"].splitlines()) == len(r["output"].splitlines())  # one answer per task
    cfg = RunConfig(data=length_profile.NAME, num_samples=64, eval_samples=8, batch_size=4, steps=4, max_seq_len=512)
    assert build_batches(cfg, tok).stats["train_records"] == 64


def _trained_records(b, steps) -> list[tuple[int, ...]]:
    """Every record a range of steps trains on, once per occurrence (rows without targets skipped)."""
    fed = []
    for s in steps:
        step = b.step(s)
        for ids, labels, mask, pos in zip(step["input_ids"], step["labels"], step["attention_mask"],
                                          step.get("position_ids", step["attention_mask"] * 0 + 1), strict=True):
            if not (labels[1:] != IGNORE_INDEX).any():
                continue
            starts = np.flatnonzero((pos == 0) & (mask == 1)).tolist() if "position_ids" in step else [0]
            starts.append(int(mask.sum()))
            fed += [tuple(ids[a:z].tolist()) for a, z in zip(starts, starts[1:], strict=False)]
    return fed


@pytest.mark.parametrize(("batching", "batch"), [("longest", 4), ("packed", 3)])  # neither divides evenly
def test_epochs_train_every_record_once_per_epoch(tok, batching, batch):
    """--epochs N: each epoch trains every record exactly once. A pass that does not divide into
    batches ends with a short batch whose missing rows are copies of its own rows with no targets
    (filler rows); they are not counted as real tokens."""
    from ftcore.run.preflight import check_run

    records = _varied_records(40)
    kw = dict(num_samples=30, eval_samples=4, batch_size=batch, max_seq_len=256, epochs=2, batching=batching)
    b = build_batches(RunConfig(**kw), tok, records)
    train, _ = select_records(records, 30, 4, 0)
    every = sorted(tuple(ids) for ids in tokenize_records(train, tok, 256, mask_prompt=True).ids)
    units = 30 if batching == "longest" else b.stats["packed_rows"]
    per_epoch = b.stats["steps_per_epoch"]
    assert per_epoch == -(-units // batch) and units % batch and len(b.train["widths"]) == 2 * per_epoch
    for epoch in range(2):
        assert sorted(_trained_records(b, range(epoch * per_epoch, (epoch + 1) * per_epoch))) == every
    labels = b.train["labels"]
    filler = ~(labels[..., 1:] != IGNORE_INDEX).any(-1)  # (steps, batch)
    assert filler.sum() == b.stats["filler_rows"] == 2 * (batch - units % batch)
    for s, r in zip(*np.nonzero(filler), strict=True):  # a copy of a trained row of its own batch
        own = [b.train["input_ids"][s, k] for k in range(batch) if not filler[s, k]]
        assert any((row == b.train["input_ids"][s, r]).all() for row in own)
    real = int((b.train["attention_mask"] * ~filler[..., None]).sum())
    assert b.step_tokens()["real"] == real < int(b.train["attention_mask"].sum())
    prep = check_run(RunConfig(**kw, preset="tiny", data=None))
    assert prep.cfg.steps == len(prep.batches.train["widths"]) == 2 * prep.batches.stats["steps_per_epoch"]


@pytest.mark.parametrize("batching", ["padded", "longest"])
def test_preflight_runs_the_steps_build_batches_resolved_for_epochs(batching):
    """--epochs: build_batches resolves the steps (Batches.steps) and the run's config takes them
    from there, not from its own arithmetic (`padded` ceil(3 x n / 4), `longest` 3 x ceil(n / 4))."""
    from ftcore.inputs.batching import epoch_steps
    from ftcore.run.preflight import check_run

    cfg = RunConfig(preset="tiny", num_samples=30, eval_samples=0, batch_size=4, epochs=3, batching=batching)
    prep = check_run(cfg)
    n = prep.batches.stats["train_records"]
    assert prep.cfg.steps == prep.batches.steps == epoch_steps(3, n, 4, Batching(batching)) != cfg.steps
    assert prep.batches.steps == {"padded": -(-3 * n // 4), "longest": 3 * -(-n // 4)}[batching]


def test_steps_keep_mlx_lm_s_passes_without_a_short_batch(tok):
    """--steps with `longest`: mlx-lm's loop, a remainder smaller than a batch left out of every
    pass (no filler rows); `padded` with --epochs runs on into the next epoch (ceil(N x n / batch))."""
    records = _varied_records(40)
    kw = dict(num_samples=30, eval_samples=4, batch_size=4, max_seq_len=256)
    b = build_batches(RunConfig(**kw, steps=14, batching="longest"), tok, records)
    assert b.stats["filler_rows"] == 0 and len(set(_trained_records(b, range(14)))) == 28
    assert len(build_batches(RunConfig(**kw, epochs=2, batching="padded"), tok, records).train["widths"]) == 15


@pytest.mark.parametrize("framework", ["torch", "mlx"])
def test_filler_rows_change_neither_loss_nor_count(tok, tiny_model_dir, tmp_path, framework):
    """A short batch's filler rows: the loss sum and target count of the whole (batch, width) step
    equal those of its real rows alone, in each framework's loss (ftcore.{torch,mlx}.loss)."""
    records = _varied_records(40)
    b = build_batches(RunConfig(num_samples=30, eval_samples=0, batch_size=4, max_seq_len=256, epochs=1,
                                batching="longest"), tok, records)
    s = next(s for s in range(b.train["widths"].size) if not (b.step(s)["labels"][-1, 1:] != IGNORE_INDEX).any())
    step = b.step(s)
    real = int((step["labels"][:, 1:] != IGNORE_INDEX).any(-1).sum())
    if framework == "torch":
        import torch
        from transformers import AutoModelForCausalLM

        from ftcore.torch.loss import loss_sum_count

        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)

        def run(batch):
            with torch.no_grad():
                total, count = loss_sum_count(model, {k: torch.from_numpy(v) for k, v in batch.items()}, b.packed)
            return float(total), int(count)
    else:
        import mlx.core as mx

        from ftcore.mlx.convert import convert_hf_to_mlx
        from ftcore.mlx.loss import loss_sum_count
        from ftcore.mlx.model import load_model

        model, _ = load_model(convert_hf_to_mlx(tiny_model_dir, tmp_path / "mlx"))

        def run(batch):
            total, count = loss_sum_count(model, {k: mx.array(v) for k, v in batch.items()}, b.packed)
            return float(total), int(count)

    whole, alone = run(step), run({k: v[:real] for k, v in step.items()})
    assert whole[1] == alone[1] > 0 and whole[0] == pytest.approx(alone[0], rel=1e-6)


def test_mlx_lm_counts_no_target_in_a_filler_row(tok):
    """mlx-lm's default_loss takes targets from (offset, length): a filler row must give none."""
    pytest.importorskip("mlx_lm")
    from ftcore.backends.mlx_lm import mlx_lm_target_count

    b = build_batches(RunConfig(num_samples=30, eval_samples=0, batch_size=4, max_seq_len=256, epochs=1,
                                batching="longest"), tok, _varied_records(40))
    for s in range(b.train["widths"].size):
        step = b.step(s)
        real = int((step["labels"][:, 1:] != IGNORE_INDEX).any(-1).sum())
        assert mlx_lm_target_count(step) == mlx_lm_target_count({k: v[:real] for k, v in step.items()})


def test_packed_rows_hold_every_record_once_per_epoch(tok):
    """`packed`: each record is fed whole and contiguous, in rows of at most --max-seq-len tokens
    with positions restarting at 0 per record; eval rows hold the same loss targets as unpacked
    eval batches; fewer padded positions than `longest`."""
    records = _varied_records(40)
    kw = dict(num_samples=30, eval_samples=6, batch_size=2, max_seq_len=256, epochs=2)
    b = build_batches(RunConfig(**kw, batching="packed"), tok, records)
    assert b.stats["packed_rows"] < 30
    for s in range(len(b.train["widths"])):
        step = b.step(s)
        assert step["input_ids"].shape[1] <= 256
        for pos, mask in zip(step["position_ids"], step["attention_mask"], strict=True):
            starts = np.flatnonzero((pos == 0) & (mask == 1))
            assert (np.diff(pos[: int(mask.sum())]) != 1).sum() == len(starts) - 1  # contiguous records
    unpacked = build_batches(RunConfig(**kw, batching="longest"), tok, records)
    # eval records are packed too (the same mode as training), with the same loss targets
    assert all("position_ids" in e for e in b.eval) and len(b.eval) < len(unpacked.eval)
    assert sum(target_count(e["labels"]) for e in b.eval) == sum(target_count(e["labels"]) for e in unpacked.eval)
    assert b.stats["padding_share"] < unpacked.stats["padding_share"]


def test_mlx_lm_refuses_packed_rows_up_front(tmp_path):
    """mlx-lm's trainer builds its own masks from one record per row: `packed` is refused before
    anything runs, by its BackendSpec (takes_packed_rows), with one error line."""
    pytest.importorskip("mlx_lm")
    from helpers import ftcore_in_process

    r = ftcore_in_process("compare", "--backends", "torch,mlx-lm", "--batching", "packed", "--preset", "tiny",
                          "--out", tmp_path / "out")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: --batching packed: the mlx-lm backend"), r.stderr
    assert not (tmp_path / "out").exists()


def _records(n_long: int, n_short: int, empty: int = 0) -> list[dict[str, str]]:
    long = {"instruction": " ".join(["apple"] * 40), "input": "", "output": "pear"}
    short = {"instruction": "Say pear.", "input": "", "output": "pear"}
    blank = {"instruction": "   ", "input": "", "output": "pear"}
    return [dict(long) for _ in range(n_long)] + [dict(short) for _ in range(n_short)] + [dict(blank) for _ in range(empty)]


def test_dropped_records_are_said_counted_and_the_fix_named(tok):
    """Records whose answer never fits were dropped without a word while the config still said
    --num-samples: one line with the count, the --max-seq-len that keeps them all, and the counts."""
    cfg = RunConfig(num_samples=12, eval_samples=4, batch_size=2, steps=2, max_seq_len=48)
    b = build_batches(cfg, tok, _records(8, 8))
    dropped = b.stats["dropped_records"]
    assert dropped > 0 and b.stats["train_records"] + b.stats["eval_records"] + dropped == 16
    said = b.stats["data_warnings"]
    assert len(said) == 1 and said[0].startswith(f"{dropped} of 16 records dropped (") and "--max-seq-len 48;" in said[0]
    keeps = int(said[0].rsplit("--max-seq-len ", 1)[1].split()[0])
    assert build_batches(cfg.replace(max_seq_len=keeps), tok, _records(8, 8)).stats["dropped_records"] == 0
    assert build_batches(cfg.replace(max_seq_len=keeps - 1), tok, _records(8, 8)).stats["dropped_records"] > 0


def test_an_eval_set_left_empty_is_refused(tok):
    cfg = RunConfig(num_samples=4, eval_samples=2, batch_size=2, steps=2, max_seq_len=48)
    with pytest.raises(UserError, match=r"--eval-samples 2: all 2 eval records are dropped .* --max-seq-len \d+ keeps them, or --eval-samples 0"):
        build_batches(cfg, tok, _records(6, 0))


def test_prompt_only_and_blank_records_are_said(tok):
    cfg = RunConfig(num_samples=8, eval_samples=2, batch_size=2, steps=2, max_seq_len=48, mask_prompt=False)
    b = build_batches(cfg, tok, _records(5, 3, empty=2))
    said = " | ".join(b.stats["data_warnings"])
    assert b.stats["prompt_only_records"] > 0
    assert f"{b.stats['prompt_only_records']} training records train on prompt text only" in said
    assert "2 of 10 records have an empty or whitespace-only instruction or answer" in said
    quiet = build_batches(cfg.replace(max_seq_len=128, mask_prompt=True), tok, _records(0, 10))
    assert quiet.stats["data_warnings"] == []


def test_preflight_says_the_data_warnings_once_and_results_record_the_counts(tmp_path, write_alpaca, capsys):
    from ftcore.run.preflight import check_run

    path = write_alpaca(tmp_path / "d.json", _records(8, 8))
    cfg = RunConfig(preset="tiny", data=str(path), num_samples=12, eval_samples=4, batch_size=2, steps=2, max_seq_len=48)
    prep = check_run(cfg)
    err = capsys.readouterr().err
    assert err.count("warning: ") == 1 and "records dropped (" in err, err
    assert prep.batches.stats["train_records"] < 12  # what ran, beside the config's 12


def test_the_fingerprint_sees_the_batching_mode_and_the_positions(tok):
    """Rows too long to share: each packed row holds one record, so `packed` feeds the tokens
    `longest` does; the fingerprint still tells the runs apart, and sees position_ids."""
    long = [{"instruction": f"Spell {w} backwards, then once more in capitals.", "input": "", "output": w[::-1] * 3}
            for w in ("candle", "forest", "window", "garden", "silver", "planet", "bottle", "marble")]
    cfg = RunConfig(num_samples=6, eval_samples=2, batch_size=2, steps=3, max_seq_len=64, batching="longest")
    a = build_batches(cfg, tok, long)
    b = build_batches(cfg.replace(batching="packed"), tok, long)
    assert b.stats["packed_rows"] == b.stats["train_records"]  # one record a row
    assert a.fingerprint != b.fingerprint
    import dataclasses

    relabelled = dataclasses.replace(a, mode=Batching.PADDED)  # same arrays, other mode
    assert relabelled.fingerprint != a.fingerprint
    moved = build_batches(cfg.replace(batching="packed"), tok, long)
    moved.train["position_ids"] = moved.train["position_ids"] + 1
    assert moved.fingerprint != b.fingerprint


@pytest.mark.parametrize("flags, said", [({"steps": 100_000}, "--steps 100000: the training batches would take up to 585.9 GiB"),
                                         ({"epochs": 100_000}, "--epochs 100000 (100000 steps): the training batches would take up to 585.9 GiB")])
def test_batches_that_cannot_fit_in_memory_are_refused_before_any_is_made(tok, flags, said):
    """--steps 10000000 once allocated 19 GiB and died (here: 100,000 steps x 64 x 4096 x 3 int64)."""
    with pytest.raises(UserError, match="more than half of this machine's available memory") as e:
        build_batches(RunConfig(num_samples=64, eval_samples=4, batch_size=64, max_seq_len=4096, **flags), tok)
    assert str(e.value).startswith(said)


@pytest.mark.parametrize("flags, said", [
    ({"steps": 100_001}, "--steps 100001: at most 100000 steps: every step's batch is made and written to the run "
                         "folder before the first step"),
    ({"steps": 10**9}, "--steps 1000000000: at most 100000 steps"),
    ({"epochs": 6251}, "--epochs 6251 (100016 steps): at most 100000 steps"),  # 64 records, 4 a batch
    ({"epochs": 10**400}, f"--epochs {10**400} ({16 * 10**400} steps): at most 100000 steps"),
    ({"epochs": 10**400, "batching": "padded"}, f"--epochs {10**400} ({16 * 10**400} steps): at most 100000 steps"),
])
def test_more_steps_than_ftcore_runs_are_refused_before_any_batch_is_made(tok, flags, said):
    """--steps 200000 built batches for 30 s, wrote 1.2 GiB and said nothing for an hour;
    --epochs 1e400 overflowed a float (an internal error: in the GiB figure, and for `padded` in
    the epoch's steps)."""
    with pytest.raises(UserError) as e:
        build_batches(RunConfig(num_samples=64, eval_samples=4, batch_size=4, **flags), tok)
    assert str(e.value).startswith(said) and str(e.value).endswith("; run fewer steps or epochs"), str(e.value)


def test_epoch_steps_are_exact_integers():
    from ftcore.inputs.batching import epoch_steps

    assert epoch_steps(3, 10, 4, "padded") == 8  # ceil(30 / 4): runs on into the next pass
    assert epoch_steps(3, 10, 4, "longest") == 9  # 2 whole batches and a short one a pass
    assert epoch_steps(10**30, 3, 3, "padded") == 10**30  # a float would round it
    assert epoch_steps(1, 3, 4, "packed") == 1
