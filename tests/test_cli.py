"""The command line: --help everywhere; every bad input is one `error:` line, non-zero exit,
no traceback and no result file.

The refusals run through `cli.main` in this process (`ftcore_in_process`): they end before any
child starts, and an interpreter start-up per case would cost seconds each.
`test_the_real_command_line_refuses_the_same_way` proves the subprocess takes the same path."""

from __future__ import annotations

import pytest
from helpers import broken_model, ftcore, ftcore_in_process

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("command", ["run", "compare", "sweep", "convert", "profile", "pretrain"])
def test_help(command):
    out = ftcore_in_process(command, "--help")
    assert out.returncode == 0 and "--out" in out.stdout


def test_run_help_lists_every_run_flag():
    text = ftcore_in_process("run", "--help").stdout
    for flag in (
        "--model", "--preset", "--num-layers", "--data", "--num-samples", "--max-seq-len", "--batch-size",
        "--steps", "--epochs", "--batching", "--warmup-steps", "--lr", "--seed", "--lora-rank", "--lora-alpha", "--lora-targets",
        "--precision", "--device", "--eval-samples",
    ):  # fmt: skip
        assert flag in text, flag


def assert_user_error(out, needle, out_dir):
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert not (out_dir / "result.json").exists()


BAD_INPUTS = {
    "missing data path": (lambda t, m, w: ["--data", t / "nope.json"], "data path not found"),
    "malformed json": (lambda t, m, w: ["--data", _write(t / "bad.json", '[{"instruction": "x",')], "not valid JSON"),
    "malformed jsonl": (lambda t, m, w: ["--data", _write(t / "bad.jsonl", '{"instruction": "a", "output": "b"}\n{oops\n')], "line 2 is not valid JSON"),
    "record without instruction": (lambda t, m, w: ["--data", w(t / "a.json", [{"output": "y"}])], "record 0 has no string 'instruction'"),
    "record without output": (lambda t, m, w: ["--data", w(t / "a.jsonl", [{"instruction": "x", "output": "y"}, {"instruction": "x"}], "jsonl")], "record 1 has no string 'output'"),
    "empty dataset": (lambda t, m, w: ["--data", w(t / "a.json", [])], "the dataset is empty"),
    "subset larger than data": (lambda t, m, w: ["--data", w(t / "a.json", [{"instruction": "x", "output": "y"}] * 5)], "the data has only 5"),
    "max len below template": (lambda t, m, w: ["--max-seq-len", 12], "shorter than the prompt template"),
    "model without config.json": (lambda t, m, w: ["--model", broken_model(m, t, "no-config")], "no config.json"),
    "non-llama model": (lambda t, m, w: ["--model", broken_model(m, t, "gpt2")], "supports Llama-architecture models only"),
    "pickle-only weights": (lambda t, m, w: ["--model", broken_model(m, t, "pickle-only")], "only pickle weights"),
    "rank 0": (lambda t, m, w: ["--lora-rank", 0], "--lora-rank: rank must be >= 1"),
    "grad accum 0": (lambda t, m, w: ["--grad-accum", 0], "--grad-accum: must be >= 1, got 0"),
    "grad accum over ranks": (lambda t, m, w: ["--grad-accum", 2, "--nproc", 2], "--grad-accum: one process only"),
    "unknown target": (lambda t, m, w: ["--lora-targets", "q_proj,qkv"], "unknown target module 'qkv'"),
    "unknown flag": (lambda t, m, w: ["--lora-rnak", 4], "unrecognized arguments: --lora-rnak"),
    "target named twice": (lambda t, m, w: ["--lora-targets", "q_proj,q_proj"], "q_proj named twice"),
    "rows beyond the model's positions": (lambda t, m, w: ["--model", m, "--max-seq-len", 100000],
                                          "at most 2048 positions (max_position_embeddings"),
    # one batch a pass: 1 step, which the flags' defaults (1 timing warm-up, 2 LR warm-up steps)
    # outgrow; the line names the short epoch, not flags the user never set as if set wrongly
    "--epochs 1 of one batch": (lambda t, m, w: ["--data", w(t / "a.json", [{"instruction": f"Say {c}.", "output": c} for c in "abcdef"]),
                                                 "--num-samples", 4, "--eval-samples", 2, "--epochs", 1],
                                "--epochs 1: 4 training records at --batch-size 4 make 1 step, too few: the timing leaves "
                                "out the first 1 step as warm-up (--timing-warmup-steps 1), and the learning rate warms up "
                                "over 2 steps (--warmup-steps 2); use --epochs 2, more records (--num-samples) or a smaller --batch-size"),
    "more steps than ftcore runs": (lambda t, m, w: ["--steps", 10**9], "--steps 1000000000: at most 100000 steps"),
    "no micro-batch": (lambda t, m, w: ["--grad-accum", 0], "--grad-accum: must be >= 1, got 0"),
    "a step larger than the data": (lambda t, m, w: ["--num-samples", 8, "--batch-size", 4, "--grad-accum", 3],
                                    "a step of --batch-size 4 x --grad-accum 3 (12 rows) is larger than the training subset"),
    "accumulation over processes": (lambda t, m, w: ["--grad-accum", 2, "--nproc", 2], "--grad-accum: one process only"),
    "unknown fine-tune": (lambda t, m, w: ["--fine-tune", "qlora"], "invalid choice: 'qlora'"),
    "a bf16 full fine-tune": (lambda t, m, w: ["--fine-tune", "full", "--precision", "bf16"],
                              "--fine-tune: full trains in fp32 only"),
    "dora over processes": (lambda t, m, w: ["--fine-tune", "dora", "--nproc", 2], "--fine-tune: dora: one process only"),
    "epochs whose steps overflow a float": (lambda t, m, w: ["--epochs", 10**400], "steps): at most 100000 steps"),
}


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_clean_line(case, tmp_path, tiny_model_dir, write_alpaca):
    make_args, needle = BAD_INPUTS[case]
    out_dir = tmp_path / "out"
    args = ["run", "--backend", "torch", "--out", out_dir, *make_args(tmp_path, tiny_model_dir, write_alpaca)]
    assert_user_error(ftcore_in_process(*args), needle, out_dir)


