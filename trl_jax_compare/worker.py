"""The TRL side of ``trl-jax compare``, run as ``python -m trl_jax_compare.worker SPEC_JSON RESULT_JSON``.

``SPEC_JSON`` (written by :func:`trl_jax.compare.run_compare`): the trainer (``command``), the config path, the
overrides (forced settings and the model directory included), the output directory, the thread count and, for GRPO
and online DPO, ``rollouts``: the JSON file of trl_jax's sampled batches. The config is parsed by trl_jax (the same
coerced values, model directory and dataset as the trl_jax side); every field the user set that TRL's config also
has is passed to TRL's config.

SFT / DPO / KTO: one TRL run; its per-step logs, step times and peak memory. GRPO / online DPO: first TRL's own
full loop (its own sampling: the throughput and memory figures), then a replay of trl_jax's sampled batches
(:mod:`trl_jax_compare.replay`: the per-step logs compared with trl_jax's).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import sys
import time
import warnings

import torch
from transformers import TrainerCallback

from trl_jax.compare import (StepTimer, explicit_keys, forced_settings, load_run, peak_rss_mb, step_logs,
                             train_dataset)
from trl_jax_compare.replay import grpo_replay_trainer, online_dpo_replay_trainer
from trl_jax_compare.trainers import build_trl_trainer, trl_classes

ONLINE = ("grpo", "online-dpo")


def trl_config_kwargs(spec: dict, run) -> dict:
    """TRL config fields: every field the user set (config or override) that TRL's config also has, with trl_jax's
    coerced value, plus the forced settings, ``max_steps``, ``seed``, the dtype and CPU placement."""
    gpu = torch.cuda.is_available()
    cfg_cls, _ = trl_classes(spec["command"])
    trl_fields = {f.name for f in dataclasses.fields(cfg_cls)}
    jax_args = run.args
    kw = {k: getattr(jax_args, k) for k in explicit_keys(spec) if k in trl_fields and hasattr(jax_args, k)}
    kw.update({k: v for k, v in forced_settings(spec["command"]).items() if k in trl_fields})
    kw.update(output_dir=spec["out_dir"], max_steps=jax_args.max_steps, dataloader_num_workers=0, seed=jax_args.seed)
    if isinstance(kw.get("warmup_steps"), float) and kw["warmup_steps"].is_integer():
        kw["warmup_steps"] = int(kw["warmup_steps"])
    dtype = run.model_args.dtype if run.model_args.dtype not in (None, "auto") else "float32"
    kw["model_init_kwargs"] = {**(kw.get("model_init_kwargs") or {}), "dtype": getattr(torch, dtype)}
    if not gpu:
        kw["use_cpu"] = True
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()}


def reward_funcs(run) -> list:
    """The config's reward functions (trl_jax's built-in names or dotted paths, resolved to the same Python
    callables trl_jax calls) and reward model, for TRL's ``reward_funcs``."""
    from trl_jax.rewards import resolve_reward_funcs

    funcs = resolve_reward_funcs(run.script_args.reward_funcs)
    model = run.script_args.reward_model_name_or_path or getattr(run.args, "reward_model_path", None)
    return ([model] if model else []) + funcs


def peft_model(spec: dict, run, model_dir: str, dtype):
    """With ``use_peft``: the base model (4-bit / 8-bit through bitsandbytes with ``load_in_4bit`` /
    ``load_in_8bit``) with trl_jax's initial
    adapters, trainable (``peft.PeftModel.from_pretrained``), so both sides start from the same adapters; else the
    model directory."""
    if not spec.get("peft_init"):
        return model_dir
    import peft
    import transformers

    load = dict(dtype=dtype, attn_implementation="eager")
    if run.model_args.load_in_4bit:
        load.update(device_map="cpu" if not torch.cuda.is_available() else None,
                    quantization_config=transformers.BitsAndBytesConfig(
                        load_in_4bit=True, bnb_4bit_quant_type=run.model_args.bnb_4bit_quant_type,
                        bnb_4bit_compute_dtype=load["dtype"]))
    elif getattr(run.model_args, "load_in_8bit", False):
        load.update(device_map="cpu" if not torch.cuda.is_available() else None,
                    quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True))
    auto = transformers.AutoModelForCausalLM
    base = auto.from_pretrained(model_dir, **{k: v for k, v in load.items() if v is not None})
    return peft.PeftModel.from_pretrained(base, spec["peft_init"], is_trainable=True)


