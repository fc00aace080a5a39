"""The benchmark script runs end to end in its ``--quick`` mode and writes its results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_clipping.py"
TIMEOUT_SECONDS = 300  # --quick takes well under a minute; a slow CI machine must not fail it


def test_quick_benchmark_writes_table_and_json(tmp_path: Path) -> None:
    out = tmp_path / "clipping"
    completed = subprocess.run(
        [sys.executable, str(BENCHMARK), "--quick", "--out", str(out)],
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-5000:]
    assert "| params | dtype | variant |" in completed.stdout

    results = json.loads(out.with_suffix(".json").read_text())
    assert results["machine"]["jax"]
    assert results["machine"]["cpu_count"] >= 1
    variants = {(row["dtype"], row["variant"]) for row in results["timings"]}
    assert {
        ("float32", "adaptive_clip(w=32)"),
        ("float32", "adaptive_clip(w=65536)"),
        ("float32", "clip_by_global_norm"),
        ("float32", "clip_by_global_norm + adaptive_clip's state, passed through"),
        ("float32", "adaptive_clip(w=32, nonfinite='zero')"),
        ("float32", "adaptive_clip(w=32), 10 steps per compiled loop"),
        ("float32", "adaptive_clip(w=32, nonfinite='zero'), 10 steps per compiled loop"),
        ("float32", "clip_by_global_norm, 10 steps per compiled loop"),
        ("float32", "adaptive_clip(max_norm=0.5), scaling every step"),
        ("float32", "clip_by_global_norm, scaling every step"),
        ("float32", "chain(adaptive_clip, adam)"),
        ("float32", "chain(clip_by_global_norm, adam)"),
        ("float32", "adam"),
        ("float32", "eager_host_clip"),
        ("bfloat16", "adaptive_clip(w=32)"),
    } <= variants
    for row in results["timings"]:
        assert row["median_seconds"] > 0
        if row["variant"] != "eager_host_clip":
            assert row["temp_size_in_bytes"] is not None
    assert any("ratio_of_medians" in row for row in results["comparisons"])
    compared = {row["comparison"] for row in results["comparisons"]}
    assert {
        "adaptive_clip / adaptive_clip(nonfinite='zero'), no step scaled",
        "adaptive_clip / adaptive_clip(nonfinite='zero'), 10 steps per compiled loop",
    } <= compared
    assert out.with_suffix(".md").read_text().startswith("## Adaptive clipping benchmark")