@pytest.mark.parametrize("flags", [["--steps", 10**9], ["--epochs", 10**8]])
def test_compare_refuses_more_steps_than_ftcore_runs(flags, tmp_path):
    """Before any batch is made (--steps 200000 built for 30 s, then said nothing for an hour)."""
    out_dir = tmp_path / "out"
    assert_user_error(ftcore_in_process("compare", "--out", out_dir, *flags), "at most 100000 steps: every step's", out_dir)
    assert not out_dir.exists()


def test_compare_refuses_grad_accum_0(tmp_path):
    out_dir = tmp_path / "out"
    assert_user_error(ftcore_in_process("compare", "--out", out_dir, "--grad-accum", 0), "--grad-accum: must be >= 1",
                      out_dir)  # fmt: skip
    assert not out_dir.exists()


@pytest.mark.parametrize("case", ["missing data path", "unknown flag", "model without config.json"])
def test_the_real_command_line_refuses_the_same_way(case, tmp_path, tiny_model_dir, write_alpaca):
    """`python -m ftcore` in a fresh interpreter: the same one line, exit 2, nothing written."""
    make_args, needle = BAD_INPUTS[case]
    out_dir = tmp_path / "out"
    out = ftcore("run", "--backend", "torch", "--out", out_dir, *make_args(tmp_path, tiny_model_dir, write_alpaca))
    assert_user_error(out, needle, out_dir)


def test_compare_rejects_unknown_backend(tmp_path):
    out = ftcore_in_process("compare", "--backends", "torch,jax", "--out", tmp_path / "c")
    assert_user_error(out, "unknown backend(s) jax", tmp_path / "c")


def test_convert_writes_mlx_weights(tiny_model_dir, tmp_path):
    out = ftcore("convert", "--model", tiny_model_dir, "--out", tmp_path / "mlx")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "mlx" / "model.safetensors").is_file() and (tmp_path / "mlx" / "config.json").is_file()


def test_convert_refuses_a_non_llama_folder(tiny_model_dir, tmp_path):
    bad = broken_model(tiny_model_dir, tmp_path, "gpt2")
    out = ftcore_in_process("convert", "--model", bad, "--out", tmp_path / "mlx")
    assert_user_error(out, "GPT2LMHeadModel", tmp_path / "mlx")
    assert not (tmp_path / "mlx" / "model.safetensors").exists()


