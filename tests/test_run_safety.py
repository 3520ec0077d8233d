"""Run safety: one run per output_dir (lock), the up-front checkpoint check and overwrite_output_dir,
log_history.jsonl cut back on resume, skipped non-finite updates, checkpoint save failures, save_total_limit."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trl_jax.configs import SFTConfig, UsageError
from trl_jax.data.loading import load_dataset_any
from trl_jax.train.checkpoint import (
    LOCK_NAME,
    Checkpointer,
    CheckpointSaveError,
    OutputDirInUseError,
    OutputDirLock,
    StaleLockWarning,
    check_output_dir,
)
from trl_jax.trainers import SFTTrainer
from trl_jax.trainers.logging import truncate_jsonl

MODEL = "builtin:tiny-qwen3"


@pytest.fixture(scope="module", autouse=True)
def _cache(trl_jax_cache):
    return trl_jax_cache


@pytest.fixture(scope="module")
def train_data():
    return load_dataset_any("builtin:arithmetic_sft").select(range(64))


def _args(out, **kw):
    base = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=1, learning_rate=3e-3, max_length=48,
                logging_steps=1, save_steps=2, bf16=False, gradient_checkpointing=False, disable_tqdm=True)
    base.update(kw)
    return SFTConfig(**base)


class StopAt:
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def _jsonl_steps(out):
    with open(os.path.join(out, "log_history.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def _ckpt_files(out):
    names = os.listdir(os.path.join(out, "checkpoints"))
    steps = sorted(int(n) for n in names if n.isdigit())
    counters = sorted(int(n[len("trainer_state-"):-len(".json")]) for n in names if n.startswith("trainer_state-"))
    return steps, counters


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(out, **info):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, LOCK_NAME), "w") as f:
        json.dump(info, f)


# ---------------------------------------------------------------------------------------------------- lock
def test_lock_is_exclusive_names_the_holder_and_is_released(tmp_path):
    lock = OutputDirLock(tmp_path).acquire()
    info = json.load(open(tmp_path / LOCK_NAME))
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["started"]
    with pytest.raises(OutputDirInUseError) as err:
        OutputDirLock(tmp_path).acquire()
    msg = str(err.value)
    assert f"pid {os.getpid()}" in msg and socket.gethostname() in msg and info["started"] in msg
    assert "choose another output_dir" in msg
    lock.release()
    assert not os.path.exists(tmp_path / LOCK_NAME)
    with OutputDirLock(tmp_path):  # free again
        assert os.path.exists(tmp_path / LOCK_NAME)
    assert not os.path.exists(tmp_path / LOCK_NAME)


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path):
    pid = _dead_pid()
    _write_lock(tmp_path, pid=pid, host=socket.gethostname(), started="2020-01-01T00:00:00")
    with pytest.warns(StaleLockWarning, match=f"pid {pid}"):
        lock = OutputDirLock(tmp_path).acquire()
    assert json.load(open(tmp_path / LOCK_NAME))["pid"] == os.getpid()
    lock.release()


def test_lock_of_another_host_or_unreadable_is_not_taken(tmp_path):
    _write_lock(tmp_path, pid=1, host="other-host.example", started="2020-01-01T00:00:00")
    with pytest.raises(OutputDirInUseError, match="other-host.example.*another host"):
        OutputDirLock(tmp_path).acquire()
    with open(tmp_path / LOCK_NAME, "w") as f:
        f.write("{not json")
    with pytest.raises(OutputDirInUseError, match="unreadable lock file"):
        OutputDirLock(tmp_path).acquire()


def test_lock_between_two_processes_then_stale_after_kill(tmp_path):
    """A second process holds the lock: we are refused. It is killed (-9, no cleanup): we take over."""
    code = textwrap.dedent(f"""
        import sys
        from trl_jax.train.checkpoint import OutputDirLock
        OutputDirLock({str(tmp_path)!r}).acquire()
        print("locked", flush=True)
        sys.stdin.read()
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirInUseError, match=f"pid {proc.pid}.*still running"):
            OutputDirLock(tmp_path).acquire()
        with pytest.raises(OutputDirInUseError):
            check_output_dir(tmp_path)
    finally:
        proc.kill()
        proc.wait()
    with pytest.warns(StaleLockWarning):
        OutputDirLock(tmp_path).acquire().release()


def test_train_refuses_an_output_dir_held_by_a_live_run(tmp_path, train_data):
    _write_lock(tmp_path, pid=os.getppid(), host=socket.gethostname(), started="2020-01-01T00:00:00")
    trainer = SFTTrainer(MODEL, args=_args(tmp_path), train_dataset=train_data)
    with pytest.raises(OutputDirInUseError, match=f"pid {os.getppid()}"):
        trainer.train()
    assert trainer.state is None and not os.path.exists(tmp_path / "checkpoints")  # nothing was trained
    assert json.load(open(tmp_path / LOCK_NAME))["pid"] == os.getppid()  # the other run's lock is untouched


# ---------------------------------------------------------------------------------------------------- resume/overwrite
def test_truncate_jsonl_keeps_steps_up_to_the_resumed_one(tmp_path):
    path = tmp_path / "log_history.jsonl"
    lines = [json.dumps({"loss": 1.0, "step": s}) for s in (1, 2, 3, 2, 3, 4)] + ['{"loss": 1.0, "st']
    path.write_text("\n".join(lines))
    assert truncate_jsonl(str(path), 2) == 3
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 2]
    assert truncate_jsonl(str(path), 0) == 0 and path.read_text() == ""


