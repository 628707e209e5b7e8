"""torch-compile's parts that need no training: what the report says of compiled and eager steps
(the line beside the fairness checks is read from each run's `compiled_step` field, never from its
backend's name), `compile_time_s`'s table row, and the inductor cache in a torch child's
environment."""

from __future__ import annotations

import pytest

from ftcore.report import build_comparison, format_short, format_table
from ftcore.report.table import markdown
from ftcore.result import RunResult
from ftcore.torch import env as torch_env

pytestmark = pytest.mark.unit


def comparison(*runs: tuple[str, bool | None, float | None]) -> dict:
    return build_comparison([RunResult(backend=name, compiled_step=compiled, compile_time_s=secs,
                                       losses=[1.0], steps=1).to_dict()
                             for name, compiled, secs in runs])  # fmt: skip


def test_the_step_line_names_compiled_and_eager_backends_from_their_results() -> None:
    c = comparison(("torch", False, None), ("torch-compile", True, 12.5), ("mlx", True, None),
                   ("mlx-lm", None, None))  # fmt: skip
    assert c["step_kinds"] == {"compiled": ["torch-compile", "mlx"], "eager": ["torch"],
                               "not recorded": ["mlx-lm"]}  # fmt: skip
    line = "Training step: compiled torch-compile, mlx; eager torch; not recorded mlx-lm"
    assert f"  {line}" in format_table(c).splitlines()
    assert line in markdown(c).splitlines()
    short = format_short(c, width=200).splitlines()
    fairness = next(i for i, s in enumerate(short) if s.startswith("Fairness:"))
    assert line in short[fairness:]  # after the checks' line and the checks not passed


def test_the_line_follows_the_field_not_the_name() -> None:
    c = comparison(("torch", True, 3.0), ("mlx", False, None))
    assert c["step_kinds"] == {"compiled": ["torch"], "eager": ["mlx"], "not recorded": []}
    assert "  Training step: compiled torch; eager mlx" in format_table(c).splitlines()


def test_a_failed_run_is_left_out_of_the_line() -> None:
    ok = RunResult(backend="torch", compiled_step=False, losses=[1.0], steps=1).to_dict()
    failed = RunResult.failed("torch-compile", {}, "boom").to_dict()
    assert build_comparison([ok, failed])["step_kinds"]["compiled"] == []


def test_compile_time_has_its_row() -> None:
    table = format_table(comparison(("torch", False, None), ("torch-compile", True, 12.5)))
    row = next(line for line in table.splitlines() if line.startswith("| Compile time (s)"))
    assert [cell.strip() for cell in row.split("|")[2:4]] == ["n/a", "12.50"]


def test_a_torch_child_keeps_inductors_cache_under_ftcores() -> None:
    env = torch_env.child_env({"HOME": "/home/u"}, 2)
    assert env["TORCHINDUCTOR_CACHE_DIR"] == "/home/u/.cache/ftcore/torchinductor"
    env = torch_env.child_env({"HOME": "/home/u", "FTCORE_CACHE": "/c"}, 2)
    assert env["TORCHINDUCTOR_CACHE_DIR"] == "/c/torchinductor"