def test_convert_never_replaces_an_earlier_conversion_without_force(tiny_model_dir, tmp_path):
    out = tmp_path / "mlx"
    assert ftcore_in_process("convert", "--model", tiny_model_dir, "--out", out).returncode == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    refused = ftcore_in_process("convert", "--model", tiny_model_dir, "--out", out)
    assert refused.returncode == 2 and refused.stderr.startswith("error: --out") and "--force" in refused.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # untouched
    assert ftcore_in_process("convert", "--model", tiny_model_dir, "--out", out, "--force").returncode == 0


def test_pretrain_refuses_a_folder_that_holds_something(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    out = ftcore_in_process("pretrain", "--out", tmp_path)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"error: --out {tmp_path}: not an empty folder; pass --replace to rebuild it"
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def _peft_adapter(base, out):
    """A PEFT adapter (q_proj, v_proj, r 4, B non-zero) of the transformers model `base`, saved in out."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"]))
    peft.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory):
    """A PEFT adapter (q_proj, v_proj, r 4) for the tiny preset, B non-zero."""
    import torch
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    return _peft_adapter(base, tmp_path_factory.mktemp("adapter") / "adapter")


def _broken_adapter(src, dst, tensors=None, config=None):
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    if tensors:
        t = load_file(str(dst / "adapter_model.safetensors"))
        tensors(t)
        save_file(t, str(dst / "adapter_model.safetensors"))
    if config:
        c = json.loads((dst / "adapter_config.json").read_text())
        c.update(config)
        (dst / "adapter_config.json").write_text(json.dumps(c))
    return dst


def _nan(t):
    t[next(k for k in sorted(t) if "lora_B" in k)][0, 0] = float("nan")


def _exploded(t):  # what a diverged fine-tune (e.g. mlx at --lr 1e9) wrote: B ~ 1.5e9
    t[next(k for k in sorted(t) if "lora_B" in k)][0, 0] = 1.5e9


def _drop(t):
    del t[next(k for k in sorted(t) if "layers.1." in k and "v_proj.lora_A" in k)]


BROKEN_ADAPTERS = {
    "NaN weights": (dict(tensors=_nan), "holds NaN or Inf"),
    "alpha 1e30": (dict(config={"lora_alpha": 1e30}), "is not a usable scale"),
    "exploded weights": (dict(tensors=_exploded), "holds |w| = 1.5e+09 (> 10000); the fine-tune that wrote it diverged"),
    "a tensor missing": (dict(tensors=_drop), "lacks 1 LoRA tensor(s) its config names, e.g. model.layers.1.self_attn.v_proj.lora_A"),
}


@pytest.mark.parametrize("backend", ["torch", "mlx"])
@pytest.mark.parametrize("case", list(BROKEN_ADAPTERS))
def test_generate_refuses_a_broken_adapter(case, backend, tiny_model_dir, tiny_adapter, tmp_path):
    """Never exit 0 with an empty answer or the base model's answer presented as the fine-tune's."""
    edits, needle = BROKEN_ADAPTERS[case]
    adapter = _broken_adapter(tiny_adapter, tmp_path / "a", **edits)
    out = ftcore_in_process("generate", "--model", tiny_model_dir, "--adapter", adapter, "--backend", backend,
                            "--prompt", "Spell forest in reverse.")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and needle in lines[0], out.stderr
    ok = ftcore_in_process("generate", "--model", tiny_model_dir, "--adapter", tiny_adapter, "--backend", backend,
                           "--prompt", "Spell forest in reverse.")
    assert ok.returncode == 0, ok.stderr


def test_generate_refuses_a_prompt_beyond_the_model_s_positions(tiny_model_dir):
    out = ftcore_in_process("generate", "--model", tiny_model_dir, "--prompt", "candle " * 2100)
    assert out.returncode == 2 and "exceeds the model's 2048 positions" in out.stderr, out.stderr


def test_non_finite_logits_are_an_error_not_an_empty_answer():
    from ftcore.config import UserError
    from ftcore.run.generate_text import check_finite

    check_finite([0.0, 1.0], "torch")
    with pytest.raises(UserError, match="logits are NaN or Inf"):
        check_finite([0.0, float("inf")], "mlx")


def test_profile_refuses_data_parallel(tmp_path):
    out = ftcore_in_process("profile", "--backend", "torch", "--nproc", "2", "--out", tmp_path / "p")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "--nproc/--nnodes must be 1" in lines[0], out.stderr
    assert not (tmp_path / "p").exists()


def test_bench_diff_refuses_runs_too_short_for_the_lr_warmup():
    """Refused before any worktree or run starts, naming bench-diff's own flags (it once failed
    inside the first run with RunConfig's --warmup-steps message)."""
    out = ftcore_in_process("bench-diff", "HEAD", "HEAD", "--warmup-steps", "0", "--timed-steps", "1")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith("error: bench-diff: --warmup-steps 0 + --timed-steps 1 is 1 steps")


@pytest.mark.parametrize("args, said", [
    (["--runs", "3"], "--runs 3 can never be significant"),  # 2/C(6,3) = 0.1: no p below 0.05
    (["--threshold", "nan"], "--threshold must be a finite fraction >= 0, not nan"),
    (["--threshold", "-0.1"], "--threshold must be a finite fraction >= 0"),
    (["--json", "."], "--json .: is a folder; name a file to write"),
    (["--json", "no/such/dir/d.json"], "--json no/such/dir/d.json: its folder no/such/dir does not exist"),
])
def test_bench_diff_refuses_what_could_never_flag_a_case(args, said):
    out = ftcore_in_process("bench-diff", "HEAD", "HEAD", *args)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and said in lines[0], out.stderr
    assert ftcore_in_process("bench-diff", "HEAD", "HEAD", "--runs", "4", "--warmup-steps", "0",
                             "--timed-steps", "1").stderr.count("--timed-steps 1 is 1 steps") == 1  # 4 passes


@pytest.mark.parametrize("args, said", [
    (["--repeats", "0"], "--repeats: must be >= 1, not 0"),
    (["--time-budget-s", "inf"], "--time-budget-s: must be a finite number of seconds >= 0, not inf"),
    (["--time-budget-s", "-1"], "--time-budget-s: must be a finite number"),
])
def test_compare_refuses_a_bad_schedule_before_writing(args, said, tmp_path):
    out = ftcore_in_process("compare", *args, "--out", tmp_path / "c")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and said in lines[0], out.stderr
    assert not (tmp_path / "c").exists()


def test_a_damaged_cached_preset_is_refused_with_the_fix(tmp_path, monkeypatch):
    """A truncated weights file in a cached preset: one line that names the damage and the fix,
    before any backend starts; after deleting the folder the preset is made anew."""
    import shutil

    from ftcore.inputs.presets import materialize_preset

    monkeypatch.setenv("FTCORE_CACHE", str(tmp_path / "cache"))
    folder = materialize_preset("tiny")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    args = ["run", "--backend", "torch", "--preset", "tiny", "--steps", "2", "--num-samples", "8", "--eval-samples", "2"]
    out = ftcore_in_process(*args, "--out", tmp_path / "r")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "truncated" in lines[0], out.stderr
    assert f"delete {folder} and run again" in lines[0] and not (tmp_path / "r").exists()
    shutil.rmtree(folder)
    assert materialize_preset("tiny") == folder and (folder / "model.safetensors").stat().st_size > 0


def test_adapter_whose_config_and_weights_disagree_says_so_in_one_line(tiny_model_dir, tiny_adapter, tmp_path):
    """r 8 in adapter_config.json over rank-4 tensors: one line naming the tensor and both ranks,
    before any model loads (it used to be PEFT's multi-line 'size mismatch', joined)."""
    adapter = _broken_adapter(tiny_adapter, tmp_path / "a", config={"r": 8, "lora_alpha": 16})
    out = ftcore_in_process("generate", "--model", tiny_model_dir, "--adapter", adapter, "--backend", "torch",
                            "--prompt", "Spell forest in reverse.")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0] == (f"error: {adapter}: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight is (4, 128), "
                        "of rank 4, but its adapter_config.json says r 8; the folder's weights and config disagree")


