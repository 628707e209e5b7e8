"""`torch-compile` from the command line: what it cannot run is refused up front in one `error:`
line (exit 2, nothing written); and, with --study, the default-size compare against `torch`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import ftcore, ftcore_in_process

from ftcore.tolerances import REFERENCE_LOSS_ATOL

pytestmark = pytest.mark.integration

REFUSED = {
    "--grad-checkpoint": (["--grad-checkpoint"], "--grad-checkpoint: the torch-compile backend"),
    "--nproc 2": (["--nproc", "2", "--threads", "2"],
                  "--nproc/--nnodes: torch-compile runs in one process only"),
    # fullgraph dynamo stops inside PEFT's DoRA forward (ftcore.backends.check_torch_compile)
    "--fine-tune dora": (["--fine-tune", "dora"], "--fine-tune dora: the torch-compile backend"),
}


@pytest.mark.parametrize("case", list(REFUSED))
@pytest.mark.parametrize("command", ["run", "compare"])
def test_what_torch_compile_cannot_run_is_one_error_line(case, command, tmp_path, tiny_model_dir):
    flags, needle = REFUSED[case]
    which = ["--backend", "torch-compile"] if command == "run" else ["--backends", "torch,torch-compile"]
    out = ftcore_in_process(command, *which, "--out", tmp_path / "out", "--model", tiny_model_dir,
                            "--steps", 4, *flags)  # fmt: skip
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], out.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.study
def test_study_default_compare_losses_match_torch(tmp_path) -> None:
    """The default size (60 steps, tiny-pretrained): every per-step loss within
    REFERENCE_LOSS_ATOL of torch's (measured: 4.3e-6). Minutes: torch.compile's cold compile."""
    out = ftcore("compare", "--backends", "torch,torch-compile", "--out", tmp_path / "c", timeout=1800)
    assert out.returncode == 0, out.stderr
    c = json.loads((tmp_path / "c" / "comparison.json").read_text())
    eager, compiled = (next(r for r in c["results"] if r["backend"] == b) for b in ("torch", "torch-compile"))
    assert len(eager["losses"]) == len(compiled["losses"]) == 60
    np.testing.assert_allclose(compiled["losses"], eager["losses"], rtol=0, atol=REFERENCE_LOSS_ATOL)
    assert compiled["compile_time_s"] > 0 and compiled["extra"]["compiled_graphs"] == 1
    assert c["step_kinds"]["compiled"] == ["torch-compile"] and c["step_kinds"]["eager"] == ["torch"]
