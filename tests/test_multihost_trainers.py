"""The trainers on several hosts: 2 local processes x 4 CPU devices (jax.distributed on localhost, gloo) train
SFT, DPO, GRPO and online DPO with the same per-step losses as one process with 8 devices; only process 0 writes
logs; a checkpoint written by the 2 processes resumes in one process. Paths as URLs: ``file://`` for the whole
train / save / resume cycle (orbax included), and an fsspec filesystem behind ``gs://`` (in memory) for logs,
counters, the lock and ``save_model``."""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from _multihost_trainer_worker import STEPS, resume_sft, train_both

from trl_jax.train.checkpoint import as_path, is_url, path_str

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def _cache(trl_jax_cache):
    return trl_jax_cache


@pytest.fixture(scope="module")
def runs(tmp_path_factory, _cache):
    """The 2-process run (subprocesses), then the 1-process run and the resume in this process (8 devices)."""
    assert jax.device_count() == 8 and jax.process_count() == 1
    work = str(tmp_path_factory.mktemp("multihost"))
    from trl_jax.assets import resolve_model_path

    resolve_model_path("builtin:tiny-qwen3")  # built into the cache once, before two processes race to build it
    port = _free_port()
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    logs = [open(os.path.join(work, f"process-{i}.{kind}"), "w+", encoding="utf-8")
            for i in range(2) for kind in ("out", "err")]  # files, not pipes: a full pipe would stall a process
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "_multihost_trainer_worker.py"), str(i), "2",
                               str(port), work], env=env, stdout=logs[2 * i], stderr=logs[2 * i + 1], text=True)
             for i in range(2)]
    try:
        for p in procs:
            p.wait(timeout=400)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outs = []
    for f in logs:
        f.seek(0)
        outs.append(f.read())
        f.close()
    outs = [(outs[0], outs[1]), (outs[2], outs[3])]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, (out + err)[-5000:]
    mp = [json.load(open(os.path.join(work, f"result-mp-{i}.json"), encoding="utf-8")) for i in range(2)]
    sp = train_both(work, "sp", url=lambda p: "file://" + p)  # one process; every path given as a file:// URL
    resumed = resume_sft(os.path.join(work, "mp", "sft", "checkpoints"), os.path.join(work, "resumed"))
    return {"work": work, "mp": mp, "sp": sp, "resumed": resumed, "stdout": [o for o, _ in outs]}


@pytest.mark.parametrize("trainer", ["sft", "dpo"])
def test_two_processes_give_the_one_process_losses(runs, trainer):
    sp, mp0, mp1 = runs["sp"][trainer], runs["mp"][0][trainer], runs["mp"][1][trainer]
    assert mp0 == mp1  # every process logs the same (replicated) metrics in memory
    assert [s for s, _ in sp["train"]] == list(range(1, STEPS + 1)) and [s for s, _ in sp["eval"]] == [2, 4]
    for split in ("train", "eval"):
        assert [s for s, _ in mp0[split]] == [s for s, _ in sp[split]]
        np.testing.assert_allclose([v for _, v in mp0[split]], [v for _, v in sp[split]], atol=1e-5, rtol=0)