@pytest.fixture(scope="module")
def tiny_l2_dir(ftcore_cache):
    """The tiny preset cut to its first 2 layers (of 4): the same shapes, fewer layers."""
    from ftcore.inputs.presets import materialize_preset

    return materialize_preset("tiny", 2)


def _other_adapter(which, tmp_path, tiny_l2_dir):
    """An adapter of a model other than the tiny preset: "narrower" (hidden 64, not 128),
    "shallower" (2 layers, not 4)."""
    import torch
    from helpers import TINY, make_hf_model
    from transformers import LlamaForCausalLM

    if which == "narrower":
        return _peft_adapter(make_hf_model(TINY, seed=0), tmp_path / "adapter")
    return _peft_adapter(LlamaForCausalLM.from_pretrained(str(tiny_l2_dir), dtype=torch.float32), tmp_path / "adapter")


@pytest.mark.parametrize("which", ["narrower", "shallower", "deeper"])
def test_an_adapter_of_another_model_is_named_so_not_partial(which, tiny_model_dir, tiny_l2_dir, tiny_adapter, tmp_path):
    """An adapter of another model is refused in one line that says it does not match the model
    (which tensor, found vs expected shape; or the layers), not that it is partial."""
    model, adapter = tiny_model_dir, tiny_adapter
    if which == "deeper":  # the tiny preset's (4 layers) on the 2-layer cut
        model = tiny_l2_dir
    else:
        adapter = _other_adapter(which, tmp_path, tiny_l2_dir)
    said = {
        "narrower": "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight is (4, 64), the model's "
                    "q_proj needs (4, 128); an adapter of another model",
        "shallower": "it holds LoRA tensors for 2 layers, the model has 4; an adapter of another model",
        "deeper": "it holds base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight (layer 2), the model "
                  "has 2 layers; an adapter of another model",
    }[which]
    out = ftcore_in_process("generate", "--model", model, "--adapter", adapter, "--prompt", "Spell forest in reverse.")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith(f"error: {adapter}: does not match {model}: {said}"), lines[0]
    assert "partial" not in lines[0]


