"""PNG figures of a run (or of several runs side by side) read from their metrics files.

* ``loss.png``: training loss per step (light) and its moving average.
* ``accuracy.png``: token and exact-match accuracy of greedy decoding on the test set.
* ``grad_norm.png``: the pre-clip gradient norm, the clipping threshold with the band of
  norms that pass unclipped shaded under it, and a red mark at every clip event; one panel
  per clipper (encoder and decoder for ``adaptive-per-module``).

Can be re-drawn from an output directory: ``python examples/seq2seq/plots.py RUN_DIR``
(of a run, or of a finished ``--compare``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display; set before pyplot is imported
import matplotlib.pyplot as plt
import numpy as np

FIGURE_DPI = 80


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_run(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(per-step metrics rows, evaluation rows) of one output directory."""
    run_dir = Path(run_dir)
    return read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "eval.jsonl")


def column(rows: Sequence[dict], name: str) -> np.ndarray:
    """A metric as floats; missing or null values become NaN so lines simply break."""
    return np.array([np.nan if row.get(name) is None else row[name] for row in rows], float)


def moving_average(values: np.ndarray, width: int) -> np.ndarray:
    width = max(1, min(width, len(values)))
    return np.convolve(values, np.ones(width) / width, mode="valid")


def clipper_prefixes(rows: Sequence[dict]) -> list[str]:
    """ "" for a single clipper, "encoder/" and "decoder/" for one clipper per module."""
    if not rows:
        return []
    keys = rows[-1].keys()
    prefixes = {key[: -len("threshold")] for key in keys if key.endswith("threshold")}
    return sorted(prefix for prefix in prefixes if prefix == "" or prefix.endswith("/"))


def draw_grad_norm(axis: plt.Axes, rows: Sequence[dict], prefix: str, title: str) -> None:
    """Gradient norm, threshold band and clip events of one clipper on one axis."""
    steps = column(rows, "step")
    norm_key = prefix + "norm" if prefix and (prefix + "norm") in rows[-1] else "grad_norm"
    norms = column(rows, norm_key)
    axis.plot(steps, norms, lw=0.7, color="tab:blue", label="gradient norm (before clipping)")
    if prefix + "threshold" in rows[-1]:
        threshold = column(rows, prefix + "threshold")
        axis.plot(steps, threshold, lw=1.0, color="tab:orange", label="threshold")
        axis.fill_between(
            steps, 0, threshold, color="tab:orange", alpha=0.15, lw=0, label="passes unclipped"
        )
        clipped = column(rows, prefix + "clipped") > 0
        axis.scatter(
            steps[clipped],
            norms[clipped],
            s=12,
            marker="x",
            color="tab:red",
            zorder=3,
            label=f"clipped ({int(clipped.sum())} steps)",
        )
    axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("global norm")
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=7, loc="upper right")


def grad_norm_panels(runs: Mapping[str, Sequence[dict]]) -> list[tuple[str, Sequence[dict], str]]:
    """(run name, rows, clipper prefix) for each panel of the gradient-norm figure."""
    panels = []
    for name, rows in runs.items():
        if not rows:
            continue
        for prefix in clipper_prefixes(rows) or [""]:
            panels.append((name, rows, prefix))
    return panels


def save_figure(figure: plt.Figure, path: Path, dpi: int = FIGURE_DPI) -> None:
    """Writes ``figure`` to ``path`` and frees it (pyplot keeps every open figure)."""
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    plt.close(figure)


def plot_grad_norms(runs: Mapping[str, Sequence[dict]], path: Path) -> None:
    panels = grad_norm_panels(runs)
    figure, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), squeeze=False)
    for axis, (name, rows, prefix) in zip(axes[:, 0], panels, strict=True):
        draw_grad_norm(axis, rows, prefix, f"{name} {prefix.rstrip('/')}".strip())
    save_figure(figure, path)


def plot_losses(runs: Mapping[str, Sequence[dict]], path: Path) -> None:
    figure, axis = plt.subplots(figsize=(7, 3.2))
    for name, rows in runs.items():
        if not rows:
            continue
        steps, losses = column(rows, "step"), column(rows, "loss")
        width = max(1, len(rows) // 50)
        line = axis.plot(steps, losses, lw=0.5, alpha=0.3)[0]
        axis.plot(
            steps[width - 1 :],
            moving_average(losses, width),
            lw=1.3,
            color=line.get_color(),
            label=name,
        )
    axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("training loss (cross-entropy)")
    axis.legend(fontsize=8)
    save_figure(figure, path)


def plot_accuracies(runs: Mapping[str, Sequence[dict]], path: Path) -> None:
    figure, axis = plt.subplots(figsize=(7, 3.2))
    for name, rows in runs.items():
        if not rows:
            continue
        steps = column(rows, "step")
        line = axis.plot(
            steps, column(rows, "exact_match"), marker="o", ms=3, label=f"{name}: exact match"
        )[0]
        axis.plot(
            steps,
            column(rows, "token_accuracy"),
            ls="--",
            marker=".",
            ms=3,
            color=line.get_color(),
            label=f"{name}: token accuracy",
        )
    axis.set_ylim(0, 1.02)
    axis.set_xlabel("step")
    axis.set_ylabel("held-out accuracy")
    axis.legend(fontsize=7, loc="lower right")
    save_figure(figure, path)


def plot_runs(
    run_dirs: Mapping[str, str | Path], out_dir: str | Path, prefix: str = ""
) -> list[Path]:
    """Draw the three figures for the named runs into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    loaded = {name: read_run(run_dir) for name, run_dir in run_dirs.items()}
    metrics = {name: rows for name, (rows, _) in loaded.items()}
    evals = {name: rows for name, (_, rows) in loaded.items()}
    paths = [out_dir / f"{prefix}{name}.png" for name in ("loss", "accuracy", "grad_norm")]
    plot_losses(metrics, paths[0])
    plot_accuracies(evals, paths[1])
    plot_grad_norms(metrics, paths[2])
    return paths


def has_metrics(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return metrics.is_file() and metrics.stat().st_size > 0


def compare_runs(compare_dir: Path) -> dict[str, Path]:
    """The mode sub-directories of a finished ``--compare``, in the order of its compare.md."""
    table = compare_dir / "compare.md"
    if not table.is_file():
        return {}
    rows = table.read_text().splitlines()[2:]  # under the header and its rule
    modes = [row.split("|")[1].strip() for row in rows if row.startswith("|")]
    return {mode: compare_dir / mode for mode in modes if has_metrics(compare_dir / mode)}


def main(argv: Sequence[str] | None = None) -> None:
    """Redraw the figures of each run directory, or of each ``--compare`` directory, in place."""
    parser = argparse.ArgumentParser(
        description="Redraw the figures of runs of examples/seq2seq/main.py in place."
    )
    parser.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="the --out directory of a run, or of a finished --compare",
    )
    for run_dir in map(Path, parser.parse_args(argv).run_dirs):
        if has_metrics(run_dir):
            paths = plot_runs({run_dir.name: run_dir}, run_dir)
        elif runs := compare_runs(run_dir):
            paths = plot_runs(runs, run_dir, prefix="compare_")
        else:
            raise SystemExit(
                f"{run_dir}: no metrics.jsonl (or an empty one) and no compare.md, so the "
                "output directory of neither a run nor a finished --compare"
            )
        for path in paths:
            print(path)


if __name__ == "__main__":
    main()