def test_checkpointed_output_dir_needs_resume_or_overwrite(tmp_path, train_data):
    out = tmp_path / "run"
    # A run killed at step 5 (after the checkpoint at 4); save_total_limit=1 keeps one checkpoint and its counters.
    first = SFTTrainer(MODEL, args=_args(out, save_total_limit=1), train_dataset=train_data, callbacks=[StopAt(5)])
    assert first.train().global_step == 5
    assert _jsonl_steps(out) == [1, 2, 3, 4, 5]
    assert _ckpt_files(out) == ([4], [4])
    assert not os.path.exists(out / LOCK_NAME)
    model_params = (first.model, first.state.params)

    # Re-run without resume: refused before anything is trained, naming both fixes.
    again = SFTTrainer(model_params, args=_args(out, save_total_limit=1), train_dataset=train_data,
                       processing_class=first.processing_class)
    with pytest.raises(UsageError) as err:
        again.train()
    msg = str(err.value)
    assert "--resume_from_checkpoint true" in msg and "--overwrite_output_dir true" in msg and "[4]" in msg
    assert again.state is None and _jsonl_steps(out) == [1, 2, 3, 4, 5] and not os.path.exists(out / LOCK_NAME)
    with pytest.raises(UsageError, match="both set"):
        check_output_dir(out, resume_from_checkpoint=True, overwrite_output_dir=True)

    # Resume: the log is cut back to step 4 and continued, every step once.
    resumed = SFTTrainer(model_params, args=_args(out, save_total_limit=1, resume_from_checkpoint=True),
                         train_dataset=train_data, processing_class=first.processing_class)
    resumed.train()
    assert _jsonl_steps(out) == [1, 2, 3, 4, 5, 6]
    assert _ckpt_files(out) == ([6], [6])
    assert [h["step"] for h in resumed.log_history if "loss" in h and "step" in h] == [1, 2, 3, 4, 5, 6]

    # Overwrite: old checkpoints, counters and log are deleted, a new run starts at step 0.
    fresh = SFTTrainer(model_params, args=_args(out, max_steps=2, overwrite_output_dir=True),
                       train_dataset=train_data, processing_class=first.processing_class)
    assert fresh.train().global_step == 2
    assert _jsonl_steps(out) == [1, 2]
    assert _ckpt_files(out) == ([2], [2])


# ---------------------------------------------------------------------------------------------------- non-finite
def test_nonfinite_updates_are_counted_and_stop_after_the_configured_run(tmp_path, train_data):
    bad = dict(learning_rate=1e12, max_grad_norm=0.0, lr_scheduler_type="constant", save_strategy="no")
    never = SFTTrainer(MODEL, args=_args(tmp_path / "never", max_consecutive_nonfinite_updates=0, **bad),
                       train_dataset=train_data)
    never.train()  # 0: never stops
    recs = [h for h in never.log_history if "loss" in h and "step" in h]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    expected, nonfinite_steps = 0, []
    for r in recs:  # logging_steps=1: each record is one step; skipped_updates is cumulative
        if not (np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"])):
            expected += 1
            nonfinite_steps.append(r["step"])
        assert r["skipped_updates"] == expected
    assert expected >= 2 and nonfinite_steps == list(range(nonfinite_steps[0], 7))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(never.state.params))

    stop = SFTTrainer((never.model, never.state.params), args=_args(tmp_path / "stop", max_steps=4, **bad,
                                                                     max_consecutive_nonfinite_updates=2),
                      train_dataset=train_data, processing_class=never.processing_class)
    with pytest.raises(FloatingPointError,
                       match=r"at step \d+: 2 non-finite updates in a row .max_consecutive_nonfinite_updates=2"):
        stop.train()
    assert os.listdir(tmp_path / "stop" / "checkpoints")  # the last good state is saved
    assert not os.path.exists(tmp_path / "stop" / LOCK_NAME)  # released on the exception


# ---------------------------------------------------------------------------------------------------- save failures
def test_checkpointer_wraps_save_failures(tmp_path, monkeypatch):
    state = {"w": jnp.arange(4.0)}
    ckpt = Checkpointer(tmp_path / "ck", async_save=False)
    ckpt.save(1, state)
    ckpt.wait()

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt._mngr, "save", full)
    with pytest.raises(CheckpointSaveError, match=r"step 2 .*No space left on device.*intact \(steps \[1\]\)"):
        ckpt.save(2, state)
    monkeypatch.setattr(ckpt._mngr, "check_for_errors", full)  # an asynchronous save that failed in the background
    with pytest.raises(CheckpointSaveError, match="No space left"):
        ckpt.check_for_errors()
    monkeypatch.undo()
    step, restored = ckpt.restore(state)
    assert step == 1 and np.array_equal(np.asarray(restored["w"]), np.arange(4.0))
    ckpt.close()


def test_failed_checkpoint_save_stops_training_and_keeps_earlier_ones(tmp_path, train_data, monkeypatch):
    import orbax.checkpoint as ocp

    real_save = ocp.CheckpointManager.save

    def save(self, step, *a, **k):
        if step >= 4:
            raise OSError(28, "No space left on device")
        return real_save(self, step, *a, **k)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    trainer = SFTTrainer(MODEL, args=_args(tmp_path), train_dataset=train_data)
    with pytest.raises(CheckpointSaveError, match=r"saving step 4 .*No space left.*steps \[2\]"):
        trainer.train()
    assert trainer.trainer_state.global_step == 4  # stopped at the failed save, not later
    assert not os.path.exists(tmp_path / LOCK_NAME)
    monkeypatch.undo()
    step, _ = Checkpointer(tmp_path / "checkpoints").restore(trainer.state)
    assert step == 2
