"""The CLI reports every error as one line `trl-jax: error: ...`: exit 2 for config/usage errors, 1 for runtime
errors, the traceback only with --debug."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from trl_jax import cli
from trl_jax.train.checkpoint import LOCK_NAME

DATA = ["--dataset_name", "builtin:arithmetic_sft", "--disable_tqdm", "true"]


def _run(capsys, argv):
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("trl-jax: error:")]
    assert len(lines) == 1, err
    return code, lines[0], err


@pytest.mark.parametrize("argv,pattern", [
    (["sft", "--max_stepz", "3"], "Did you mean `max_steps`"),
    (["sft", "--learning_rate", "-2e-3"], "`learning_rate` must be a finite number >= 0"),
    (["sft", "--per_device_train_batch_size", "0"], "`per_device_train_batch_size` must be a positive integer"),
    (["sft", "--max_length", "0"], "`max_length` must be a positive integer"),
    (["dpo", "--loss_type", "sigmod"], "Unknown DPO `loss_type` \\['sigmod'\\]. Did you mean 'sigmoid'"),
    (["kto", "--loss_type", "dpo"], "`loss_type` must be one of \\('kto', 'apo_zero_unpaired'\\)"),
    (["sft", "--config", "no/such/config.yaml"], "--config 'no/such/config.yaml': no such file"),
    (["sft", "positional"], "unexpected argument 'positional'"),
])
def test_config_errors_exit_2_with_one_line(capsys, tmp_path, argv, pattern):
    import re

    code, line, err = _run(capsys, argv + ["--output_dir", str(tmp_path)])
    assert code == 2 and re.search(pattern, line), line
    assert "Traceback" not in err


def test_float16_on_cpu_is_a_config_error(capsys, tmp_path):
    import jax

    if jax.default_backend() != "cpu":
        pytest.skip("float16 compiles on this backend")
    code, line, _ = _run(capsys, ["sft", "--compute_dtype", "float16", "--output_dir", str(tmp_path)])
    assert code == 2 and "compute_dtype='float32'" in line and "bfloat16" in line


def test_missing_model_path_names_it_and_what_was_expected(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, line, err = _run(capsys, ["sft", "--model_name_or_path", "my-model-dir", "--output_dir", "out"] + DATA)
    assert code == 2 and "Traceback" not in err
    assert "'my-model-dir'" in line and "config.json" in line and "Hub id" in line
    os.makedirs(tmp_path / "empty_dir")
    code, line, _ = _run(capsys, ["sft", "--model_name_or_path", "empty_dir", "--output_dir", "out"] + DATA)
    assert code == 2 and "'empty_dir' is a directory without config.json" in line


def test_output_dir_with_checkpoints_needs_resume_or_overwrite(capsys, tmp_path):
    os.makedirs(tmp_path / "checkpoints" / "2")
    code, line, _ = _run(capsys, ["sft", "--output_dir", str(tmp_path), "--model_name_or_path", "builtin:tiny-qwen3"]
                         + DATA)
    assert code == 2
    assert "--resume_from_checkpoint true" in line and "--overwrite_output_dir true" in line


def test_output_dir_in_use_is_a_runtime_error(capsys, tmp_path):
    with open(tmp_path / LOCK_NAME, "w") as f:
        json.dump({"pid": os.getppid(), "host": socket.gethostname(), "started": "2020-01-01T00:00:00"}, f)
    code, line, _ = _run(capsys, ["sft", "--output_dir", str(tmp_path)] + DATA)
    assert code == 1 and f"pid {os.getppid()}" in line and "in use" in line


def test_runtime_errors_exit_1_traceback_only_with_debug(capsys, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("something broke\nat some depth")

    monkeypatch.setattr(cli, "run_trainer", boom)
    code, line, err = _run(capsys, ["sft"])
    assert code == 1 and line == ("trl-jax: error: RuntimeError: something broke at some depth (rerun with --debug "
                                  "for the traceback)")
    assert "Traceback" not in err
    code, line, err = _run(capsys, ["sft", "--debug"])
    assert code == 1 and "Traceback (most recent call last)" in err and "boom" in err


def test_argparse_errors_are_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["sfft"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and err.startswith("trl-jax: error: argument command")


def test_process_exit_status(tmp_path):
    """The installed entry point's exit status (not just main's return value)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "trl_jax.cli", "sft", "--learnig_rate", "1e-3", "--output_dir",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("trl-jax: error: ") and "Traceback" not in proc.stderr


def test_dataset_that_is_not_found_is_a_usage_error(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, line, err = _run(capsys, ["sft", "--model_name_or_path", "builtin:tiny-qwen3", "--dataset_name",
                                    "./data/missing.jsonl", "--output_dir", "out"])
    assert code == 2 and "Traceback" not in err
    assert "dataset_name './data/missing.jsonl' was not found" in line and ".jsonl" in line and "builtin:NAME" in line


def test_resume_without_a_checkpoint_is_a_usage_error(capsys, tmp_path):
    code, line, _ = _run(capsys, ["sft", "--model_name_or_path", "builtin:tiny-qwen3", "--output_dir", str(tmp_path),
                                  "--resume_from_checkpoint", "true", "--max_steps", "1"] + DATA)
    assert code == 2 and "no checkpoint found" in line
