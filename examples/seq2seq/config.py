"""Default hyperparameters of the seq2seq example, and the command line built from them.

Every field of :class:`Config` becomes a ``--flag`` (underscores turn into dashes), so the
defaults below are the whole story of what a plain ``python examples/seq2seq/main.py`` does.
``--smoke`` swaps in :func:`smoke_overrides` first; flags given explicitly always win.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

CLIP_MODES = ("none", "global", "adaptive", "adaptive-per-module", "autoclip", "zclip")
ADAPTIVE_MODES = ("adaptive", "adaptive-per-module")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type for an integer >= ``minimum``: a count of 0 would otherwise crash
    late (a modulo or division by zero) or silently train nothing."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be an integer >= {minimum}, got {text!r}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def _finite_float(text: str, minimum: float, inclusive: bool) -> float:
    bound = f"{'>=' if inclusive else '>'} {minimum:g}"
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and (value >= minimum if inclusive else value > minimum)):
        raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0: a zero learning rate or threshold trains nothing."""
    return _finite_float(text, 0.0, inclusive=False)


def non_negative_float(text: str) -> float:
    return _finite_float(text, 0.0, inclusive=True)


def probability(text: str) -> float:
    """A number in [0, 1]."""
    value = _finite_float(text, 0.0, inclusive=True)
    if value > 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}")
    return value