@pytest.mark.parametrize("command", ["run", "compare", "pretrain", "convert"])
def test_out_below_a_file_is_one_line_naming_the_file(command, tmp_path, tiny_model_dir):
    """--out afile/run: not a bare "File exists: afile" (or a traceback), and nothing trains first."""
    afile = tmp_path / "afile"
    afile.write_text("mine")
    args = {"run": ["--backend", "torch"], "convert": ["--model", tiny_model_dir]}.get(command, [])
    out = ftcore_in_process(command, *args, "--out", afile / "run")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    what = "the conversion cannot be written below it" if command == "convert" else "choose an --out outside it"
    assert f"{afile / 'run'}: {afile} is a file, not a folder" in lines[0] and what in lines[0], lines[0]
    assert afile.read_text() == "mine"


@pytest.mark.parametrize("below", [False, True])
def test_a_cache_blocked_by_a_file_is_refused_before_training(below, tmp_path, monkeypatch):
    """FTCORE_CACHE at a file (or below one): one line naming it, before any backend starts (it
    used to train, then fail in the child with a bare FileExistsError)."""
    afile = tmp_path / "afile"
    afile.write_text("mine")
    cache = afile / "cache" if below else afile
    monkeypatch.setenv("FTCORE_CACHE", str(cache))
    out = ftcore_in_process("run", "--backend", "torch", "--steps", "2", "--out", tmp_path / "r")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    what = f"cannot be made: {afile} is a file" if below else "is a file"
    assert lines[0] == (f"error: FTCORE_CACHE {cache} {what}, not a folder; point FTCORE_CACHE at a folder "
                        "(it is made if missing)")
    assert not (tmp_path / "r").exists() and afile.read_text() == "mine"


def test_an_empty_home_is_taken_as_unset(monkeypatch):
    """HOME="" puts the cache where an unset HOME does (the user database's home), not at /.cache."""
    from pathlib import Path

    from ftcore.cache_dir import cache_root

    monkeypatch.delenv("FTCORE_CACHE")
    monkeypatch.delenv("HOME", raising=False)
    unset = cache_root()
    assert unset == Path.home() / ".cache" / "ftcore"
    monkeypatch.setenv("HOME", "")
    assert cache_root() == unset != Path("/.cache/ftcore")
    # the mapping given (a child's environment) decides, not this process's
    assert cache_root({"HOME": "/elsewhere"}) == Path("/elsewhere/.cache/ftcore")
    assert cache_root({"HOME": ""}) == unset
