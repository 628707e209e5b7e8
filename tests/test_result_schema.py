"""One result schema (ftcore.result.figure): every consumer of a reported figure reads it from the
field's metadata, so a figure is declared once and shows up, checked, everywhere."""

from __future__ import annotations

import dataclasses

import pytest

from ftcore.report.comparison import REPEATED_FIELDS, build_comparison
from ftcore.report.rows import TABLE_LAYOUT, TABLE_ROWS
from ftcore.result import RunResult, figure, figure_format, figures

pytestmark = pytest.mark.unit


def bench_support():
    """bench/bench_support.py, loaded by path (bench/ is not a package on tests/' path)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "bench_support.py"
    spec = importlib.util.spec_from_file_location("bench_support_for_schema", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_tag_is_read_by_its_consumer() -> None:
    from helpers import RESULT_FIELDS

    bs = bench_support()

    assert set(REPEATED_FIELDS) == set(figures("repeated")) and "train_time_s" in REPEATED_FIELDS
    assert figures("required") == bs.REQUIRED and set(bs.POSITIVE) <= set(bs.REQUIRED)
    assert set(bs.RESULT_FIELDS) == set(figures("median")) | set(figures("first"))
    assert set(bs.MEDIAN_FIELDS) == set(figures("median")) and figures("required") == RESULT_FIELDS
    row = build_comparison([RunResult(backend="torch").to_dict()])["rows"][0]
    assert set(figures("row")) <= set(row)


def test_every_labelled_figure_has_its_table_row_and_every_row_its_label() -> None:
    placed = [x for x in TABLE_LAYOUT if isinstance(x, str)]
    labelled = [f.name for f in dataclasses.fields(RunResult) if f.metadata.get("label")]
    assert sorted(placed) == sorted(labelled)
    labels = [label for label, _ in TABLE_ROWS]
    assert len(labels) == len(set(labels)) and figure_format("train_time_s")[0] in labels


def test_a_figure_row_renders_as_its_schema_says() -> None:
    from ftcore.report.rows import _figure_row

    r = {"train_time_s": 2.0, "runs": 3, "spread": {"train_time_s": [1.5, 2.5]}, "threads": 0, "blas": "mkl"}
    assert _figure_row("train_time_s")[1](r) == "2.00 (1.50-2.50)"  # a `spread` figure
    assert _figure_row("threads")[1](r) == "n/a" and _figure_row("blas")[1](r) == "mkl"
    with pytest.raises(ValueError, match="no table label"):
        _figure_row("mfu")


def test_an_unknown_tag_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown figure tag"):
        figure(0.0, tags="row medain")
