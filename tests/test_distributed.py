"""Sharded and multi-process runs of ``adaptive_clip`` agree with the single-device run.

Both scenarios need a JAX runtime configured differently from this process
(8 virtual CPU devices; a two-process cluster), so each runs in subprocesses
with their own environment, bounded by a timeout so that a hang fails the test
instead of stalling CI. This process keeps its default single device.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

TESTS_DIR = Path(__file__).resolve().parent
# Generous: two JAX processes compile on a shared 2-core machine; a hang still ends here.
SUBPROCESS_TIMEOUT_SECONDS = 300
# Compiles each clipper inside and outside shard_map.
SHARD_MAP_TIMEOUT_SECONDS = 300
# float32 rounding: the layouts sum the same numbers in different orders.
RTOL = 2e-5
ATOL = 1e-6


def subprocess_env(device_count: int | None = None) -> dict[str, str]:
    """This environment, on CPU, with ``device_count`` virtual devices if given."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # Flags inherited from the caller could change the device count or the rounding.
    env.pop("XLA_FLAGS", None)
    if device_count is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={device_count}"
    return env


def load_worker(name: str) -> ModuleType:
    """Imports a helper script by path: ``tests`` is not a package."""
    spec = importlib.util.spec_from_file_location(name, TESTS_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_same_run(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    np.testing.assert_array_equal(actual["clipped"], expected["clipped"], "clip decisions")
    for key in ("norm", "threshold", "updates", "params"):
        np.testing.assert_allclose(actual[key], expected[key], rtol=RTOL, atol=ATOL, err_msg=key)


def run_on_eight_devices(worker: str, output: Path, timeout: float) -> None:
    """Runs ``tests/<worker> OUTPUT`` in a process that sees 8 virtual CPU devices."""
    completed = subprocess.run(
        [sys.executable, str(TESTS_DIR / worker), str(output)],
        env=subprocess_env(device_count=8),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-5000:]


def check_margins(run: dict[str, np.ndarray]) -> None:
    """The test data keep every norm well away from its threshold, so no decision can flip
    under float32 reordering; a failure here means the data, not the library, changed."""
    finite = np.isfinite(run["threshold"])
    relative_gap = np.abs(run["norm"] - run["threshold"])[finite] / run["threshold"][finite]
    assert relative_gap.min() > 1e-3
    assert run["clipped"].any() and not run["clipped"].all()


@pytest.mark.slow
def test_sharded_layouts_match_the_unsharded_run(tmp_path: Path) -> None:
    output = tmp_path / "sharded.npz"
    run_on_eight_devices("_sharded_worker.py", output, SUBPROCESS_TIMEOUT_SECONDS)
    with np.load(output) as saved:
        runs: dict[str, dict[str, np.ndarray]] = {}
        for key in saved.files:
            run_name, field = key.split("/")
            runs.setdefault(run_name, {})[field] = saved[key]

    reference = runs["reference"]
    check_margins(reference)
    # Summing the per-device contributions on one device gives the same run.
    assert_same_run(runs["reference_microbatched"], reference)
    for layout in ("fully_sharded", "data_and_model", "data_parallel"):
        assert_same_run(runs[layout], reference)
        assert runs[layout]["replicated"].all(), f"{layout}: clip state not replicated"
        assert int(runs[layout]["clip_count"]) == int(reference["clip_count"])


@pytest.mark.slow
def test_clippers_inside_shard_map_match_the_same_updates_outside(tmp_path: Path) -> None:
    """Inside ``shard_map`` with ``check_vma=True`` every clipper traces and runs.

    Clipping each device's own shard (the local style of ``optax.clip_by_global_norm``
    inside ``shard_map``, with per-device states) gives on every device what the
    same update gives outside ``shard_map`` on that shard; clipping a gradient
    summed inside ``shard_map`` keeps the state replicated and matches the run on
    the summed gradient, to float32 rounding (``psum`` may add in another order).
    """
    output = tmp_path / "shard_map.npz"
    run_on_eight_devices("_shard_map_worker.py", output, SHARD_MAP_TIMEOUT_SECONDS)
    worker = load_worker("_shard_map_worker")
    with np.load(output) as saved:
        for name in worker.make_clippers():
            for use in ("local", "data_parallel"):
                run = {
                    key: saved[f"{name}/{use}/{key}"]
                    for key in (
                        "events",
                        "inside_updates",
                        "outside_updates",
                        "inside_states",
                        "outside_states",
                    )
                }
                label = f"{name} ({use})"
                assert 0 < run["events"].sum() < worker.NUM_STEPS * run["events"].size, label
                for key in ("updates", "states"):
                    if use == "local":  # each device runs the very computation done outside
                        np.testing.assert_array_equal(
                            run[f"inside_{key}"], run[f"outside_{key}"], err_msg=f"{label}: {key}"
                        )
                    else:  # psum and sum may add the contributions in different orders
                        np.testing.assert_allclose(
                            run[f"inside_{key}"],
                            run[f"outside_{key}"],
                            rtol=RTOL,
                            atol=ATOL,
                            err_msg=f"{label}: {key}",
                        )
            np.testing.assert_array_equal(
                saved[f"{name}/local/inside_norms"],
                saved[f"{name}/local/outside_norms"],
                err_msg=f"{name}: global_norm",
            )
            assert saved[f"{name}/data_parallel/replicated"], f"{name}: state not replicated"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cpu_collectives_missing() -> str | None:
    """Why this jaxlib cannot run CPU collectives across processes, or None if it can.

    Only the absence of the gloo bindings counts; any other problem must fail the test.
    """
    try:
        from jax._src.lib import _jax as jaxlib_extension
    except ImportError:
        # A jaxlib laid out differently: try the run rather than skip it.
        return None
    if not hasattr(jaxlib_extension, "make_gloo_tcp_collectives"):
        return "this jaxlib was built without gloo CPU collectives"
    return None


@pytest.mark.slow
@pytest.mark.skipif(cpu_collectives_missing() is not None, reason=str(cpu_collectives_missing()))
def test_two_processes_match_one(tmp_path: Path) -> None:
    num_processes = 2
    port = free_port()
    output = tmp_path / "multihost.npz"
    logs = [tmp_path / f"process_{index}.log" for index in range(num_processes)]
    processes = []
    for process_id, log_path in enumerate(logs):
        with log_path.open("w") as log:
            processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        str(TESTS_DIR / "_multihost_worker.py"),
                        str(process_id),
                        str(num_processes),
                        str(port),
                        str(output),
                    ],
                    env=subprocess_env(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        return_codes = [process.wait(timeout=SUBPROCESS_TIMEOUT_SECONDS) for process in processes]
    except subprocess.TimeoutExpired:
        return_codes = None
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    transcript = "\n".join(f"--- {path.name}\n{path.read_text()[-3000:]}" for path in logs)
    assert return_codes is not None, f"timed out after {SUBPROCESS_TIMEOUT_SECONDS} s\n{transcript}"
    assert return_codes == [0] * num_processes, transcript

    worker = load_worker("_multihost_worker")
    reference = worker.run_single_process()
    check_margins(reference)
    np.testing.assert_array_equal(reference["clip_count"], np.cumsum(reference["clipped"]))
    with np.load(output) as saved:
        assert_same_run(dict(saved), reference)
        np.testing.assert_array_equal(saved["clip_count"], reference["clip_count"])
