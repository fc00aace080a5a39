"""Tests of the GRU seq2seq example in examples/seq2seq (data, loader, training runs)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_DIR = REPO_ROOT / "examples" / "seq2seq"
# A hung subprocess fails its test instead of stalling the run.
SUBPROCESS_TIMEOUT = 600
SAMPLE_TSV = EXAMPLE_DIR / "sample_data" / "pairs.tsv"

if str(REPO_ROOT) not in sys.path:  # `pytest` alone puts tests/, not the root, on the path
    sys.path.insert(0, str(REPO_ROOT))

from examples.seq2seq import config as config_lib  # noqa: E402
from examples.seq2seq import data as data_lib  # noqa: E402


def small_number_config(**overrides) -> config_lib.Config:
    fields = {"number_max": 9_999, "train_size": 300, "test_size": 50, "data_seed": 3}
    return dataclasses.replace(config_lib.Config(), **{**fields, **overrides})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- data ------------------------------------------------------------------------------------


def test_numbers_are_deterministic_and_train_test_disjoint():
    train_a, test_a = data_lib.sample_numbers(0, 999_999, 5_000, 2_000, seed=7)
    train_b, test_b = data_lib.sample_numbers(0, 999_999, 5_000, 2_000, seed=7)
    np.testing.assert_array_equal(train_a, train_b)
    np.testing.assert_array_equal(test_a, test_b)
    assert len(set(train_a.tolist())) == 5_000 and len(set(test_a.tolist())) == 2_000
    assert not set(train_a.tolist()) & set(test_a.tolist())
    assert train_a.min() >= 0 and max(train_a.max(), test_a.max()) <= 999_999
    other_train, _ = data_lib.sample_numbers(0, 999_999, 5_000, 2_000, seed=8)
    assert not np.array_equal(train_a, other_train)
    with pytest.raises(ValueError, match="exceeds"):
        data_lib.sample_numbers(0, 9, 8, 3, seed=0)


def test_number_dataset_is_deterministic_with_fixed_shapes():
    first = data_lib.load_dataset(small_number_config())
    second = data_lib.load_dataset(small_number_config())
    np.testing.assert_array_equal(first.train.source, second.train.source)
    np.testing.assert_array_equal(first.test.target, second.test.target)
    assert first.source_vocab == second.source_vocab
    assert not set(first.train.source_text) & set(first.test.source_text)
    assert first.train.target.shape[1] == first.test.target.shape[1]
    # every target row is: tokens, one EOS, then padding only
    for row in first.test.target:
        eos = int(np.argmax(row == data_lib.EOS))
        assert row[eos] == data_lib.EOS and np.all(row[eos + 1 :] == data_lib.PAD)


def test_number_pairs_and_tokens():
    assert data_lib.number_pairs([997]) == [
        ("nine hundred and ninety-seven", "neuf cent quatre-vingt-dix-sept")
    ]
    assert data_lib.tokenize_number_words("ninety-nine thousand, two hundred") == [
        "ninety-nine",
        "thousand",
        ",",
        "two",
        "hundred",
    ]
    vocab = data_lib.Vocab.build([["un", "deux"], ["deux"]])
    ids = vocab.encode([["deux", "trois"]], 4)
    assert ids.tolist() == [[vocab.index["deux"], data_lib.UNK, data_lib.EOS, data_lib.PAD]]
    assert vocab.decode(ids[0]) == "deux <unk>"


def test_train_batches_depend_only_on_seed_and_step():
    dataset = data_lib.load_dataset(small_number_config())
    size = len(dataset.train)
    batch = data_lib.train_batch(dataset.train, 5, 64, seed=1)
    again = data_lib.train_batch(dataset.train, 5, 64, seed=1)
    for key in batch:
        np.testing.assert_array_equal(batch[key], again[key])
        assert batch[key].shape[0] == 64
    assert np.all(batch["decoder_input"][:, 0] == data_lib.BOS)
    np.testing.assert_array_equal(batch["decoder_input"][:, 1:], batch["target"][:, :-1])
    # one epoch of batches visits every training pair exactly once (size = 300 = 5 * 60)
    seen = np.concatenate(
        [data_lib.train_batch(dataset.train, s, 60, seed=1)["source"] for s in range(5)]
    )
    assert len({row.tobytes() for row in seen}) == len({r.tobytes() for r in dataset.train.source})
    assert seen.shape[0] == size


# --- the tab-separated loader --------------------------------------------------------------------


def test_normalize_sentence():
    assert data_lib.normalize_sentence("Je suis fatigué !") == "je suis fatigue !"
    assert data_lib.normalize_sentence("I'm cold.") == "i m cold ."
    assert data_lib.normalize_sentence("  Où est-ce?!  ") == "ou est ce ? !"
    assert data_lib.normalize_sentence("42 €") == ""


def test_sample_tsv_counts_malformed_and_filters():
    pairs, counts = data_lib.read_tsv_pairs(
        SAMPLE_TSV, max_length=10, prefix_filter=False, reverse=False
    )
    assert counts["lines"] == 18
    assert counts["malformed"] == 2  # no tab; empty source side
    assert counts["too_long"] == 1
    assert len(pairs) == 15
    assert ("i am hungry .", "j ai faim .") in pairs  # third column ignored
    assert ("he s a doctor .", "il est medecin .") in pairs

    reversed_pairs, _ = data_lib.read_tsv_pairs(SAMPLE_TSV, 10, False, reverse=True)
    assert ("j ai faim .", "i am hungry .") in reversed_pairs

    prefixed, prefix_counts = data_lib.read_tsv_pairs(SAMPLE_TSV, 10, True, reverse=False)
    assert all(source.startswith(data_lib.ENGLISH_PREFIXES) for source, _ in prefixed)
    assert prefix_counts["prefix_filtered"] == 4  # open, where, the cat, good morning
    assert len(prefixed) == 11


def test_tsv_invalid_utf8_is_counted_not_fatal(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_bytes(b"Hello.\tBonjour.\n\xff\xfe broken\tcasse\nno tab here\nBye.\tSalut.\n")
    pairs, counts = data_lib.read_tsv_pairs(path, 10, False, False)
    assert pairs == [("hello .", "bonjour ."), ("bye .", "salut .")]
    assert counts["malformed"] == 2


@pytest.mark.parametrize("content", [b"", b"\n  \n"])
def test_empty_tsv_is_a_clear_error(tmp_path, content):
    path = tmp_path / "empty.tsv"
    path.write_bytes(content)
    with pytest.raises(data_lib.DataError, match="empty"):
        data_lib.read_tsv_pairs(path, 10, False, False)


def test_unreadable_or_useless_tsv_is_a_clear_error(tmp_path):
    with pytest.raises(data_lib.DataError, match="cannot read"):
        data_lib.read_tsv_pairs(tmp_path / "missing.tsv", 10, False, False)
    useless = tmp_path / "useless.tsv"
    useless.write_text("no tabs\nat all\n")
    with pytest.raises(data_lib.DataError, match="no usable"):
        data_lib.read_tsv_pairs(useless, 10, False, False)


def test_tsv_dataset_holds_out_by_source_sentence():
    config = dataclasses.replace(config_lib.Config(), data=str(SAMPLE_TSV), test_size=2)
    dataset = data_lib.load_dataset(config)
    assert dataset.info["malformed"] == 2
    assert not set(dataset.train.source_text) & set(dataset.test.source_text)
    assert len(dataset.train) + len(dataset.test) == 15


# --- configuration ---------------------------------------------------------------------------


def test_flags_override_smoke_which_overrides_defaults():
    config = config_lib.parse_config(["--smoke", "--hidden-dim", "24", "--clip", "global"])
    assert config.smoke and config.hidden_dim == 24 and config.clip == "global"
    assert config.num_steps == config_lib.smoke_overrides()["num_steps"]
    assert config_lib.parse_config(["--min-history", "4"]).min_history == 4
    assert config_lib.parse_config([]) == config_lib.Config()
    with pytest.raises(SystemExit):
        config_lib.parse_config(["--clip", "sometimes"])


@pytest.mark.parametrize("value", ["0", "-5", "ten"])
def test_stop_at_below_one_is_rejected_by_the_parser(value, capsys):
    # --stop-at 0 used to train nothing and then crash drawing a figure with zero panels.
    with pytest.raises(SystemExit):
        config_lib.parse_config(["--smoke", "--stop-at", value])
    assert "argument --stop-at: must be an integer >= 1" in capsys.readouterr().err
    assert config_lib.parse_config(["--stop-at", "1"]).stop_at == 1


def test_help_shows_each_fields_text_and_the_clip_modes_it_applies_to(monkeypatch):
    # --help used to print only the defaults, though config.py said the comments were the help.
    monkeypatch.setenv("COLUMNS", "300")  # phrases are not wrapped
    text = config_lib.build_parser().format_help()
    for field in dataclasses.fields(config_lib.Config):
        assert field.metadata["help"] in text, field.name
    entries = [" ".join(entry.split()) for entry in text.split("\n  --")[1:]]
    lines = {"--" + entry.split()[0]: entry for entry in entries}
    assert "Only for --clip global." in lines["--max-norm"]
    for flag in ("--window", "--num-std", "--min-history", "--warmup-max-norm", "--record"):
        assert "Only for --clip adaptive and adaptive-per-module." in lines[flag], flag
    assert "(default: 1.0)" in lines["--max-norm"]
    assert "Only for" not in lines["--learning-rate"]


@pytest.mark.parametrize(
    "flag",
    [
        "--num-steps",
        "--batch-size",
        "--eval-every",
        "--log-every",
        "--checkpoint-every",
        "--eval-batch-size",
        "--train-size",
        "--test-size",
        "--embed-dim",
        "--hidden-dim",
        "--attention-dim",
        "--max-length",
    ],
)
def test_counts_below_one_are_rejected_by_the_parser(flag, capsys):
    # Each used to crash after data generation (a modulo or division by zero, an empty
    # range) or, for --batch-size 0, to "train" with a loss of 0.
    with pytest.raises(SystemExit):
        config_lib.parse_config(["--smoke", flag, "0"])
    assert f"argument {flag}: must be an integer >= 1, got 0" in capsys.readouterr().err
    assert getattr(config_lib.parse_config([flag, "7"]), flag[2:].replace("-", "_")) == 7


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--record", "clip"], "argument --record: invalid choice: 'clip'"),
        (["--nonfinite", "skip"], "argument --nonfinite: invalid choice: 'skip'"),
        (["--compare", "none,sometimes"], "argument --compare: unknown clip modes ['sometimes']"),
        (["--compare", ","], "argument --compare: unknown clip modes"),
        # Both runs would write the same subdirectory.
        (["--compare", "adaptive,none,adaptive"], "clip modes ['adaptive'] given more than once"),
        (["--window", "1"], "argument --window: must be an integer >= 2"),
        (["--min-history", "40"], "--min-history 40 exceeds --window 32"),
        (["--smoke", "--min-history", "20"], "--min-history 20 exceeds --window 16"),
        (["--learning-rate", "0"], "argument --learning-rate: must be a finite number > 0"),
        (["--max-norm", "-1"], "argument --max-norm: must be a finite number > 0"),
        (["--num-std", "nan"], "argument --num-std: must be a finite number >= 0"),
        (["--seed", "-1"], "argument --seed: must be an integer >= 0"),
        (["--warmup-steps", "-1"], "argument --warmup-steps: must be an integer >= 0"),
        (["--train-size", "999999", "--test-size", "2"], "exceeds the 1000000 numbers"),
    ],
)
def test_bad_flags_are_rejected_before_any_data_is_made(args, message, capsys):
    with pytest.raises(SystemExit):
        config_lib.parse_config(args)
    assert message in capsys.readouterr().err


def test_min_history_beyond_window_is_only_an_error_for_modes_that_use_them(capsys):
    # It used to stop a --clip global run, which ignores both flags (and warns so).
    config = config_lib.parse_config(["--clip", "global", "--min-history", "40"])
    assert config.min_history == 40
    assert "--min-history has no effect with --clip global" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        config_lib.parse_config(["--compare", "global,adaptive", "--min-history", "40"])
    assert "--min-history 40 exceeds --window 32" in capsys.readouterr().err


def test_record_and_nonfinite_choices_are_the_librarys():
    from optax_adaptive_clip import _clipping, _norms

    fields = {field.name: field for field in dataclasses.fields(config_lib.Config)}
    assert tuple(fields["record"].metadata["choices"]) == tuple(_clipping.RECORD_MODES)
    assert tuple(fields["nonfinite"].metadata["choices"]) == tuple(_norms.NONFINITE_MODES)


def test_resume_without_a_checkpoint_dir_is_rejected(capsys):
    # It used to train from step 0 and truncate the finished run's metrics.jsonl.
    with pytest.raises(SystemExit):
        config_lib.parse_config(["--smoke", "--resume"])
    assert "--resume needs --checkpoint-dir" in capsys.readouterr().err
    assert config_lib.parse_config(["--resume", "--checkpoint-dir", "ck"]).resume


def test_flags_without_effect_are_warned_about(capsys):
    config_lib.parse_config(["--stop-at", "5"])
    assert "--stop-at without --checkpoint-dir" in capsys.readouterr().err
    config_lib.parse_config(["--max-norm", "0.5"])  # adaptive by default: no fixed threshold
    assert "--max-norm has no effect with --clip adaptive" in capsys.readouterr().err
    config_lib.parse_config(["--clip", "zclip", "--window", "8"])
    assert "--window has no effect with --clip zclip" in capsys.readouterr().err
    config_lib.parse_config(["--compare", "none,global", "--num-std", "2"])
    assert "--num-std has no effect with --clip none, global" in capsys.readouterr().err
    config_lib.parse_config(["--clip", "zclip", "--compare", "none,global"])
    assert "--clip has no effect with --compare" in capsys.readouterr().err
    config_lib.parse_config(["--reverse"])  # it used to train English -> French silently
    assert "--reverse has no effect without --data (it applies to a --data file)" in (
        capsys.readouterr().err
    )
    config_lib.parse_config(["--data", "pairs.tsv", "--number-max", "99", "--train-size", "9"])
    warnings = capsys.readouterr().err
    assert "--number-max has no effect with --data" in warnings
    assert "--train-size has no effect with --data" in warnings
    for args in (
        ["--smoke"],  # --smoke sets --window, but the user did not
        ["--clip", "global", "--max-norm", "0.5"],
        ["--compare", "global,adaptive", "--window", "8", "--max-norm", "2"],
        ["--stop-at", "5", "--checkpoint-dir", "ck"],
        ["--data", "pairs.tsv", "--reverse", "--max-length", "8", "--prefix-filter"],
        ["--number-min", "5", "--number-max", "99999"],
    ):
        config_lib.parse_config(args)
        assert capsys.readouterr().err == "", args


def test_resume_compares_the_run_defining_flags_only():
    from examples.seq2seq import train

    saved = config_lib.Config(out="a", checkpoint_dir="ck", log_every=5)
    meta = {"step": 10, "seed": 0, "clip_steps": 1, "config": dataclasses.asdict(saved)}
    same_run = dataclasses.replace(
        saved, checkpoint_dir="ck2", log_every=7, eval_every=3, stop_at=20, quiet=True
    )
    assert train.resume_mismatches(same_run, meta) == []
    # The resumed run continues the logs in --out, so they must be the checkpointed run's.
    assert train.resume_mismatches(dataclasses.replace(saved, out="b"), meta) == [
        "--out 'a' in the checkpoint, 'b' now"
    ]
    # Flags the --clip mode ignores are not compared.
    global_run = dataclasses.replace(saved, clip="global")
    global_meta = {**meta, "config": dataclasses.asdict(global_run)}
    assert train.resume_mismatches(dataclasses.replace(global_run, window=8), global_meta) == []
    other = dataclasses.replace(saved, seed=7, num_steps=900, clip="global", quiet=True)
    assert train.resume_mismatches(other, meta) == [
        "--clip 'adaptive' in the checkpoint, 'global' now",
        "--num-steps 800 in the checkpoint, 900 now",
        "--seed 0 in the checkpoint, 7 now",
    ]
    # A checkpoint from before the config was saved: only its seed can be compared.
    old_meta = {"step": 10, "seed": 0, "clip_steps": 1}
    assert train.resume_mismatches(dataclasses.replace(saved, num_steps=900), old_meta) == []
    assert train.resume_mismatches(other, old_meta) == ["--seed 0 in the checkpoint, 7 now"]


def test_plots_help_is_help_not_a_run_directory(capsys):
    from examples.seq2seq import plots

    with pytest.raises(SystemExit) as exit_info:
        plots.main(["--help"])
    assert exit_info.value.code == 0
    assert "RUN_DIR" in capsys.readouterr().out


def test_plots_of_a_directory_without_metrics_is_a_clear_error(tmp_path, capsys):
    # It used to fail in matplotlib (a compare directory) or on saving (a mistyped path).
    from examples.seq2seq import plots

    (tmp_path / "global").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    for run_dir in (tmp_path, tmp_path / "missing", tmp_path / "empty"):
        with pytest.raises(SystemExit, match=r"no metrics\.jsonl"):
            plots.main([str(run_dir)])
    assert not (tmp_path / "loss.png").exists()
    with pytest.raises(SystemExit):  # it used to do nothing and exit 0
        plots.main([])
    assert "usage" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--out", "--checkpoint-dir"])
def test_an_output_directory_blocked_by_a_file_is_rejected_before_any_data_is_made(
    tmp_path, capsys, flag
):
    # --out ended in a traceback; --checkpoint-dir trained, then orbax's save failed and hung.
    (tmp_path / "a_file").write_text("")
    for directory in (tmp_path / "a_file", tmp_path / "a_file" / "below"):
        with pytest.raises(SystemExit):
            config_lib.parse_config(["--smoke", flag, str(directory)])
        message = f"{flag} {directory}: {tmp_path / 'a_file'} exists and is not a directory"
        assert message in capsys.readouterr().err
    config_lib.parse_config(["--smoke", flag, str(tmp_path / "new" / "dir")])
    # A dangling symlink is in the way too (mkdir failed on it after the data was made).
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(SystemExit):
        config_lib.parse_config(["--smoke", flag, str(tmp_path / "dangling")])
    assert "dangling exists and is not a directory" in capsys.readouterr().err
    # --compare writes into one sub-directory per mode; a file there hung the run as well.
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "none").write_text("")
    args = ["--smoke", "--compare", "none,global", flag, str(tmp_path / "runs")]
    with pytest.raises(SystemExit):
        config_lib.parse_config(args)
    assert f"{tmp_path / 'runs' / 'none'} exists and is not a directory" in capsys.readouterr().err


def test_an_unusable_data_file_is_an_error_naming_the_flag(tmp_path):
    # It used to end in a traceback of data.DataError.
    from examples.seq2seq import main

    (tmp_path / "empty.tsv").write_text("")
    for path in (tmp_path / "missing.tsv", tmp_path / "empty.tsv"):
        with pytest.raises(SystemExit, match=re.escape(f"error: --data {path}: ")):
            main.main(["--smoke", "--quiet", "--data", str(path), "--out", str(tmp_path / "o")])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # It used to call the library's global_norm() as a clipper, after making the data.
        (["--modes", "none,global_norm"], "argument --modes: unknown clip modes ['global_norm']"),
        (["--steps", "0"], "argument --steps: must be an integer >= 1, got 0"),
        (["--rounds", "0"], "argument --rounds: must be an integer >= 1, got 0"),
    ],
)
def test_time_clipping_checks_its_flags(args, message, capsys):
    from examples.seq2seq import time_clipping

    with pytest.raises(SystemExit):
        time_clipping.main(args)
    assert message in capsys.readouterr().err


def test_make_clipper_accepts_only_clip_modes():
    from examples.seq2seq import train

    assert train.make_clipper(config_lib.Config(clip="zclip")) is not None
    with pytest.raises(ValueError, match="--clip 'global_norm': choose from none, global"):
        train.make_clipper(config_lib.Config(clip="global_norm"))


def test_compare_table_shows_null_metrics_as_not_available():
    from examples.seq2seq import main

    summary = {
        "final_loss": None,  # a diverged run: its last losses were not finite
        "final_token_accuracy": 0.25,
        "final_exact_match": 0.0,
        "clip_steps": 0,
        "clip_fraction": 0.0,
        "step_time_ms": None,
        "wall_time_s": 1.0,
    }
    table = main.compare_table({"none": summary})
    assert "| none | n/a | 0.2500 | 0.0000 | 0 (0.0%) | n/a | 1.0 |" in table


# --- training runs -----------------------------------------------------------------------------


@pytest.mark.slow
def test_smoke_run_learns_and_writes_outputs(tmp_path):
    from examples.seq2seq import main

    summary = main.main(["--smoke", "--quiet", "--out", str(tmp_path)])
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(summary["steps"]))
    losses = [row["loss"] for row in rows]
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    for key in ("grad_norm", "norm", "threshold", "clipped", "clip_count", "lr"):
        assert key in rows[-1], key
    assert rows[-1]["threshold"] is not None and rows[-1]["threshold"] > 0
    assert summary["clip_steps"] == rows[-1]["clip_count"] == sum(r["clipped"] for r in rows)
    assert 0.0 <= summary["final_exact_match"] <= summary["final_token_accuracy"] <= 1.0
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["config"]["clip"] == "adaptive" and saved["steps_per_sec"] > 0
    assert len(read_jsonl(tmp_path / "eval.jsonl")) == 2
    for name in ("loss.png", "accuracy.png", "grad_norm.png"):
        assert (tmp_path / name).stat().st_size > 1_000


@pytest.mark.slow
def test_resume_gives_identical_results(tmp_path):
    """Train 40 steps straight; drop the final checkpoint; resume from step 20; compare."""
    from examples.seq2seq import main

    out, checkpoints = tmp_path / "run", tmp_path / "checkpoints"
    args = ["--smoke", "--quiet", "--num-steps", "40", "--eval-every", "1000", "--window", "8"]
    args += ["--checkpoint-every", "20", "--out", str(out), "--checkpoint-dir", str(checkpoints)]
    straight = main.main(args)
    straight_rows = read_jsonl(out / "metrics.jsonl")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["20", "40"]
    shutil.rmtree(checkpoints / "40")  # as if the run had died between steps 20 and 40

    resumed = main.main([*args, "--resume"])
    resumed_rows = read_jsonl(out / "metrics.jsonl")
    assert resumed["steps"] == 40
    assert resumed["params_sha256"] == straight["params_sha256"]
    assert resumed["final_exact_match"] == straight["final_exact_match"]
    assert [r["step"] for r in resumed_rows] == list(range(40))
    assert [r["loss"] for r in resumed_rows] == [r["loss"] for r in straight_rows]
    # the clip history came back too: same thresholds and clip counts after the restart
    assert [r["threshold"] for r in resumed_rows] == [r["threshold"] for r in straight_rows]
    assert resumed_rows[-1]["clip_count"] == straight_rows[-1]["clip_count"]
    assert resumed["clip_steps"] == straight["clip_steps"]


@pytest.mark.slow
def test_runs_data_parallel_on_eight_virtual_devices(tmp_path):
    """8 CPU devices, one clip history per module, checkpoints, and --stop-at."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    checkpoints = tmp_path / "checkpoints"
    args = [sys.executable, str(EXAMPLE_DIR / "main.py"), "--smoke", "--quiet"]
    args += ["--clip", "adaptive-per-module", "--num-steps", "20", "--stop-at", "12"]
    args += ["--out", str(tmp_path), "--checkpoint-dir", str(checkpoints)]
    done = subprocess.run(
        args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT
    )
    assert done.returncode == 0, done.stderr[-3_000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["devices"] == 8 and summary["steps"] == 12
    assert [p.name for p in checkpoints.iterdir()] == ["12"]
    last = read_jsonl(tmp_path / "metrics.jsonl")[-1]
    for key in ("encoder/threshold", "decoder/threshold", "encoder/clip_count", "decoder/norm"):
        assert key in last, key

    bad = subprocess.run(
        [*args, "--batch-size", "12"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert bad.returncode != 0
    assert "not divisible by the 8 devices" in bad.stderr


@pytest.mark.slow
def test_compare_draws_modes_together(tmp_path):
    from examples.seq2seq import main

    args = ["--smoke", "--quiet", "--num-steps", "20", "--eval-every", "1000"]
    summaries = main.main([*args, "--compare", "none,global", "--out", str(tmp_path)])
    assert set(summaries) == {"none", "global"}
    table = (tmp_path / "compare.md").read_text()
    assert "| none |" in table and "| global |" in table
    for name in ("compare_loss.png", "compare_accuracy.png", "compare_grad_norm.png"):
        assert (tmp_path / name).stat().st_size > 1_000
    assert summaries["global"]["last_clip_stats"]["threshold"] == 1.0
    assert (tmp_path / "none" / "summary.json").exists()

    # plots.py redraws the side-by-side figures from the directory (it used to refuse it).
    from examples.seq2seq import plots

    drawn_by_main = (tmp_path / "compare_loss.png").read_bytes()
    for name in ("compare_loss.png", "compare_accuracy.png", "compare_grad_norm.png"):
        (tmp_path / name).unlink()
    assert list(plots.compare_runs(tmp_path)) == ["none", "global"]  # compare.md's order
    plots.main([str(tmp_path)])
    for name in ("compare_loss.png", "compare_accuracy.png", "compare_grad_norm.png"):
        assert (tmp_path / name).stat().st_size > 1_000
    assert (tmp_path / "compare_loss.png").read_bytes() == drawn_by_main


@pytest.mark.slow
def test_resume_of_a_finished_run_reports_it_again(tmp_path):
    """--resume when the newest checkpoint is the last step: no step runs, nothing is logged
    twice, and the summary has the finished run's metrics (it used to crash on a null loss)."""
    from examples.seq2seq import main

    out, checkpoints = tmp_path / "run", tmp_path / "checkpoints"
    args = ["--smoke", "--quiet", "--num-steps", "20", "--eval-every", "10", "--log-every", "5"]
    args += ["--checkpoint-every", "10", "--out", str(out), "--checkpoint-dir", str(checkpoints)]
    finished = main.main(args)
    logs = {name: (out / name).read_text() for name in ("metrics.jsonl", "eval.jsonl")}
    for _ in range(2):  # each try used to append another row for the last step to eval.jsonl
        resumed = main.main([*args, "--resume"])
        for name, text in logs.items():
            assert (out / name).read_text() == text, name
    assert resumed["final_loss"] is not None
    for key in ("steps", "final_loss", "final_token_accuracy", "final_exact_match"):
        assert resumed[key] == finished[key], key
    for key in ("clip_steps", "last_clip_stats", "params_sha256"):
        assert resumed[key] == finished[key], key
    assert json.loads((out / "summary.json").read_text())["final_loss"] == finished["final_loss"]


@pytest.mark.slow
def test_stop_between_evaluations_evaluates_the_last_step(tmp_path):
    """--stop-at after an evaluation: the final accuracy is measured at the step the run
    stopped at (it used to be the earlier evaluation's)."""
    from examples.seq2seq import main

    args = ["--smoke", "--quiet", "--num-steps", "30", "--eval-every", "10"]
    args += ["--out", str(tmp_path), "--checkpoint-dir", str(tmp_path / "checkpoints")]
    summary = main.main([*args, "--stop-at", "15"])
    evals = read_jsonl(tmp_path / "eval.jsonl")
    assert summary["steps"] == 15
    assert [row["step"] for row in evals] == [10, 15]
    assert summary["final_token_accuracy"] == evals[-1]["token_accuracy"]
    assert summary["final_exact_match"] == evals[-1]["exact_match"]

    # Resumed with the same stop: nothing runs, and the evaluation at 15 is reported again.
    again = main.main([*args, "--stop-at", "15", "--resume"])
    assert [row["step"] for row in read_jsonl(tmp_path / "eval.jsonl")] == [10, 15]
    assert again["final_exact_match"] == summary["final_exact_match"]
    # Resumed to the end: the evaluation made only for the stop goes (it used to stay).
    main.main([*args, "--resume"])
    assert [row["step"] for row in read_jsonl(tmp_path / "eval.jsonl")] == [10, 20, 30]


@pytest.mark.slow
def test_diverged_run_finishes_with_a_null_loss(tmp_path, capsys):
    """A learning rate of 1e30 makes the loss non-finite (logged as null) within a few steps;
    the progress bar and the printed summary used to crash formatting the null."""
    from examples.seq2seq import main

    args = ["--smoke", "--num-steps", "10", "--clip", "none", "--learning-rate", "1e30"]
    summary = main.main([*args, "--out", str(tmp_path)])
    assert read_jsonl(tmp_path / "metrics.jsonl")[-1]["loss"] is None
    assert summary["final_loss"] is None
    assert "loss n/a" in capsys.readouterr().out


@pytest.mark.slow
def test_resume_refuses_other_flags_and_says_when_there_is_no_checkpoint(tmp_path, capsys):
    from examples.seq2seq import main

    out, checkpoints = tmp_path / "run", tmp_path / "checkpoints"
    args = ["--smoke", "--quiet", "--num-steps", "20", "--eval-every", "1000", "--window", "8"]
    args += ["--out", str(out), "--checkpoint-dir", str(checkpoints)]
    main.main([*args, "--stop-at", "10"])
    logged = (out / "metrics.jsonl").read_text()
    for extra, messages in [
        (["--seed", "7"], ["--seed 0 in the checkpoint, 7 now"]),
        (
            ["--num-std", "2", "--num-steps", "30"],
            [
                "--num-std 1.0 in the checkpoint, 2.0 now",
                "--num-steps 20 in the checkpoint, 30 now",
            ],
        ),
        # another optimizer state: used to fail in orbax with a tree dump naming no flag
        (["--clip", "global"], ["--clip 'adaptive' in the checkpoint, 'global' now"]),
    ]:
        with pytest.raises(SystemExit, match="made with other flags") as refused:
            main.main([*args, "--resume", *extra])
        for message in messages:
            assert message in str(refused.value), extra
        assert (out / "metrics.jsonl").read_text() == logged  # the run's logs are kept

    # A mistyped --checkpoint-dir: starting over would overwrite the run's logs.
    empty = tmp_path / "empty"
    with pytest.raises(SystemExit, match=f"no checkpoint in {empty}, but {out} holds"):
        main.main([*args, "--checkpoint-dir", str(empty), "--resume"])
    assert (out / "metrics.jsonl").read_text() == logged

    capsys.readouterr()
    fresh = [*args, "--out", str(tmp_path / "fresh"), "--checkpoint-dir", str(empty)]
    summary = main.main([*fresh, "--resume", "--stop-at", "3"])
    assert f"no checkpoint in {empty}: starting from step 0" in capsys.readouterr().out
    assert summary["steps"] == 3


@pytest.mark.slow
def test_checkpoint_saving_is_not_step_time(tmp_path, monkeypatch):
    """A save that takes a second must not show in step_time_ms (it used to: the time from
    the save to the next log was counted as steps)."""
    import time

    from examples.seq2seq import main, train

    save = train.save_checkpoint

    def slow_save(*args, **kwargs):
        save(*args, **kwargs)
        time.sleep(2.0)

    monkeypatch.setattr(train, "save_checkpoint", slow_save)
    args = ["--smoke", "--quiet", "--num-steps", "20", "--eval-every", "1000"]
    args += ["--checkpoint-every", "5", "--out", str(tmp_path)]
    summary = main.main([*args, "--checkpoint-dir", str(tmp_path / "checkpoints")])
    # 3 of the saves fall in the 15 timed steps: 400 ms a step if they were counted, against
    # a few ms for a smoke step, so that a loaded machine does not fail the test.
    assert summary["step_time_ms"] < 200
