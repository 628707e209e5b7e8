"""`ftcore compare --fine-tune dora|full`: both frameworks train the asked type on the default
data, every fairness check passes, and MLX's own peak of its arrays is within 25% of the memory
model for that type (torch on the CPU has no such counter; its RSS holds ~400 MB of runtime)."""

from __future__ import annotations

import json

import pytest
from helpers import ftcore

from ftcore.tolerances import REFERENCE_LOSS_ATOL

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("kind", ["dora", "full"])
def test_compare_trains_the_type_in_both_frameworks_within_the_memory_model(kind, tmp_path):
    out = tmp_path / kind
    res = ftcore("compare", "--fine-tune", kind, "--preset", "tiny", "--steps", "6",
                 "--eval-samples", "8", "--repeats", "1", "--out", out, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"Trained: {kind}, 1 micro-batch of 4 rows a step" in res.stdout
    comparison = json.loads((out / "comparison.json").read_text())
    failed = [c for c in comparison["fairness"] if not c["ok"]]
    assert not failed, failed
    rows = {r["backend"]: r for r in comparison["rows"]}
    assert {r["fine_tune"] for r in rows.values()} == {kind}
    assert rows["torch"]["trainable_params"] == rows["mlx"]["trainable_params"] > 0
    assert comparison["loss_diff"]["max_abs_diff"] < REFERENCE_LOSS_ATOL
    assert 0.75 <= rows["mlx"]["framework_peak_over_model"] <= 1.25, rows["mlx"]["memory_model_mb"]
