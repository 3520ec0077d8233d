"""``trl-jax``: run a trainer from a TRL-style YAML config, or print the environment.

    trl-jax sft --config configs/quickstart_sft.yaml [--max_steps 100 --learning_rate 1e-4 ...]
    trl-jax dpo --config configs/quickstart_dpo.yaml
    trl-jax kto --config configs/quickstart_kto.yaml
    trl-jax reward --config configs/quickstart_reward.yaml
    trl-jax grpo --config configs/quickstart_grpo.yaml      # reward_funcs: [accuracy_reward, my_pkg.my_reward]
    trl-jax online-dpo --config configs/quickstart_online_dpo.yaml
    trl-jax distillation --config configs/quickstart_distillation.yaml   # teacher_model_name_or_path: DIR
    trl-jax rloo --config configs/quickstart_rloo.yaml
    trl-jax env
    trl-jax compare sft --config configs/quickstart_sft.yaml --steps 20 --out outputs/compare-sft   # vs TRL

YAML keys are the fields of the trainer config (``SFTConfig`` ...), TRL's ``ModelConfig``
(``model_name_or_path``, ``dtype``, ...), ``ScriptArguments`` (``dataset_name``, ``dataset_train_split``,
``dataset_test_split``, ...) and ``DatasetMixtureConfig`` (``datasets:``), exactly as ``trl <cmd> --config`` reads
them; ``--field value`` flags override the file. A TRL YAML config runs unchanged: torch-only fields are accepted
with one warning line. Multi-host (TPU pod): run the same command on every host with ``--distributed`` (or
``TRL_JAX_DISTRIBUTED=1``); ``jax.distributed.initialize()`` discovers the topology.

Errors: one line ``trl-jax: error: <message>`` on stderr; exit status 2 for a config or usage error (an unknown
key, a value the config refuses, a model path that names no model, an output_dir holding checkpoints without
``--resume_from_checkpoint true`` / ``--overwrite_output_dir true``) and 1 for an error while running. ``--debug``
(or ``TRL_JAX_DEBUG=1``) also prints the traceback. (``--debug`` is this flag, not transformers' torch-only
``debug`` field, which trl_jax ignores.)
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from trl_jax.configs import UsageError

TRAINERS = ("sft", "dpo", "kto", "reward", "grpo", "online-dpo", "rloo", "distillation")


def _parse_overrides(extra: list[str]) -> dict:
    """``--key value`` / ``--key=value`` / ``--flag`` (-> "true") pairs; values stay strings (the configs coerce)."""
    out, i = {}, 0
    while i < len(extra):
        tok = extra[i]
        if not tok.startswith("--"):
            raise UsageError(f"unexpected argument {tok!r}; overrides are --field value pairs (e.g. --max_steps 10).")
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
        raise UsageError("set `dataset_name` (hub name, local json/jsonl/parquet file or builtin:NAME) or "
                         "`datasets:` in the config.")
    kw = dict(name=script.dataset_config, streaming=script.dataset_streaming)
    train = _load_named(load_dataset_any, script.dataset_name, split=script.dataset_train_split, **kw)
    eval_ds = None
    if run.args.eval_strategy != "no" or split_names:
        try:
            eval_ds = load_dataset_any(script.dataset_name, split=script.dataset_test_split, **kw)
        except ValueError as e:
            if run.args.eval_strategy != "no":
                raise UsageError(f"eval_strategy={run.args.eval_strategy!r} but no eval split: {e} Set "
                                 "`dataset_test_split` to an existing split, or eval_strategy='no'.") from e
    return train, eval_ds


def _load_named(load, dataset, **kw):
    """``load(name, **kw)``; a dataset that cannot be found (no such file, not on the hub or offline) is a usage
    error naming it and the accepted forms."""
    try:
        return load(dataset, **kw)
    except Exception as e:  # noqa: BLE001 - classified below, anything else propagates unchanged
        not_found = isinstance(e, FileNotFoundError) or type(e).__name__ in (
            "DatasetNotFoundError", "ConnectionError", "OfflineModeIsEnabled", "RepositoryNotFoundError")
        if not not_found:
            raise
        reason = " ".join(str(e).split())[:300]
        raise UsageError(
            f"dataset_name {dataset!r} was not found ({type(e).__name__}: {reason}); expected a local .json/.jsonl/"
            ".parquet/.csv file or saved dataset directory (relative to the current directory, "
            f"{os.getcwd()}), a Hugging Face Hub dataset id (cached, or reachable online), or builtin:NAME."
        ) from e


def _model_id(run) -> str:
    name = run.model_args.model_name_or_path
    if not name:
        raise UsageError("set `model_name_or_path` (a local HF directory, a hub id or builtin:tiny-qwen3).")
    if not name.startswith("builtin:") and os.path.sep in name and not os.path.exists(name):
        raise UsageError(f"model_name_or_path {name!r} does not exist. If it is the output of another "
                         "quickstart (e.g. the SFT one), run that first.")
    from trl_jax.assets import check_model_path

    check_model_path(name)
    return name


def run_trainer(command: str, config: str | None, overrides: dict) -> dict:
    """Build the trainer for ``command`` from a config path (or ``None``: overrides only) and train it."""
    from trl_jax import configs
    from trl_jax import trainers as T

    cls = {"sft": configs.SFTConfig, "dpo": configs.DPOConfig, "kto": configs.KTOConfig,
           "reward": configs.RewardConfig, "grpo": configs.GRPOConfig, "online-dpo": configs.OnlineDPOConfig,
           "distillation": configs.DistillationConfig, "rloo": configs.RLOOConfig}[command]
    script_cls = configs.GRPOScriptArguments if command in ("grpo", "online-dpo", "rloo") else None
    if config and not os.path.isfile(config):
        raise UsageError(f"--config {config!r}: no such file.")
    try:
        run = configs.load_config(config if config else {}, cls, overrides, script_cls=script_cls)
    except UsageError:
        raise
    except (ValueError, TypeError) as e:  # unknown keys, refused values: config errors
        raise UsageError(str(e)) from e
    except Exception as e:  # noqa: BLE001 - e.g. YAML syntax
        if type(e).__module__.startswith("yaml"):
            raise UsageError(f"--config {config!r} is not valid YAML: {e}") from e
        raise
    args = run.args
    if args.output_dir is None:
        args.output_dir = os.path.join("outputs", command)
    import jax

    from trl_jax.train.checkpoint import check_output_dir

    # Before any model or dataset is loaded: another run in output_dir, or checkpoints without resume/overwrite.
    check_output_dir(args.output_dir, resume_from_checkpoint=args.resume_from_checkpoint,
                     overwrite_output_dir=args.overwrite_output_dir, check_lock=jax.process_index() == 0)
    if run.model_args.dtype not in (None, "auto", "float32") and args.param_dtype == "float32":
        # TRL's `dtype` is the dtype the model is loaded in: the parameters.
        args.param_dtype = run.model_args.dtype
    if run.model_args.attn_implementation is not None and args.attn_implementation is None:
        args.attn_implementation = run.model_args.attn_implementation  # TRL's ModelConfig field: the kernel
    train, eval_ds = _datasets(run, split_names=command in ("sft", "reward", "distillation"))
    model = _model_id(run)
    from trl_jax.models.lora import apply_model_args

    peft_config = apply_model_args(args, run.model_args)  # use_peft + lora_*, load_in_4bit (TRL's ModelConfig)
    if command in ("grpo", "online-dpo", "rloo"):
        from trl_jax.rewards import resolve_reward_funcs

        funcs = resolve_reward_funcs(run.script_args.reward_funcs)
        reward_model = run.script_args.reward_model_name_or_path or getattr(args, "reward_model_path", None)
        if reward_model:
            funcs.insert(0, reward_model)
        if not funcs:
            raise UsageError(f"{command}: set `reward_funcs` (built-in names such as accuracy_reward, or "
                             "dotted import paths) and/or `reward_model_name_or_path` in the config.")
        trainer_cls = {"grpo": T.GRPOTrainer, "online-dpo": T.OnlineDPOTrainer, "rloo": T.RLOOTrainer}[command]
        trainer = trainer_cls(model, reward_funcs=funcs, args=args, train_dataset=train, eval_dataset=eval_ds,
                              peft_config=peft_config)
    elif command == "distillation":
        trainer = _distillation_trainer(run, model, train, eval_ds, peft_config)
    else:
        trainer_cls = {"sft": T.SFTTrainer, "dpo": T.DPOTrainer, "kto": T.KTOTrainer,
                       "reward": T.RewardTrainer}[command]
        trainer = trainer_cls(model, args=args, train_dataset=train, eval_dataset=eval_ds, peft_config=peft_config)
    result = {}
    if command == "sft" and trainer.eval_dataset is not None:
        result["exact_match_before"] = trainer.completion_exact_match()
        _say(f"[trl-jax] held-out exact match before training: {result['exact_match_before']:.3f}", flush=True)
    if command == "reward" and trainer.eval_dataset is not None:
        result["eval_accuracy_before"] = trainer.evaluate()["eval_accuracy"]
        _say(f"[trl-jax] held-out reward accuracy before training: {result['eval_accuracy_before']:.3f}", flush=True)
    if command == "distillation" and trainer.eval_dataset is not None:
        result.update({f"{k}_before": v for k, v in trainer.teacher_agreement().items()})
        _say("[trl-jax] held-out student/teacher agreement before training: "
             f"tokens {result['token_agreement_before']:.3f}, completions {result['agreement_before']:.3f}", flush=True)
    out = trainer.train()
    result["train_loss"] = out.training_loss
    if trainer.eval_dataset is not None:
        metrics = trainer.evaluate()
        result.update(metrics)
        _say("[trl-jax] eval: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
    if command == "sft" and trainer.eval_dataset is not None:
        result["exact_match_after"] = trainer.completion_exact_match()
        _say(f"[trl-jax] held-out exact match after training: {result['exact_match_after']:.3f} "
              f"(before: {result['exact_match_before']:.3f})", flush=True)
    if command == "reward" and trainer.eval_dataset is not None:
        _say(f"[trl-jax] held-out reward accuracy after training: {result['eval_accuracy']:.3f} "
             f"(before: {result['eval_accuracy_before']:.3f})", flush=True)
    if command == "distillation" and trainer.eval_dataset is not None:
        result.update(trainer.teacher_agreement())
        _say("[trl-jax] held-out student/teacher agreement after training: "
             f"tokens {result['token_agreement']:.3f} (before: {result['token_agreement_before']:.3f}), "
             f"completions {result['agreement']:.3f} (before: {result['agreement_before']:.3f})", flush=True)
    path = trainer.save_model(args.output_dir)
    _say(f"[trl-jax] saved model and tokenizer to {path}", flush=True)
    return result


def _distillation_trainer(run, model, train, eval_ds, peft_config):
    """TRL's distillation script: the teacher is `teacher_model_name_or_path` (required)."""
    from trl_jax.trainers import DistillationTrainer

    teacher = run.args.teacher_model_name_or_path
    if not teacher:
        raise UsageError("A teacher model is required for distillation training. Set it with "
                         "`teacher_model_name_or_path` (a local HF directory, a hub id or builtin:NAME).")
    if not teacher.startswith("builtin:") and os.path.sep in teacher and not os.path.exists(teacher):
        raise UsageError(f"teacher_model_name_or_path {teacher!r} does not exist. If it is the output of another "
                         "quickstart (e.g. the SFT one), run that first.")
    from trl_jax.assets import check_model_path

    check_model_path(teacher, "teacher_model_name_or_path")
    return DistillationTrainer(model, teacher_model=teacher, args=run.args, train_dataset=train, eval_dataset=eval_ds,
                               peft_config=peft_config)


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
    from trl_jax.models.config import SUPPORTED_ARCHITECTURES, SUPPORTED_ROPE_TYPES

    lines.append("architectures: " + ", ".join(f"{mt} ({', '.join(classes)})"
                                               for mt, classes in SUPPORTED_ARCHITECTURES.items()))
    lines.append(f"rope types: {', '.join(SUPPORTED_ROPE_TYPES)}")
    print("\n".join(lines))


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line (no usage block), exit status 2 like argparse
        print(f"trl-jax: error: {message} (see `trl-jax --help`)", file=sys.stderr)
        sys.exit(2)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, (ValueError, TypeError)) or type(exc).__module__.startswith("trl_jax"):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """The ``trl-jax`` entry point: returns the exit status (0, 1 runtime error, 2 config/usage error)."""
    parser = _Parser(prog="trl-jax", description="TRL's trainers in JAX.")
    parser.add_argument("command", choices=TRAINERS + ("env", "compare"))
    parser.add_argument("--config", help="YAML run config (TRL format)")
    parser.add_argument("--distributed", action="store_true",
                        help="multi-host run: call jax.distributed.initialize() first (coordinator, process count and "
                             "id detected on Cloud TPU, SLURM, Open MPI, Kubernetes); run the same command on every host")
    parser.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    ns, extra = parser.parse_known_args(argv)
    debug = ns.debug or os.environ.get("TRL_JAX_DEBUG") == "1"
    try:
        return _run(ns, extra)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("trl-jax: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every error becomes one line (and a traceback with --debug)
        if debug:
            traceback.print_exc()
        usage = isinstance(e, UsageError)
        hint = "" if debug or usage else " (rerun with --debug for the traceback)"
        print(f"trl-jax: error: {_one_line(e)}{hint}", file=sys.stderr, flush=True)
        return 2 if usage else 1


def _say(*args, **kwargs) -> None:
    """``print`` on process 0 only (a multi-host run prints its results once)."""
    import jax

    if jax.process_index() == 0:
        print(*args, **kwargs)


def _run(ns, extra) -> int:
    if ns.command == "env":
        print_env()
        return 0
    if ns.command == "compare":  # trl-jax compare sft|dpo|kto|grpo|online-dpo --config x.yaml [--steps N] [--out DIR]
        from trl_jax.compare import main as compare_main

        return compare_main(extra + (["--config", ns.config] if ns.config else []))
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
