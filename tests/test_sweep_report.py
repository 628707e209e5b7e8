"""`ftcore sweep` without running it: the points its flags make, its refusals (one line, exit 2,
nothing written), where the speed winner changes (synthetic verdicts), the table and the plot."""

from __future__ import annotations

import pytest
from helpers import ftcore_in_process

from ftcore.cli_args import build_parser
from ftcore.config_flags import config_from_args
from ftcore.report.sweep_report import crossover, format_sweep, plot_sweep
from ftcore.run.sweep import SWEEP_DEFAULTS, plan_points

pytestmark = pytest.mark.unit


def points_of(*argv: str) -> list[tuple[str, str, int | None]]:
    args = build_parser().parse_args(["sweep", *argv])
    return [(p.name, p.cfg.preset, p.cfg.num_layers)
            for p in plan_points(config_from_args(args), args.layers, args.preset is not None)]


def test_default_points_are_tinyllama_s_depths_and_the_embedded_default() -> None:
    assert points_of() == [("tiny-pretrained-L4", "tiny-pretrained", None)] + [
        (f"tinyllama-1.1b-L{n}", "tinyllama-1.1b", n) for n in (1, 2, 4, 8, 16, 22)]
    assert points_of("--layers", "4,1") == [("tiny-pretrained-L4", "tiny-pretrained", None),
                                            ("tinyllama-1.1b-L1", "tinyllama-1.1b", 1),
                                            ("tinyllama-1.1b-L4", "tinyllama-1.1b", 4)]
    assert points_of("--preset", "tiny") == [(f"tiny-L{n}", "tiny", n) for n in (1, 2, 4)]


def test_sweep_s_own_defaults_apply_where_the_user_gave_none() -> None:
    args = build_parser().parse_args(["sweep"])
    assert {k: getattr(args, k) for k in SWEEP_DEFAULTS} == SWEEP_DEFAULTS
    assert SWEEP_DEFAULTS["repeats"] >= 2  # the verdict's interval needs two runs a side
    given = build_parser().parse_args(["sweep", "--steps", "6", "--repeats", "3", "--eval-generate"])
    assert (given.steps, given.repeats, given.eval_generate) == (6, 3, True)
    compare = build_parser().parse_args(["compare"])  # compare keeps its own
    assert (compare.steps, compare.repeats, compare.eval_samples) == (None, None, None)


@pytest.mark.parametrize(("argv", "needle"), [
    (["--layers", ""], "--layers: give depths as a comma list"),
    (["--layers", "1,,2"], "--layers: give depths as a comma list"),
    (["--layers", "0"], "--layers: a depth must be >= 1, not 0"),
    (["--layers", "1,two"], "--layers: 'two' is not a whole number"),
    (["--layers", "2.5"], "--layers: '2.5' is not a whole number"),
    (["--layers", "23"], "--layers: 23 is more than preset tinyllama-1.1b's 22 layers"),
    (["--preset", "tiny", "--layers", "1,5"], "--layers: 5 is more than preset tiny's 4 layers"),
    (["--layers", "2,1,2"], "--layers: 2 is named twice"),
    (["--num-layers", "2"], "--num-layers: sweep sets each point's depth"),
    (["--model", "somewhere", "--layers", "1"], "--layers: cuts a preset only"),
    (["--repeats", "0"], "--repeats: must be >= 1"),
])  # fmt: skip
def test_a_bad_sweep_flag_is_one_line_before_anything_runs(tmp_path, argv, needle) -> None:
    out = tmp_path / "run"
    res = ftcore_in_process("sweep", *argv, "--out", out)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert needle in lines[0], lines[0]
    assert not out.exists() and res.stdout == ""


def point(layers: int, width: int, params: int, outcome: str, winner: str | None = None,
          status: str = "ok") -> dict:
    """A sweep.json point with a synthetic speed verdict of mlx against torch."""
    ratio = {"torch": 0.8, "mlx": 1.3, None: 1.02}[winner]
    speed = {"pair": ["torch", "mlx"], "outcome": outcome, "winner": winner, "ratio": ratio,
             "ci_low": ratio - 0.1, "ci_high": ratio + 0.1, "runs": {"torch": 2, "mlx": 2}}
    return {"layers": layers, "width": width, "params": params, "status": status,
            "speed": speed if status == "ok" else None, "errors": [],
            "median_step_s": {"torch": 0.5, "mlx": 0.5 / ratio}}  # fmt: skip


SMALL, MID, LARGE = point(1, 2048, 176_000_000, "decided", "mlx"), \
    point(8, 2048, 492_000_000, "undecided"), point(22, 2048, 1_100_048_384, "decided", "torch")


def test_crossover_names_the_size_where_the_winner_changes() -> None:
    said = crossover([LARGE, MID, SMALL])  # any order: sorted by size
    assert said.startswith("torch wins from 22 layers x 2048 (1.10B params) up; mlx below (up to "
                           "1 layers x 2048 (176M params))")
    assert said.endswith("; undecided at 8 layers x 2048 (492M params)")


def test_crossover_says_so_when_nothing_or_everything_is_decided() -> None:
    busy = point(4, 64, 4 * 10**5, "undecided")
    busy["speed"].update(ratio=None, ci_low=None, ci_high=None)  # every run of a side BUSY
    undecided = [point(1, 64, 10**5, "undecided"), point(2, 64, 2 * 10**5, "no_clear_difference"),
                 busy]
    assert crossover(undecided) == (
        "no size decided the speed winner; no ratio (no usable runs) at 4 layers x 64 (400k "
        "params); no clear difference (within 1 +- 5%) at 2 layers x 64 (200k params); undecided "
        "at 1 layers x 64 (100k params)")
    assert crossover([SMALL, point(4, 2048, 300_000_000, "decided", "mlx")]) == \
        "mlx is faster at every size"
    assert crossover([SMALL, MID]) == ("mlx is faster at every decided size; undecided at 8 "
                                       "layers x 2048 (492M params)")


def test_crossover_with_a_failed_point_and_a_winner_that_changes_twice() -> None:
    back = point(30, 2048, 2 * 10**9, "decided", "mlx")
    failed = point(16, 2048, 800_000_000, "decided", "torch", status="failed")
    said = crossover([SMALL, LARGE, back, failed])
    assert said == ("the winner changes more than once: mlx at 1 layers x 2048; torch at 22 layers "
                    "x 2048; mlx at 30 layers x 2048; failed at 16 layers x 2048 (800M params)")


def test_table_has_a_row_a_point_smallest_first_and_the_plot_is_a_png() -> None:
    record = {"labels": ["torch", "mlx"], "points": [LARGE, SMALL], "crossover": "X"}
    lines = format_sweep(record).splitlines()
    assert lines[0].split() == ["layers", "width", "params", "mlx/torch", "[95%", "CI]",
                                "outcome", "runs", "torch", "s/step", "mlx", "s/step"]  # fmt: skip
    assert lines[2].split() == ["1", "2048", "176M", "1.30", "[1.20-1.40]", "mlx", "faster", "2/2",
                                "0.500", "0.385"]  # fmt: skip
    assert lines[3].split()[:7] == ["22", "2048", "1.10B", "0.80", "[0.70-0.90]", "torch", "faster"]
    busy = {**SMALL, "speed": {**SMALL["speed"], "busy_left_out": {"torch": 1, "mlx": 0}}}
    assert "mlx faster (1 BUSY left out)" in format_sweep({**record, "points": [busy]})
    assert lines[-1] == "Across sizes: X"
    png = plot_sweep(record)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
