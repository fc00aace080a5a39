"""How much of a train step the clipping costs: step time per ``--clip`` mode.

All modes are compiled first, then timed in interleaved rounds (mode A, mode B, ..., A, B,
...), so a change in machine load during the measurement hits every mode alike. Each round
runs ``--steps`` steps back to back and waits for the last one. Prints, and writes to
``--out``, the median milliseconds per step of each mode.

    python examples/seq2seq/time_clipping.py --modes none,adaptive --rounds 5 --steps 20
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `examples.seq2seq` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from examples.seq2seq import data as data_lib
from examples.seq2seq import train
from examples.seq2seq.config import CLIP_MODES, Config, compare_modes, positive_int


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--modes",
        type=compare_modes,
        default="none,adaptive",
        help=f"comma-separated --clip modes to time, from {', '.join(CLIP_MODES)}",
    )
    parser.add_argument("--rounds", type=positive_int, default=5, help="timed rounds per mode")
    parser.add_argument("--steps", type=positive_int, default=20, help="steps per round")
    parser.add_argument("--train-size", type=positive_int, default=2_000, help="training pairs")
    parser.add_argument("--out", default=None, help="optional JSON file for the results")
    args = parser.parse_args(argv)

    base = dataclasses.replace(Config(), train_size=args.train_size, test_size=10)
    dataset = data_lib.load_dataset(base)
    batch_sharding = None
    runners = {}
    for mode in args.modes:
        config = dataclasses.replace(base, clip=mode)
        model = train.build_model(config, dataset)
        graphdef, param_state = nnx.split(model, nnx.Param)
        params = nnx.to_pure_dict(param_state)
        optimizer = train.make_optimizer(config)
        programs = train.make_programs(config, graphdef, optimizer, dataset.max_target_length)
        batch_sharding = programs.batch_sharded  # the same mesh for every mode
        params = jax.device_put(params, programs.replicated)
        opt_state = jax.tree.map(
            jax.numpy.copy, jax.device_put(optimizer.init(params), programs.replicated)
        )
        runners[mode] = [programs.train_step, params, opt_state]
    batches = [
        jax.device_put(
            data_lib.train_batch(dataset.train, step, base.batch_size, base.seed),
            batch_sharding,
        )
        for step in range(args.steps)
    ]

    def run(mode: str) -> float:
        """Seconds per step over one round of ``args.steps`` steps of ``mode``."""
        step_fn, params, opt_state = runners[mode]
        began = time.perf_counter()
        for batch in batches:
            params, opt_state, metrics = step_fn(params, opt_state, batch)
        jax.block_until_ready((params, opt_state, metrics))
        runners[mode][1:] = [params, opt_state]
        return (time.perf_counter() - began) / len(batches)

    for mode in runners:  # compile and warm up
        run(mode)
    timings: dict[str, list[float]] = {mode: [] for mode in runners}
    for _ in range(args.rounds):
        for mode in runners:
            timings[mode].append(run(mode))
    results = {
        mode: {"median_step_ms": 1e3 * float(np.median(t)), "rounds_ms": [1e3 * x for x in t]}
        for mode, t in timings.items()
    }
    for mode, result in results.items():
        print(f"{mode:>22}: {result['median_step_ms']:.1f} ms/step (median of {args.rounds})")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