def _timed_train(trainer, timer: StepTimer) -> dict:
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    t_call = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    res = {"logs": step_logs(trainer.state.log_history), "t_call": t_call, "t_begin": timer.begin,
           "times": timer.times, "peak_rss_mb": peak_rss_mb()}
    if gpu:
        res["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return res


def _callback(timer: StepTimer):
    return type("CompareTimer", (TrainerCallback,), {"on_train_begin": timer.on_train_begin,
                                                      "on_log": timer.on_log})()


@contextlib.contextmanager
def llm_int8_training(active: bool):
    """bitsandbytes trains 8-bit layers on CPU through ``MatMul8bitFp`` (dequantize + matmul, no activation
    quantization); on CUDA it runs LLM.int8 (``MatMul8bitLt``), which is what trl_jax computes. With ``active``
    (8-bit on CPU) the CPU path takes ``MatMul8bitLt`` too for the block."""
    if not active:
        yield
        return
    import bitsandbytes.autograd._functions as AF

    saved = AF.MatMul8bitFp
    AF.MatMul8bitFp = AF.MatMul8bitLt
    try:
        yield
    finally:
        AF.MatMul8bitFp = saved


def run_trl(spec: dict) -> dict:
    """The TRL side of one comparison (see the module docstring); the result dict of :func:`trl_jax.compare`."""
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    command = spec["command"]
    run = load_run(spec)
    gpu = torch.cuda.is_available()
    kw = trl_config_kwargs(spec, run)
    model_dir = run.model_args.model_name_or_path
    dtype = kw["model_init_kwargs"]["dtype"]
    if spec.get("peft_init"):  # the model is built here (base + trl_jax's initial adapters), not from kwargs
        kw = {k: v for k, v in kw.items() if k != "model_init_kwargs"}
    extra = {"reward_funcs": reward_funcs(run)} if command in ONLINE else {}
    timer = StepTimer(torch.cuda.synchronize if gpu else None)
    torch.manual_seed(run.args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft_model(spec, run, model_dir, dtype)
        trainer = build_trl_trainer(command, model, kw, train_dataset(run), callbacks=[_callback(timer)], **extra)
    int8_cpu = bool(getattr(run.model_args, "load_in_8bit", False)) and not gpu
    with llm_int8_training(int8_cpu):
        res = _timed_train(trainer, timer)
    del trainer
    res.update(device=torch.cuda.get_device_name() if gpu else "cpu (torch, %d threads)" % torch.get_num_threads(),
               memory_kind="torch.cuda.max_memory_allocated" if gpu else "peak host RSS")
    if command in ONLINE:
        with open(spec["rollouts"], encoding="utf-8") as f:
            record = json.load(f)
        build = grpo_replay_trainer if command == "grpo" else online_dpo_replay_trainer
        torch.manual_seed(run.args.seed)
        kw_replay = {**kw, "output_dir": os.path.join(spec["out_dir"], "replay")}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = build(record, peft_model(spec, run, model_dir, dtype), kw_replay, extra["reward_funcs"],
                            callbacks=[_callback(StepTimer())])
        with contextlib.redirect_stdout(io.StringIO()), llm_int8_training(int8_cpu):
            trainer.train()
        # the throughput run's logs and timings (TRL's own sampling); the replay's logs are the ones compared
        res["own_sampling"] = {k: res.pop(k) for k in ("logs", "t_call", "t_begin", "times")}
        res["logs"] = step_logs(trainer.state.log_history)
        res["replayed_batches"] = trainer.replay_cursor.i
    return res


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2:
        print("usage: python -m trl_jax_compare.worker SPEC_JSON RESULT_JSON", file=sys.stderr)
        return 2
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    with open(argv[0], encoding="utf-8") as f:
        spec = json.load(f)
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
    res = run_trl(spec)
    with open(argv[1], "w", encoding="utf-8") as f:
        json.dump(res, f, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