def compare_modes(text: str) -> list[str]:
    """The clip modes of ``--compare`` (comma-separated), checked."""
    modes = [mode.strip() for mode in text.split(",") if mode.strip()]
    unknown = [mode for mode in modes if mode not in CLIP_MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(
            f"unknown clip modes {unknown or [text]}; choose from {', '.join(CLIP_MODES)}"
        )
    repeated = sorted({mode for mode in modes if modes.count(mode) > 1})
    if repeated:
        # Each mode trains into a directory of its own name.
        raise argparse.ArgumentTypeError(f"clip modes {repeated} given more than once")
    return modes


def _compare_flag(text: str) -> str:
    compare_modes(text)
    return text


def option(
    default: object,
    help_text: str,
    *,
    parse: Callable[[str], object] | None = None,
    choices: Sequence[str] | None = None,
    clip: Sequence[str] | None = None,
) -> Any:
    """A :class:`Config` field with what its ``--flag`` needs: help text, a checking parser
    or choices, and the ``--clip`` modes it applies to (unset: all)."""
    metadata = {"help": help_text, "parse": parse, "choices": choices, "clip": clip}
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a training run depends on; each field's help is its ``--help`` text."""

    # --- data -----------------------------------------------------------------------------
    data: str | None = option(
        None, "Tab-separated sentence pairs (source TAB target); unset: generated number words."
    )
    number_min: int = option(
        0, "Smallest number of the generated English -> French number-word task."
    )
    number_max: int = option(999_999, "Largest number of the generated number-word task.")
    train_size: int = option(
        30_000,
        "Training pairs sampled from the number range (disjoint from the test numbers).",
        parse=positive_int,
    )
    test_size: int = option(2_000, "Held-out pairs used for evaluation.", parse=positive_int)
    data_seed: int = option(0, "Seed of the train/test split.", parse=non_negative_int)
    max_length: int = option(
        10,
        "TSV only: keep pairs whose two sides have fewer than this many tokens.",
        parse=positive_int,
    )
    prefix_filter: bool = option(
        False, 'TSV only: keep only pairs whose English side starts like "i am", "he is", ...'
    )
    reverse: bool = option(False, "TSV only: translate from the second column to the first.")

    # --- model ----------------------------------------------------------------------------
    embed_dim: int = option(64, "Width of the token embeddings.", parse=positive_int)
    hidden_dim: int = option(
        128, "Width of the GRU states (each encoder direction and the decoder).", parse=positive_int
    )
    attention_dim: int = option(
        128, "Width of the additive-attention hidden layer.", parse=positive_int
    )
    cell: str = option(
        "gru",
        "Recurrent cell of encoder and decoder: a GRU or a vanilla tanh RNN.",
        choices=("gru", "rnn"),
    )

    # --- optimisation ---------------------------------------------------------------------
    seed: int = option(
        0,
        "Seed of parameter initialisation and of the order training batches are drawn in.",
        parse=non_negative_int,
    )
    batch_size: int = option(
        128,
        "Global batch, split over all devices (must be divisible by their count).",
        parse=positive_int,
    )
    num_steps: int = option(800, "Number of optimizer steps.", parse=positive_int)
    learning_rate: float = option(
        3e-3, "Peak Adam learning rate (linear warm-up, then cosine decay).", parse=positive_float
    )
    warmup_steps: int = option(
        100, "Steps of linear learning-rate warm-up.", parse=non_negative_int
    )

    # --- gradient clipping ------------------------------------------------------------------
    clip: str = option(
        "adaptive",
        "Gradient clipping in front of Adam; autoclip and zclip run at the library's defaults.",
        choices=CLIP_MODES,
    )
    max_norm: float = option(
        1.0, "Constant threshold of the global norm.", parse=positive_float, clip=("global",)
    )
    window: int = option(
        32,
        "Number of past gradient norms the threshold is computed from.",
        parse=int_at_least(2),
        clip=ADAPTIVE_MODES,
    )
    num_std: float = option(
        1.0,
        "Clip when the norm exceeds mean + num_std * std of the window.",
        parse=non_negative_float,
        clip=ADAPTIVE_MODES,
    )
    min_history: int | None = option(
        None,
        "Norms needed before the adaptive threshold is trusted, at most --window "
        "(library default if unset).",
        parse=int_at_least(2),
        clip=ADAPTIVE_MODES,
    )
    warmup_max_norm: float | None = option(
        None,
        "Fixed threshold applied while the history is too short (none if unset).",
        parse=positive_float,
        clip=ADAPTIVE_MODES,
    )
    record: str = option(
        "raw",
        "Which norm enters the history: the raw one, or the one after clipping.",
        choices=("raw", "clipped"),
        clip=ADAPTIVE_MODES,
    )
    nonfinite: str = option(
        "impute",
        "What to do with a non-finite gradient norm.",
        choices=("impute", "zero", "propagate"),
        clip=ADAPTIVE_MODES,
    )

    # --- loop and outputs -------------------------------------------------------------------
    out: str = option(
        "runs/seq2seq", "Directory for metrics.jsonl, eval.jsonl, summary.json and the plots."
    )
    eval_every: int = option(
        100,
        "Evaluate on the held-out set every this many steps (and at the end).",
        parse=positive_int,
    )
    log_every: int = option(
        50,
        "Copy device metrics to the host and refresh the progress bar every this many steps.",
        parse=positive_int,
    )
    eval_batch_size: int = option(
        1_000,
        "Sentences per greedy-decoding call (rounded up to a multiple of the device count).",
        parse=positive_int,
    )
    num_samples: int = option(
        3, "Sample translations printed at each evaluation.", parse=non_negative_int
    )
    checkpoint_dir: str | None = option(None, "Orbax checkpoint directory; unset: no checkpoints.")
    checkpoint_every: int = option(
        200, "Save a checkpoint every this many steps (and at the end).", parse=positive_int
    )
    resume: bool = option(
        False,
        "Continue from the newest checkpoint in --checkpoint-dir; every flag that changes "
        "what is trained must be as in the checkpointed run.",
    )
    stop_at: int | None = option(
        None,
        "Stop after this step as if interrupted, to exercise --resume; unset: run on.",
        parse=positive_int,
    )
    compare: str | None = option(
        None,
        "Comma-separated clip modes to train one after another and draw together.",
        parse=_compare_flag,
    )
    smoke: bool = option(False, "Tiny configuration for tests: finishes in seconds.")
    quiet: bool = option(False, "Hide the progress bar.")


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


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def help_text(field: dataclasses.Field) -> str:
    """The field's help, the ``--clip`` modes it is limited to, and its default."""
    text = field.metadata["help"]
    if field.metadata["clip"]:
        text += f" Only for --clip {' and '.join(field.metadata['clip'])}."
    return f"{text} (default: {field.default!r})"


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one flag per :class:`Config` field; unset flags stay absent."""
    parser = argparse.ArgumentParser(
        description="GRU seq2seq translation with adaptive gradient clipping.",
        argument_default=argparse.SUPPRESS,
    )
    hints = typing.get_type_hints(Config)
    for field in dataclasses.fields(Config):
        value_type, _ = _flag_type(hints[field.name])
        options: dict[str, Any] = {"help": help_text(field)}
        if value_type is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif field.metadata["choices"]:
            options["choices"] = field.metadata["choices"]
        else:
            options["type"] = field.metadata["parse"] or value_type
        parser.add_argument(flag_name(field.name), **options)
    return parser


def clip_modes(config: Config) -> list[str]:
    """The clip modes a run trains: those of ``--compare`` if given, else ``--clip``."""
    return compare_modes(config.compare) if config.compare else [config.clip]


def modes_using(field_name: str) -> Sequence[str] | None:
    """The ``--clip`` modes a :class:`Config` field applies to; ``None``: all of them."""
    return Config.__dataclass_fields__[field_name].metadata["clip"]


def applies_to(field_name: str, modes: Sequence[str]) -> bool:
    """Whether a :class:`Config` field has an effect in a run of any of ``modes``."""
    used_by = modes_using(field_name)
    return not used_by or bool(set(modes) & set(used_by))


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest existing part of ``path`` if it is not a directory (nothing can go there).

    A dangling symlink counts as existing, and one that loops as no directory.
    """
    for part in (path, *path.parents):
        if os.path.lexists(part):
            return None if os.path.isdir(part) else part
    return None


def config_errors(config: Config) -> list[str]:
    """What is wrong with a combination of flags, found before any data is generated."""
    errors = []
    modes = clip_modes(config)
    # --compare writes each mode's run into a sub-directory of its own.
    run_names = modes if config.compare else [""]
    for flag, directory in (("--out", config.out), ("--checkpoint-dir", config.checkpoint_dir)):
        blockers = {_file_in_the_way(Path(directory, name)) for name in run_names if directory}
        for blocker in sorted(blockers - {None}):
            errors.append(f"{flag} {directory}: {blocker} exists and is not a directory")
    uses_history = applies_to("min_history", modes)
    if uses_history and config.min_history is not None and config.min_history > config.window:
        errors.append(f"--min-history {config.min_history} exceeds --window {config.window}")
    population = config.number_max - config.number_min + 1
    if config.data is None and config.train_size + config.test_size > population:
        errors.append(
            f"--train-size + --test-size = {config.train_size + config.test_size} exceeds the "
            f"{max(population, 0)} numbers in [--number-min, --number-max]"
        )
    if config.resume and config.checkpoint_dir is None:
        errors.append("--resume needs --checkpoint-dir: the directory to resume from")
    return errors


def config_warnings(config: Config, given: Sequence[str]) -> list[str]:
    """Flags the user gave that will have no effect."""
    warnings = []
    if config.stop_at is not None and config.checkpoint_dir is None:
        warnings.append("--stop-at without --checkpoint-dir: nothing is saved to --resume from")
    if config.compare and "clip" in given:
        warnings.append("--clip has no effect with --compare, which trains each of its modes")
    if config.data is None:
        ignored, reason = ("max_length", "prefix_filter", "reverse"), "without --data"
        applies = "a --data file"
    else:
        ignored, reason = ("number_min", "number_max", "train_size"), "with --data"
        applies = "the generated number words"
    for name in ignored:
        if name in given:
            warnings.append(f"{flag_name(name)} has no effect {reason} (it applies to {applies})")
    modes = clip_modes(config)
    for name in (field.name for field in dataclasses.fields(Config)):
        if name in given and not applies_to(name, modes):
            warnings.append(
                f"{flag_name(name)} has no effect with --clip {', '.join(modes)} "
                f"(it applies to --clip {' and '.join(modes_using(name))} only)"
            )
    return warnings


def parse_config(argv: Sequence[str] | None = None) -> Config:
    """Defaults, then ``--smoke`` overrides if asked for, then the flags the user gave."""
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    config = Config()
    if given.get("smoke", False):
        config = dataclasses.replace(config, **smoke_overrides())
    config = dataclasses.replace(config, **given)
    errors = config_errors(config)
    if errors:
        parser.error("; ".join(errors))
    for warning in config_warnings(config, list(given)):
        print(f"warning: {warning}", file=sys.stderr)
    return config
