"""Train the GRU seq2seq translator; run from the repository root.

python examples/seq2seq/main.py                      # default: adaptive clipping
python examples/seq2seq/main.py --clip global --max-norm 1.0
python examples/seq2seq/main.py --compare none,global,adaptive --out runs/compare
python examples/seq2seq/main.py --smoke --out /tmp/smoke   # seconds, for tests
python -m examples.seq2seq.main --help
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `examples.seq2seq` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import dataclasses
import json
from collections.abc import Sequence

from examples.seq2seq import data as data_lib
from examples.seq2seq import plots, train
from examples.seq2seq.config import Config, clip_modes, parse_config


def run_one(config: Config, dataset: data_lib.Dataset, started: float) -> dict:
    """Train one configuration and draw its figures into its output directory."""
    summary = train.train_and_evaluate(config, dataset, started)
    plots.plot_runs({config.clip: config.out}, config.out)
    loss = train.format_number(summary["final_loss"], ".4f")  # "n/a" if null (diverged)
    print(
        f"[{config.clip}] steps {summary['steps']}, loss {loss}, "
        f"token accuracy {summary['final_token_accuracy']:.4f}, "
        f"exact match {summary['final_exact_match']:.4f}, "
        f"clipped steps {summary['clip_steps']} ({100 * summary['clip_fraction']:.1f}%), "
        f"wall time {summary['wall_time_s']:.1f} s -> {config.out}"
    )
    return summary


def compare_table(summaries: dict[str, dict]) -> str:
    """Markdown table of the headline numbers of each clipping mode."""
    lines = [
        "| clip | final loss | token accuracy | exact match | clipped steps | "
        "step time (ms) | wall time (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode, s in summaries.items():
        loss = train.format_number(s["final_loss"], ".4f")
        step_ms = train.format_number(s["step_time_ms"], ".1f")
        lines.append(
            f"| {mode} | {loss} | {s['final_token_accuracy']:.4f} | "
            f"{s['final_exact_match']:.4f} | {s['clip_steps']} "
            f"({100 * s['clip_fraction']:.1f}%) | {step_ms} | {s['wall_time_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def run_compare(config: Config, dataset: data_lib.Dataset) -> dict[str, dict]:
    """Train each mode of ``--compare`` with the same seed and data, then draw them together."""
    modes = clip_modes(config)  # checked when the flags were parsed
    out_dir = Path(config.out)
    summaries = {}
    for mode in modes:
        checkpoint_dir = config.checkpoint_dir and str(Path(config.checkpoint_dir) / mode)
        run_config = dataclasses.replace(
            config, clip=mode, out=str(out_dir / mode), checkpoint_dir=checkpoint_dir
        )
        summaries[mode] = run_one(run_config, dataset, time.perf_counter())
    plots.plot_runs({mode: out_dir / mode for mode in modes}, out_dir, prefix="compare_")
    table = compare_table(summaries)
    (out_dir / "compare.md").write_text(table)
    print(table)
    return summaries


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse flags, build the data, train; returns the summary (one per mode with --compare)."""
    started = time.perf_counter()
    config = parse_config(argv)
    train.check_device_count(config)  # before the data, which can take a while to generate
    try:
        dataset = data_lib.load_dataset(config)
    except data_lib.DataError as error:
        raise SystemExit(f"error: --data {config.data}: {error}") from None
    print("data:", json.dumps(dataset.info))
    if config.compare:
        return run_compare(config, dataset)
    return run_one(config, dataset, started)


if __name__ == "__main__":
    main()