def test_grpo_two_processes_give_the_one_process_run(runs):
    """GRPO: sampling on the global prompt arrays draws the same completions; rewards computed by each process
    for its rows and gathered give the one-process advantages, metrics and per-step losses."""
    sp, mp0, mp1 = runs["sp"]["grpo"], runs["mp"][0]["grpo"], runs["mp"][1]["grpo"]
    assert mp0 == mp1
    assert [s for s, _ in sp["train"]] == list(range(1, STEPS + 1)) == [s for s, _ in mp0["train"]]
    np.testing.assert_allclose([v for _, v in mp0["train"]], [v for _, v in sp["train"]], atol=1e-5, rtol=0)
    assert len(mp0["metrics"]) == len(sp["metrics"]) == STEPS
    for a, b in zip(mp0["metrics"], sp["metrics"]):
        assert a.keys() == b.keys() and {"reward", "chars", "num_tokens"} <= a.keys()
        for k in a:
            if not (np.isnan(a[k]) and np.isnan(b[k])):
                np.testing.assert_allclose(a[k], b[k], atol=1e-5, rtol=0, err_msg=k)
    # completions.jsonl: written by process 0 alone (each generation's 16 rows once), the one-process table
    def table(tag):
        with open(os.path.join(runs["work"], tag, "grpo", "completions.jsonl"), encoding="utf-8") as f:
            return [json.loads(ln) for ln in f]

    tm, ts = table("mp"), table("sp")
    assert [r["step"] for r in tm] == [1] * 16 + [3] * 16 == [r["step"] for r in ts]
    assert [(r["prompt"], r["completion"], r["digit_count_reward"]) for r in tm] == [
        (r["prompt"], r["completion"], r["digit_count_reward"]) for r in ts]
    np.testing.assert_allclose([r["advantage"] for r in tm], [r["advantage"] for r in ts], atol=1e-5, rtol=0)
    assert len({r["advantage"] for r in tm}) > 1  # the rewards vary: the advantages are not all 0


def test_online_dpo_two_processes_give_the_one_process_run(runs):
    """Online DPO: the global prompt batch sampled with the one-process key, each process scoring its own pairs,
    gives the one-process per-step losses and metrics, and the same eval (a short batch: padding pairs)."""
    sp, mp0, mp1 = runs["sp"]["online_dpo"], runs["mp"][0]["online_dpo"], runs["mp"][1]["online_dpo"]
    assert mp0 == mp1
    assert [s for s, _ in sp["train"]] == list(range(1, STEPS + 1)) == [s for s, _ in mp0["train"]]
    assert [s for s, _ in sp["eval"]] == [STEPS] == [s for s, _ in mp0["eval"]]
    for split in ("train", "eval"):
        np.testing.assert_allclose([v for _, v in mp0[split]], [v for _, v in sp[split]], atol=1e-5, rtol=0)
    assert len(mp0["metrics"]) == len(sp["metrics"]) == STEPS
    for a, b in zip(mp0["metrics"], sp["metrics"]):
        assert a.keys() == b.keys() and {"objective/scores", "rewards/accuracies", "num_tokens"} <= a.keys()
        for k in a:
            if not (np.isnan(a[k]) and np.isnan(b[k])):
                np.testing.assert_allclose(a[k], b[k], atol=1e-5, rtol=0, err_msg=k)


