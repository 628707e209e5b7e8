"""Presets materialised offline and reused; local HF folders checked and loaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import broken_model

from ftcore.config import RunConfig, UserError
from ftcore.inputs.arch import read_arch
from ftcore.inputs.batches import build_batches
from ftcore.inputs.presets import (
    PRESET_CONFIGS,
    check_model_dir,
    materialize_preset,
    preset_config,
)
from ftcore.inputs.tokenizer import load_tokenizer

pytestmark = pytest.mark.unit


def test_tiny_preset_has_tinyllama_structure(tiny_model_dir):
    arch = read_arch(tiny_model_dir)
    assert arch["architectures"] == ["LlamaForCausalLM"]
    assert arch["num_key_value_heads"] < arch["num_attention_heads"]  # GQA
    assert arch["tie_word_embeddings"] is False
    assert arch["rope_theta"] == 10000.0 and arch["rms_norm_eps"] == 1e-5
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer.model"):
        assert (tiny_model_dir / f).is_file()


def test_tinyllama_preset_is_the_real_architecture():
    a = preset_config("tinyllama-1.1b")
    assert (a["vocab_size"], a["hidden_size"], a["intermediate_size"]) == (32000, 2048, 5632)
    assert (a["num_hidden_layers"], a["num_attention_heads"], a["num_key_value_heads"]) == (22, 32, 4)
    assert a["rope_theta"] == 10000.0 and a["rms_norm_eps"] == 1e-5
    assert preset_config("tinyllama-1.1b", 4)["num_hidden_layers"] == 4
    with pytest.raises(UserError, match="only 22 layers"):
        preset_config("tinyllama-1.1b", 23)
    assert PRESET_CONFIGS["tinyllama-1.1b"]["num_hidden_layers"] == 22  # not mutated


def test_preset_reused_from_cache(tiny_model_dir):
    before = {p.name: p.stat().st_mtime_ns for p in tiny_model_dir.iterdir()}
    assert materialize_preset("tiny") == tiny_model_dir
    assert {p.name: p.stat().st_mtime_ns for p in tiny_model_dir.iterdir()} == before


def test_preset_is_deterministic_and_truncatable(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    again = materialize_preset("tiny", root=tmp_path / "a")  # same preset, a fresh cache
    a, b = load_file(tiny_model_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # same vocabulary (the .model bytes also hold the trainer's temp input path)
    assert load_tokenizer(again).get_vocab() == load_tokenizer(tiny_model_dir).get_vocab()
    short = materialize_preset("tiny", num_layers=2, root=tmp_path / "b")
    assert read_arch(short)["num_hidden_layers"] == 2
    assert not any(k.startswith("model.layers.2.") for k in load_file(short / "model.safetensors"))
    assert not list(tmp_path.glob("*/models/.*"))  # no temp folder left behind


def test_sentencepiece_only_folder_loads_and_trains(sentencepiece_model_dir):
    tok = load_tokenizer(sentencepiece_model_dir)
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    ids = tok("### Response:\nelppa")["input_ids"]
    assert ids[0] == 1 and tok.decode(ids, skip_special_tokens=True) == "### Response:\nelppa"
    cfg = RunConfig(model=str(sentencepiece_model_dir), num_samples=8, eval_samples=2, batch_size=2, steps=2,
                    batching="padded")
    assert build_batches(cfg, tok).train["input_ids"].shape == (2, 2, cfg.max_seq_len)


def test_check_model_dir_refusals(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="model folder not found"):
        check_model_dir(tmp_path / "nope")
    with pytest.raises(UserError, match="no config.json"):
        check_model_dir(broken_model(tiny_model_dir, tmp_path, "no-config"))
    with pytest.raises(UserError, match="GPT2LMHeadModel model; ftcore supports Llama"):
        check_model_dir(broken_model(tiny_model_dir, tmp_path, "gpt2"))
    pickled = broken_model(tiny_model_dir, tmp_path, "pickle-only")
    with pytest.raises(UserError, match=r"only pickle weights \(pytorch_model.bin\).*--allow-pickle"):
        check_model_dir(pickled)
    assert check_model_dir(pickled, allow_pickle=True) == pickled
    assert check_model_dir(tiny_model_dir) == tiny_model_dir


def test_preset_fingerprint_follows_the_recipe(monkeypatch):
    """A changed pretraining recipe or architecture names a new cache folder: never served stale."""
    from ftcore.inputs import pretrain
    from ftcore.inputs.presets import preset_fingerprint

    arch = preset_config("tiny-pretrained")
    before = preset_fingerprint("tiny-pretrained", arch)
    assert preset_fingerprint("tiny-pretrained", arch) == before
    assert preset_fingerprint("tiny", arch) != before  # the random preset has no pretraining
    assert preset_fingerprint("tiny-pretrained", {**arch, "num_hidden_layers": 2}) != before
    monkeypatch.setitem(pretrain.PRETRAIN_RECIPE, "steps", pretrain.PRETRAIN_RECIPE["steps"] + 1)
    assert preset_fingerprint("tiny-pretrained", arch) != before


# ----------------------------------------------------------------------------- the shipped default


def _shipped():
    import json

    from ftcore.inputs.presets import SHIPPED_PRESETS

    folder = SHIPPED_PRESETS["tiny-pretrained"]
    return folder, json.loads((folder / "ftcore_preset.json").read_text())


def test_shipped_default_was_made_by_the_current_recipe():
    """The shipped weights' recorded fingerprint is this code's: a changed recipe, pretraining
    data, tokenizer corpus or training loop without rebuilt weights (`ftcore pretrain`) fails here."""
    from ftcore.inputs.presets import preset_fingerprint

    folder, made = _shipped()
    assert made["arch"] == preset_config("tiny-pretrained")
    assert made["fingerprint"] == preset_fingerprint("tiny-pretrained", made["arch"]), (
        "ftcore/presets/tiny-pretrained is stale: rebuild it with "
        "`ftcore pretrain --out ftcore/presets/tiny-pretrained --replace`"
    )
    assert made["pretraining"]["steps"] == made["pretraining"]["recipe"]["steps"]
    assert made["pretraining"]["last_loss"] < 0.1 * made["pretraining"]["first_loss"]
    check_model_dir(folder)  # every tensor present, shaped, finite; tokenizer fits


def test_default_preset_is_served_from_the_package(ftcore_cache, monkeypatch, capsys):
    """No pretraining on a user's machine: the default resolves to the shipped folder and writes
    nothing to the cache; with another recipe than the shipped one it is made locally instead."""
    from ftcore.inputs import pretrain
    from ftcore.inputs.presets import shipped_preset

    folder, made = _shipped()
    before = sorted((ftcore_cache / "models").glob("tiny-pretrained-*")) if (ftcore_cache / "models").exists() else []
    assert materialize_preset(RunConfig().preset) == folder
    after = sorted((ftcore_cache / "models").glob("tiny-pretrained-*")) if (ftcore_cache / "models").exists() else []
    assert after == before
    assert shipped_preset("tiny-pretrained", {**made["arch"], "num_hidden_layers": 2}) is None
    monkeypatch.setitem(pretrain.PRETRAIN_RECIPE, "steps", pretrain.PRETRAIN_RECIPE["steps"] + 1)
    assert shipped_preset("tiny-pretrained", made["arch"]) is None
    assert "making the preset locally" in capsys.readouterr().err


def test_shipped_default_knows_its_tasks_not_the_held_out_ones():
    """>= 80% exact match on every pretraining family, <= 20% on each held-out (fine-tune) family;
    the same shares as recorded when the weights were made (the same bytes on any machine)."""
    from transformers import LlamaForCausalLM

    from ftcore.inputs.pretrain import family_exact_match
    from ftcore.inputs.synthetic import FINETUNE_FAMILIES, PRETRAIN_FAMILIES

    folder, made = _shipped()
    model = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    shares = family_exact_match(model, load_tokenizer(folder))
    for family in PRETRAIN_FAMILIES:
        assert shares[family.__name__] >= 0.8, shares
    for family in FINETUNE_FAMILIES:
        assert shares[family.__name__] <= 0.2, shares
    assert shares == made["exact_match"]


def test_teacher_forced_exact_match_equals_greedy_decoding():
    """family_exact_match's shortcut (argmax at every answer position, fed the expected prefix)
    gives the same verdict per record as KV-cache greedy decoding until EOS."""
    import random

    from transformers import LlamaForCausalLM

    from ftcore.inputs.pretrain import family_exact_match
    from ftcore.inputs.records import format_prompt
    from ftcore.inputs.synthetic import ALL_FAMILIES
    from ftcore.torch.generate import greedy

    folder, _ = _shipped()
    tok = load_tokenizer(folder)
    model = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    forced = family_exact_match(model, tok, n_per_family=6)
    for family in ALL_FAMILIES:
        rng, right = random.Random(7), 0
        for _ in range(6):
            r = family(rng)
            prompt = tok(format_prompt(r))["input_ids"]
            answer = tok(format_prompt(r) + r["output"])["input_ids"][len(prompt):] + [tok.eos_token_id]
            right += greedy(model, prompt, len(answer), tok.eos_token_id) == answer
        assert forced[family.__name__] == round(right / 6, 4), family.__name__


def test_weights_checksum_is_the_files_bytes(tmp_path):
    """model_sha256 is sha256 over each weight file's name and bytes, in name order: computed
    here independently, and one flipped byte changes it."""
    import hashlib
    import shutil

    from ftcore.inputs.checkpoint import weights_sha256

    folder, _ = _shipped()
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.name.encode() + f.read_bytes())
    assert weights_sha256(folder) == h.hexdigest()
    copy = Path(shutil.copytree(folder, tmp_path / "copy"))
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(data))
    assert weights_sha256(copy) != weights_sha256(folder)


def test_waiting_on_another_maker_s_lock_is_said_once_with_its_pid(tmp_path, capsys):
    import fcntl
    import threading
    import time

    from ftcore.inputs.presets import wait_for_lock

    path = tmp_path / "x.lock"
    holder = open(path, "a+")  # noqa: SIM115 (held across the thread below)
    fcntl.flock(holder, fcntl.LOCK_EX)
    holder.write("4242")
    holder.flush()
    threading.Timer(0.5, lambda: (fcntl.flock(holder, fcntl.LOCK_UN), holder.close())).start()
    t0 = time.monotonic()
    with open(path, "a+") as mine:
        wait_for_lock(mine, "the tiny preset")
        assert time.monotonic() - t0 >= 0.4
        mine.seek(0)
        assert mine.read() == str(os.getpid())  # the next waiter is told who holds it now
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "ftcore: waiting for process 4242, which is making the tiny preset"
    assert err[1].startswith("ftcore: waited ") and len(err) == 2


def test_preset_training_code_ignores_where_its_helpers_live():
    """A moved or renamed helper module (an import line) keeps the preset's fingerprint; a changed
    line of the training loop does not."""
    from ftcore.inputs.pretrain import training_code

    def loop(n):
        from ftcore.inputs.loss_contract import IGNORE_INDEX

        return n * IGNORE_INDEX

    def moved(n):
        from ftcore.somewhere_else import IGNORE_INDEX

        return n * IGNORE_INDEX

    def changed(n):
        from ftcore.inputs.loss_contract import IGNORE_INDEX

        return n * IGNORE_INDEX + 1

    def strip(fn):  # without the def line, which names each
        return training_code(fn).split("\n", 1)[1]

    assert strip(loop) == strip(moved) != strip(changed)
