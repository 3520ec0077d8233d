"""``trl-jax``: run a trainer from a TRL-style YAML config, or print the environment.

    trl-jax sft --config configs/quickstart_sft.yaml [--max_steps 100 --learning_rate 1e-4 ...]
    trl-jax dpo --config configs/quickstart_dpo.yaml
    trl-jax kto --config configs/quickstart_kto.yaml
    trl-jax grpo --config configs/quickstart_grpo.yaml      # reward_funcs: [accuracy_reward, my_pkg.my_reward]
    trl-jax online-dpo --config configs/quickstart_online_dpo.yaml
    trl-jax env

YAML keys are the fields of the trainer config (``SFTConfig`` ...), TRL's ``ModelConfig``
(``model_name_or_path``, ``dtype``, ...), ``ScriptArguments`` (``dataset_name``, ``dataset_train_split``,
``dataset_test_split``, ...) and ``DatasetMixtureConfig`` (``datasets:``), exactly as ``trl <cmd> --config`` reads
them; ``--field value`` flags override the file. A TRL YAML config runs unchanged: torch-only fields are accepted
with one warning line. Multi-host (TPU pod): run the same command on every host with ``--distributed`` (or
``TRL_JAX_DISTRIBUTED=1``); ``jax.distributed.initialize()`` discovers the topology.
"""

from __future__ import annotations

import argparse
import os
import sys

TRAINERS = ("sft", "dpo", "kto", "grpo", "online-dpo")