def test_only_process_zero_writes(runs):
    work = runs["work"]
    # stdout: process 0 prints every train and eval record, process 1 none
    lines0 = [ln for ln in runs["stdout"][0].splitlines() if ln.startswith("{")]
    # SFT and DPO: train + eval records; GRPO: train records; online DPO: train records + one eval
    assert len(lines0) == 2 * (STEPS + 2) + STEPS + (STEPS + 1)
    assert not [ln for ln in runs["stdout"][1].splitlines() if ln.startswith("{")]
    for trainer in ("sft", "dpo", "grpo", "online_dpo"):
        recs = [json.loads(ln) for ln in open(os.path.join(work, "mp", trainer, "log_history.jsonl"), encoding="utf-8")]
        assert [r["step"] for r in recs if "loss" in r] == list(range(1, STEPS + 1))  # one writer: no duplicates
        assert not os.path.exists(os.path.join(work, "mp", trainer, "trl_jax.lock"))
    assert len(glob.glob(os.path.join(work, "mp", "sft", "runs", "events.out.tfevents.*"))) == 1
    ckpt = os.path.join(work, "mp", "sft", "checkpoints")
    assert sorted(n for n in os.listdir(ckpt) if n.isdigit()) == ["2", "4"]
    assert sorted(n for n in os.listdir(ckpt) if n.startswith("trainer_state")) == [
        "trainer_state-2.json", "trainer_state-4.json"]
    # the exported model: written once, from the gathered params, equal to the one-process model
    from safetensors.numpy import load_file

    a = load_file(os.path.join(work, "mp", "sft", "final", "model.safetensors"))
    b = load_file(os.path.join(work, "sp", "sft", "final", "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, rtol=0, err_msg=k)
    # file:// URLs never became relative directories named "file:"
    assert not glob.glob(os.path.join(os.getcwd(), "file:*")) and not glob.glob(os.path.join(work, "**", "file:*"),
                                                                                  recursive=True)


def test_checkpoint_of_two_processes_resumes_in_one(runs):
    resumed, mp = runs["resumed"]["sft"]["train"], runs["mp"][0]["sft"]["train"]
    assert [s for s, _ in resumed] == list(range(1, STEPS + 1))  # steps 1-2 from the saved history
    np.testing.assert_allclose([v for _, v in resumed], [v for _, v in mp], atol=1e-5, rtol=0)


def test_paths_as_urls():
    assert path_str("gs://bucket/run") == "gs://bucket/run" and is_url("s3://b/x") and not is_url("file:///tmp/x")
    assert os.fspath(as_path("gs://bucket/run") / "checkpoints") == "gs://bucket/run/checkpoints"
    assert path_str("file:///tmp/a%20b") == "/tmp/a b"
    assert path_str("rel/dir") == os.path.join(os.getcwd(), "rel", "dir")


@pytest.fixture
def memory_gcs(monkeypatch):
    """``gs://`` served by fsspec's in-memory filesystem (no gcsfs, no network)."""
    import fsspec
    from etils.epath import backend
    from fsspec.implementations.memory import MemoryFileSystem

    class FakeGCS(MemoryFileSystem):
        protocol = ("gs", "gcs")
        root_marker = ""
        store, pseudo_dirs = {}, [""]

        def __init__(self, *args, finalize_on_close=None, **kwargs):
            super().__init__(*args, **kwargs)

    for name in ("gs", "gcs"):
        fsspec.register_implementation(name, FakeGCS, clobber=True)
    # orbax asks the real GCS API whether a bucket has a hierarchical namespace: not here
    from orbax.checkpoint._src.path import gcs_utils

    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    backend.fsspec_backend._get_filesystem.cache_clear()
    yield FakeGCS()
    registry = sys.modules["fsspec.registry"]  # the module (``fsspec.registry`` is also a mapping's name)
    for name in ("gs", "gcs"):
        registry._registry.pop(name, None)
    backend.fsspec_backend._get_filesystem.cache_clear()


def test_dataset_logs_lock_and_save_model_on_an_fsspec_url(memory_gcs, tmp_path, _cache, monkeypatch):
    from trl_jax.configs import SFTConfig
    from trl_jax.data.loading import load_dataset_any
    from trl_jax.trainers import SFTTrainer
    from trl_jax.trainers.logging import read_tensorboard_scalars

    monkeypatch.chdir(tmp_path)
    url = "gs://bucket/run"
    args = SFTConfig(output_dir=url, max_steps=2, per_device_train_batch_size=1, learning_rate=1e-3, max_length=48,
                     logging_steps=1, save_strategy="no", bf16=False, gradient_checkpointing=False,
                     disable_tqdm=True, report_to="tensorboard")
    load_dataset_any("builtin:arithmetic_sft").select(range(16)).save_to_disk("gs://bucket/data")
    trainer = SFTTrainer("builtin:tiny-qwen3", args=args, train_dataset="gs://bucket/data")  # read from the URL
    trainer.train()
    trainer.save_model(url + "/final")
    root = as_path(url)
    recs = [json.loads(ln) for ln in (root / "log_history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    events = list((root / "runs").iterdir())
    assert len(events) == 1 and {t for _, t, _ in read_tensorboard_scalars(events[0])} >= {"train/loss"}
    assert not (root / "trl_jax.lock").exists()  # taken and released on the URL
    names = {p.name for p in (root / "final").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not os.listdir(tmp_path)  # nothing written to a local "gs:" directory
    # a second run over it: overwrite_output_dir deletes the old logs there
    from trl_jax.train.checkpoint import check_output_dir

    check_output_dir(url, overwrite_output_dir=True, delete=True)
    assert not (root / "log_history.jsonl").exists() and not (root / "runs").exists()
