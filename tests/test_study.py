"""The stability study of examples/seq2seq runs end to end in its --quick form.

Checks the structure of what it writes (table, per-run records, figures), not the
scientific outcome.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
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
    # Unknown options and values out of range used to end in tracebacks.
    with pytest.raises(SystemExit, match=r"clipper 'adaptive:bogus=1': .*'bogus'"):
        study.make_clip("adaptive:bogus=1")
    with pytest.raises(SystemExit, match="clipper 'zclip:alpha=2': `alpha`"):
        study.make_clip("zclip:alpha=2")
    # A bad C was a traceback, or (0, negative) a clipper that zeroes or flips every update.
    for bad in ("abc", "0", "-1", "nan", "inf"):
        with pytest.raises(SystemExit, match=f"clipper 'global-{bad}': C must be a finite"):
            study.make_clip(f"global-{bad}")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # --seeds 0 trained nothing and crashed drawing; --steps 0 failed inside optax.
        (["--seeds", "0"], "argument --seeds: must be an integer >= 1, got 0"),
        (["--steps", "0"], "argument --steps: must be an integer >= 1, got 0"),
        (["--spike-prob", "2"], "argument --spike-prob: must be a number in [0, 1], got '2'"),
        (["--noise-prob", "-0.1"], "argument --noise-prob: must be a finite number >= 0"),
        (["--spike-scale", "0"], "argument --spike-scale: must be a finite number > 0"),
        (["--high-lr-scale", "nan"], "argument --high-lr-scale: must be a finite number > 0"),
        # An exact match above 1 is never reached.
        (["--target", "2"], "argument --target: must be a number in [0, 1], got '2'"),
    ],
)
def test_bad_flags_are_rejected_by_the_parser(args, message, capsys):
    with pytest.raises(SystemExit):
        study.build_parser().parse_args(args)
    assert message in capsys.readouterr().err


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


@pytest.mark.slow
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


# --- --resume --------------------------------------------------------------------------------


@pytest.fixture
def fake_training(monkeypatch) -> Iterator[list[tuple[str, tuple[str, ...], tuple[int, ...]]]]:
    """Runs `study.main` without data, compilation or training; lists what it trained.

    The fake loss at step 0 is 4 + the condition's spike probability, so the records show
    which setup a result was made with.
    """
    trained = []

    def train_condition(programs, config, condition, clippers, seeds):
        trained.append((condition.name, tuple(clippers), tuple(seeds)))
        steps, evals = config.num_steps, config.num_steps // config.eval_every
        loss = np.linspace(4.0, 1.0, steps) + condition.spike_prob
        no = np.zeros((len(seeds), steps), bool)
        curves = {
            "loss": np.tile(loss, (len(seeds), 1)),
            "grad_norm": np.ones((len(seeds), steps)),
            "threshold": np.ones((len(seeds), steps)),
            "clipped": no,
            "spiked": no,
            "noisy": no,
            "eval_token_accuracy": np.ones((len(seeds), evals)),
            "eval_exact_match": np.ones((len(seeds), evals)),
        }
        return {clipper: curves for clipper in clippers}

    monkeypatch.setattr(study.data_lib, "load_dataset", lambda config: SimpleNamespace(info={}))
    monkeypatch.setattr(study, "build_programs", lambda *args: None)
    monkeypatch.setattr(study, "train_condition", train_condition)
    monkeypatch.setattr(study, "plot_losses", lambda *args: None)
    monkeypatch.setattr(study, "plot_norms", lambda *args: None)
    async_dispatch = jax.config.values["jax_cpu_enable_async_dispatch"]  # main() turns it off
    yield trained
    jax.config.update("jax_cpu_enable_async_dispatch", async_dispatch)


def _initial_losses(out: Path) -> dict[tuple[str, str], float]:
    records = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    return {(r["condition"], r["clipper"]): r["initial_loss"] for r in records}


def test_resume_reuses_only_conditions_made_with_the_same_setup(tmp_path, fake_training, capsys):
    base = ["--quick", "--out", str(tmp_path), "--conditions", "baseline,spikes"]
    study.main([*base, "--clippers", "none,adaptive"])
    assert [name for name, *_ in fake_training] == ["baseline", "spikes"]

    fake_training.clear()
    study.main([*base, "--clippers", "none,adaptive", "--resume"])
    assert fake_training == []

    # Other spike flags change `spikes` only: it is trained again, and its records say so.
    fake_training.clear()
    capsys.readouterr()
    study.main([*base, "--clippers", "none,adaptive", "--resume", "--spike-prob", "0.5"])
    assert [name for name, *_ in fake_training] == ["spikes"]
    assert "spikes: retraining" in capsys.readouterr().out
    assert _initial_losses(tmp_path)[("spikes", "adaptive")] == pytest.approx(4.5)
    assert "resumed: reused baseline from" in (tmp_path / "study.md").read_text()

    # An added clipper or seed is trained, not a KeyError.
    for extra in (["--clippers", "none,adaptive,zclip"], ["--clippers", "none", "--seeds", "3"]):
        fake_training.clear()
        study.main([*base, *extra, "--resume"])
        assert [name for name, *_ in fake_training] == ["baseline", "spikes"]
    assert fake_training[0] == ("baseline", ("none",), (0, 1, 2))
    # Other seeds alone: trained again too (the saved rows are those of the old seeds).
    fake_training.clear()
    study.main([*base, "--clippers", "none", "--seeds", "2", "--resume"])
    assert fake_training == [("baseline", ("none",), (0, 1)), ("spikes", ("none",), (0, 1))]


def test_resume_retrains_conditions_made_with_other_package_versions(
    tmp_path, fake_training, capsys, monkeypatch
):
    # A resume after an upgrade used to reuse results computed by the old packages.
    args = ["--quick", "--out", str(tmp_path), "--conditions", "spikes", "--clippers", "none"]
    summary = study.main(args)
    assert summary["versions"] == study.package_versions()
    assert summary["versions"]["jax"] == jax.__version__

    upgraded = {**study.package_versions(), "jax": "99.0"}
    monkeypatch.setattr(study, "package_versions", lambda: upgraded)
    fake_training.clear()
    capsys.readouterr()
    study.main([*args, "--resume"])
    assert [name for name, *_ in fake_training] == ["spikes"]
    assert f"versions.jax {jax.__version__!r} -> '99.0'" in capsys.readouterr().out

    fake_training.clear()
    study.main([*args, "--resume"])
    assert fake_training == []  # made with the "upgraded" versions: reused


def test_resume_retrains_a_cache_without_its_setup(tmp_path, fake_training, capsys):
    args = ["--quick", "--out", str(tmp_path), "--conditions", "spikes", "--clippers", "none"]
    study.main(args)
    cache = tmp_path / "conditions" / "spikes.npz"
    with np.load(cache) as saved:  # only the clippers' arrays, as study.py wrote them before
        arrays = {key: saved[key] for key in saved.files if "/" in key}
    np.savez_compressed(cache, **arrays)

    fake_training.clear()
    capsys.readouterr()
    study.main([*args, "--resume"])
    assert [name for name, *_ in fake_training] == ["spikes"]
    assert "did not record its setup" in capsys.readouterr().out


@pytest.mark.slow
def test_resume_with_other_flags_trains_for_real(tmp_path):
    """The review's reproduction, end to end: new spike flags give new numbers, not old ones."""
    base = [sys.executable, str(STUDY), "--quick", "--out", str(tmp_path), "--seeds", "1"]
    base += ["--steps", "30", "--conditions", "spikes", "--clippers", "none"]

    def run(*extra: str) -> str:
        result = subprocess.run(
            [*base, *extra], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    def corrupted_steps() -> int:
        (record,) = [
            json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()
        ]
        return record["corrupted_steps"]

    run("--spike-prob", "0")
    assert corrupted_steps() == 0
    assert "retraining" in run("--resume", "--spike-prob", "1")
    assert corrupted_steps() == 30
    assert "retraining" in run("--resume", "--spike-prob", "1", "--clippers", "none,zclip")