def _parse_overrides(extra: list[str]) -> dict:
    """``--key value`` / ``--key=value`` / ``--flag`` (-> "true") pairs; values stay strings (the configs coerce)."""
    out, i = {}, 0
    while i < len(extra):
        tok = extra[i]
        if not tok.startswith("--"):
            raise SystemExit(f"trl-jax: unexpected argument {tok!r}; overrides are --field value pairs.")
        key = tok[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            value = extra[i + 1]
            i += 2
        else:
            value = "true"
            i += 1
        out[key.replace("-", "_")] = value
    return out


def _datasets(run, split_names):
    """Train / eval datasets from ``dataset_name`` (hub name, local file or ``builtin:NAME``) or ``datasets:``."""
    from trl_jax.data.loading import load_dataset_any, load_dataset_mixture

    script = run.script_args
    if run.dataset_args.datasets:
        train = load_dataset_mixture(run.dataset_args, seed=run.args.seed)
        if run.dataset_args.test_split_size:
            split = train.train_test_split(test_size=run.dataset_args.test_split_size, seed=run.args.seed)
            return split["train"], split["test"]
        return train, None
    if not script.dataset_name:
        raise SystemExit("trl-jax: set `dataset_name` (hub name, local json/jsonl/parquet file or builtin:NAME) or "
                         "`datasets:` in the config.")
    kw = dict(name=script.dataset_config, streaming=script.dataset_streaming)
    train = load_dataset_any(script.dataset_name, split=script.dataset_train_split, **kw)
    eval_ds = None
    if run.args.eval_strategy != "no" or split_names:
        try:
            eval_ds = load_dataset_any(script.dataset_name, split=script.dataset_test_split, **kw)
        except ValueError as e:
            if run.args.eval_strategy != "no":
                raise SystemExit(f"trl-jax: eval_strategy={run.args.eval_strategy!r} but no eval split: {e}")
    return train, eval_ds


def _model_id(run) -> str:
    name = run.model_args.model_name_or_path
    if not name:
        raise SystemExit("trl-jax: set `model_name_or_path` (a local HF directory, a hub id or builtin:tiny-qwen3).")
    if not name.startswith("builtin:") and os.path.sep in name and not os.path.exists(name):
        raise SystemExit(f"trl-jax: model_name_or_path {name!r} does not exist. If it is the output of another "
                         "quickstart (e.g. the SFT one), run that first.")
    return name


def run_trainer(command: str, config: str | None, overrides: dict) -> dict:
    """Build the trainer for ``command`` from a config path (or ``None``: overrides only) and train it."""
    from trl_jax import configs
    from trl_jax import trainers as T

    cls = {"sft": configs.SFTConfig, "dpo": configs.DPOConfig, "kto": configs.KTOConfig,
           "grpo": configs.GRPOConfig, "online-dpo": configs.OnlineDPOConfig}[command]
    script_cls = configs.GRPOScriptArguments if command in ("grpo", "online-dpo") else None
    run = configs.load_config(config if config else {}, cls, overrides, script_cls=script_cls)
    args = run.args
    if args.output_dir is None:
        args.output_dir = os.path.join("outputs", command)
    if run.model_args.dtype not in (None, "auto", "float32") and args.param_dtype == "float32":
        # TRL's `dtype` is the dtype the model is loaded in: the parameters.
        args.param_dtype = run.model_args.dtype
    train, eval_ds = _datasets(run, split_names=command == "sft")
    model = _model_id(run)
    if command in ("grpo", "online-dpo"):
        from trl_jax.rewards import resolve_reward_funcs

        funcs = resolve_reward_funcs(run.script_args.reward_funcs)
        reward_model = run.script_args.reward_model_name_or_path or getattr(args, "reward_model_path", None)
        if reward_model:
            funcs.insert(0, reward_model)
        if not funcs:
            raise SystemExit(f"trl-jax {command}: set `reward_funcs` (built-in names such as accuracy_reward, or "
                             "dotted import paths) and/or `reward_model_name_or_path` in the config.")
        trainer_cls = T.GRPOTrainer if command == "grpo" else T.OnlineDPOTrainer
        trainer = trainer_cls(model, reward_funcs=funcs, args=args, train_dataset=train, eval_dataset=eval_ds)
    else:
        trainer_cls = {"sft": T.SFTTrainer, "dpo": T.DPOTrainer, "kto": T.KTOTrainer}[command]
        trainer = trainer_cls(model, args=args, train_dataset=train, eval_dataset=eval_ds)
    result = {}
    if command == "sft" and trainer.eval_dataset is not None:
        result["exact_match_before"] = trainer.completion_exact_match()
        print(f"[trl-jax] held-out exact match before training: {result['exact_match_before']:.3f}", flush=True)
    out = trainer.train()
    result["train_loss"] = out.training_loss
    if trainer.eval_dataset is not None:
        metrics = trainer.evaluate()
        result.update(metrics)
        print("[trl-jax] eval: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
    if command == "sft" and trainer.eval_dataset is not None:
        result["exact_match_after"] = trainer.completion_exact_match()
        print(f"[trl-jax] held-out exact match after training: {result['exact_match_after']:.3f} "
              f"(before: {result['exact_match_before']:.3f})", flush=True)
    path = trainer.save_model(args.output_dir)
    print(f"[trl-jax] saved model and tokenizer to {path}", flush=True)
    return result


def print_env() -> None:
    import platform

    import jax

    from trl_jax import __version__

    lines = [f"trl_jax: {__version__}", f"python: {platform.python_version()}", f"platform: {platform.platform()}"]
    for mod in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "chex", "transformers", "datasets",
                "safetensors", "tokenizers"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            lines.append(f"{mod}: {getattr(m, '__version__', '?')}")
        except ImportError:
            lines.append(f"{mod}: not installed")
    lines.append(f"backend: {jax.default_backend()}")
    lines.append(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} "
                 f"({jax.process_count()} process(es), {jax.local_device_count()} local)")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trl-jax", description="TRL's trainers in JAX.")
    parser.add_argument("command", choices=TRAINERS + ("env",))
    parser.add_argument("--config", help="YAML run config (TRL format)")
    parser.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first")
    ns, extra = parser.parse_known_args(argv)
    if ns.command == "env":
        print_env()
        return 0
    if ns.distributed or os.environ.get("TRL_JAX_DISTRIBUTED") == "1":
        from trl_jax.parallel import initialize_distributed

        initialize_distributed()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
    run_trainer(ns.command, ns.config, _parse_overrides(extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
