"""The stability study of examples/seq2seq runs end to end in its --quick form.

Checks the structure of what it writes (table, per-run records, figures), not the
scientific outcome.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
STUDY = REPO_ROOT / "examples" / "seq2seq" / "study.py"

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from examples.seq2seq import study  # noqa: E402


def test_clipper_names_parse():
    study.make_clip("none")
    study.make_clip("global-0.5")
    study.make_clip("adaptive")
    study.make_clip("adaptive:record=clipped:min_history=4")
    with pytest.raises(SystemExit):
        study.make_clip("adaptive:record")
    with pytest.raises(SystemExit):
        study.make_clip("bogus")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study_quick")
    result = subprocess.run(
        [sys.executable, str(STUDY), "--quick", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_quick_study_writes_table_records_and_figures(quick_run: Path):
    clippers = list(study.DEFAULT_CLIPPERS)
    conditions = list(study.DEFAULT_CONDITIONS)
    seeds = [0, 1]

    records = [json.loads(line) for line in (quick_run / "runs.jsonl").read_text().splitlines()]
    assert len(records) == len(clippers) * len(conditions) * len(seeds)
    assert {(r["condition"], r["clipper"], r["seed"]) for r in records} == {
        (c, k, s) for c in conditions for k in clippers for s in seeds
    }
    for record in records:
        assert isinstance(record["diverged"], bool)
        assert 0.0 <= record["exact_match"] <= 1.0
        assert 0.0 <= record["clip_fraction"] <= 1.0
        assert record["steps_to_target"] is None or record["steps_to_target"] > 0
    # The clippers did something: no clipping never clips, a tiny constant always does.
    assert all(r["clip_fraction"] == 0.0 for r in records if r["clipper"] == "none")
    assert all(r["clip_fraction"] == 1.0 for r in records if r["clipper"] == "global-0.1")

    text = (quick_run / "study.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header == list(study.TABLE_COLUMNS)
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]
    assert [(row[0], row[1]) for row in rows] == [(c, k) for c in conditions for k in clippers]
    for row in rows:
        assert len(row) == len(header)
        assert row[2].endswith(f"/{len(seeds)}") and row[3].endswith(f"/{len(seeds)}")

    for figure in ("loss_curves.png", "clipped_norms.png"):
        assert (quick_run / figure).stat().st_size > 1000
    summary = json.loads((quick_run / "summary.json").read_text())
    assert summary["runs"] == len(records) and summary["seeds"] == seeds
