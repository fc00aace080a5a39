"""Default hyperparameters of the seq2seq example, and the command line built from them.

Every field of :class:`Config` becomes a ``--flag`` (underscores turn into dashes), so the
defaults below are the whole story of what a plain ``python examples/seq2seq/main.py`` does.
``--smoke`` swaps in :func:`smoke_overrides` first; flags given explicitly always win.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence

CLIP_MODES = ("none", "global", "adaptive", "adaptive-per-module", "autoclip", "zclip")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a training run depends on. Field comments double as ``--help`` text."""

    # --- data -----------------------------------------------------------------------------
    # Tab-separated sentence pairs (source TAB target); unset: generated number words.
    data: str | None = None
    # Smallest and largest number of the generated English -> French number-word task.
    number_min: int = 0
    number_max: int = 999_999
    # Training pairs sampled from the number range (disjoint from the test numbers).
    train_size: int = 30_000
    # Held-out pairs used for evaluation.
    test_size: int = 2_000
    # Seed of the train/test split.
    data_seed: int = 0
    # TSV only: keep pairs whose two sides have fewer than this many tokens.
    max_length: int = 10
    # TSV only: keep only pairs whose English side starts like "i am", "he is", ...
    prefix_filter: bool = False
    # TSV only: translate from the second column to the first.
    reverse: bool = False

    # --- model ----------------------------------------------------------------------------
    # Width of the token embeddings.
    embed_dim: int = 64
    # Width of the GRU states (each encoder direction and the decoder).
    hidden_dim: int = 128
    # Width of the additive-attention hidden layer.
    attention_dim: int = 128
    # Recurrent cell of encoder and decoder: "gru" or "rnn" (vanilla tanh RNN).
    cell: str = "gru"

    # --- optimisation ---------------------------------------------------------------------
    # Seed of parameter initialisation and of the order training batches are drawn in.
    seed: int = 0
    # Global batch, split over all devices (must be divisible by their count).
    batch_size: int = 128
    # Number of optimizer steps.
    num_steps: int = 800
    # Peak Adam learning rate (linear warm-up, then cosine decay).
    learning_rate: float = 3e-3
    # Steps of linear learning-rate warm-up.
    warmup_steps: int = 100

    # --- gradient clipping ------------------------------------------------------------------
    # none | global | adaptive | adaptive-per-module | autoclip | zclip.
    clip: str = "adaptive"
    # Threshold of --clip global.
    max_norm: float = 1.0
    # Adaptive: number of past gradient norms the threshold is computed from.
    window: int = 32
    # Adaptive: clip when the norm exceeds mean + num_std * std of the window.
    num_std: float = 1.0
    # Adaptive: norms needed before the adaptive threshold is trusted (library default if unset).
    min_history: int | None = None
    # Adaptive: fixed threshold applied while the history is too short (none if unset).
    warmup_max_norm: float | None = None
    # Adaptive: which norm enters the history, "raw" or "clipped".
    record: str = "raw"
    # Adaptive: what to do with a non-finite gradient norm.
    nonfinite: str = "impute"

    # --- loop and outputs -------------------------------------------------------------------
    # Directory for metrics.jsonl, eval.jsonl, summary.json and the plots.
    out: str = "runs/seq2seq"
    # Evaluate on the held-out set every this many steps (and at the end).
    eval_every: int = 100
    # Copy device metrics to the host and refresh the progress bar every this many steps.
    log_every: int = 50
    # Sentences per greedy-decoding call (rounded up to a multiple of the device count).
    eval_batch_size: int = 1_000
    # Sample translations printed at each evaluation.
    num_samples: int = 3
    # Orbax checkpoint directory; unset: no checkpoints.
    checkpoint_dir: str | None = None
    # Save a checkpoint every this many steps (and at the end).
    checkpoint_every: int = 200
    # Continue from the newest checkpoint in --checkpoint-dir.
    resume: bool = False
    # Stop after this step (at least 1) as if interrupted, to exercise --resume; unset: run on.
    stop_at: int | None = None
    # Comma-separated clip modes to train one after another and draw together.
    compare: str | None = None
    # Tiny configuration for tests: finishes in seconds.
    smoke: bool = False
    # Hide the progress bar.
    quiet: bool = False


def smoke_overrides() -> dict[str, object]:
    """Values that make a run small enough for the test suite."""
    return {
        "number_max": 99_999,
        "train_size": 2_000,
        "test_size": 200,
        "embed_dim": 16,
        "hidden_dim": 32,
        "attention_dim": 32,
        "batch_size": 32,
        "num_steps": 120,
        "warmup_steps": 10,
        "learning_rate": 1e-2,
        "eval_every": 60,
        "log_every": 20,
        "eval_batch_size": 200,
        "checkpoint_every": 60,
        "window": 16,
        "num_samples": 2,
    }


def _flag_type(annotation: object) -> tuple[type, bool]:
    """Python type to parse a flag with, and whether the field accepts ``None``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return members[0], True
    return annotation, False  # type: ignore[return-value]


def positive_step(text: str) -> int:
    """A step count of at least 1: ``--stop-at 0`` would train nothing and draw empty figures."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one flag per :class:`Config` field; unset flags stay absent."""
    parser = argparse.ArgumentParser(
        description="GRU seq2seq translation with adaptive gradient clipping.",
        argument_default=argparse.SUPPRESS,
    )
    hints = typing.get_type_hints(Config)
    for field in dataclasses.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        value_type, _ = _flag_type(hints[field.name])
        help_text = f"default: {field.default!r}"
        if value_type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif field.name == "clip":
            parser.add_argument(flag, choices=CLIP_MODES, help=help_text)
        elif field.name == "cell":
            parser.add_argument(flag, choices=("gru", "rnn"), help=help_text)
        elif field.name == "stop_at":
            parser.add_argument(flag, type=positive_step, help=help_text)
        else:
            parser.add_argument(flag, type=value_type, help=help_text)
    return parser


def parse_config(argv: Sequence[str] | None = None) -> Config:
    """Defaults, then ``--smoke`` overrides if asked for, then the flags the user gave."""
    given = vars(build_parser().parse_args(argv))
    config = Config()
    if given.get("smoke", False):
        config = dataclasses.replace(config, **smoke_overrides())
    return dataclasses.replace(config, **given)
