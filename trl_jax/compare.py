"""``trl-jax compare``: run one TRL YAML config with TRL (PyTorch) and with trl_jax, side by side.

    trl-jax compare sft --config configs/quickstart_sft.yaml --steps 20 --out outputs/compare-sft
    trl-jax compare dpo --config my_dpo.yaml --model_name_or_path outputs/quickstart-sft   # --field value overrides
    trl-jax compare grpo --config configs/quickstart_grpo.yaml --steps 5
    trl-jax compare online-dpo --config configs/quickstart_online_dpo.yaml --steps 5

Both sides get the same run: the same model directory (``builtin:`` models are materialised once as an HF
directory both libraries load), the same optimizer, schedule and hyperparameters (every field of the YAML that TRL's
config also has), dropout off, ``logging_steps=1``, no saving, no evaluation. Each side trains in its own
subprocess (so its peak memory is its own) on the devices this machine has: TRL on the first CUDA GPU if there is
one (``CUDA_VISIBLE_DEVICES`` defaults to ``0`` so the HF Trainer does not wrap the model in ``DataParallel``), else
the CPU; trl_jax on every accelerator it sees (data parallel, the global batch kept equal to TRL's when it divides)
or on one CPU device.

SFT / DPO / KTO: the same training rows in the same order (``train_sampling_strategy`` is forced to
``sequential``: TRL's ``SequentialSampler`` and trl_jax's sequential order agree; random shuffles would use
different random streams); the per-step logs of the two runs are compared.

GRPO / online DPO sample their completions during training, and the two libraries draw them from different random
streams, so their own runs cannot be compared value by value. Compared instead: the **step on the same
completions**. trl_jax trains on the config and records every batch it samples (:mod:`trl_jax.compare_record`);
TRL's own trainer is then fed exactly those prompt and completion tokens in place of its sampling and computes
everything after sampling with its own code -- rewards, advantages (GRPO), pairs (online DPO), reference log-probs,
the loss and its metrics -- and both take their optimizer steps, so the per-step loss curves on shared inputs are
compared step by step. Throughput and memory are each library's own full loop, sampling included (TRL's run samples
its own completions).

The report: a per-step table of every metric both sides log (TRL value, trl_jax value, absolute and relative
difference), a verdict (every value within ``--rtol`` relative / ``--atol`` absolute near zero, or the first step
and metrics that diverge), then throughput (tokens/s over the steps after ``--warmup``, the first step -- which
holds compilation -- timed apart), peak memory (torch's allocator vs JAX ``memory_stats()`` on accelerators, the
process's peak RSS on CPU) and the trl_jax/TRL ratios. ``DIR/compare.json`` holds every value;
``DIR/compare.png`` the two loss curves and the objective's main metrics on shared axes, plus a throughput bar.

TRL and torch are not dependencies of trl_jax: ``pip install "trl-jax[compare]"`` (TRL, torch CPU, matplotlib).
Nothing under ``trl_jax/`` imports them: the TRL side is the ``trl_jax_compare`` package of the same distribution,
run as a subprocess (``python -m trl_jax_compare.worker``).

The printed report and the plot are :mod:`trl_jax.compare_report`; the recording GRPO / online DPO trainers
:mod:`trl_jax.compare_record`. Reusable pieces (also used by ``benchmarks/parity_trainers.py`` and
``trl_jax_compare``): :func:`step_logs`, :func:`compare`, :class:`Comparison`, :func:`build_jax_trainer`,
:class:`StepTimer`, :func:`load_run`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import math
import os
import resource
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from trl_jax.compare_report import format_report, plot_compare
from trl_jax.configs import UsageError

COMMANDS = ("sft", "dpo", "kto", "grpo", "online-dpo")
ONLINE = ("grpo", "online-dpo")  # trainers that sample during training: compared on trl_jax's samples
EXTRA_HINT = 'pip install "trl-jax[compare]"'
# Keys that are bookkeeping, not training numbers (never compared, but reported when only one side has them).
BOOKKEEPING = {"epoch", "step", "train_tokens_per_second", "skipped_updates",  # skipped_updates: trl_jax only
               "step_time"}  # TRL GRPO's wall time per step
# Keys logged only at the end of TRL's run / trl_jax's run (summary rows), excluded from the per-step comparison.
SUMMARY_KEYS = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "train_loss",
                "global_step"}
# The objective's main metrics, plotted next to the loss.
MAIN_METRICS = {"sft": ["mean_token_accuracy"], "dpo": ["rewards/margins"], "kto": ["rewards/margins"],
                "grpo": ["reward"], "online-dpo": ["rewards/margins", "objective/scores"]}
# Shared metrics reported but not judged, with the documented reason.
_PADDING_SUM = ("TRL sums it over every column of the generated block, padding after EOS included; trl_jax over "
                "the completion tokens only (equal when no completion of a micro-batch ends before the others)")
NOT_JUDGED = {"online-dpo": {k: _PADDING_SUM for k in ("objective/kl", "objective/entropy",
                                                       "objective/non_score_reward", "objective/rlhf_reward")}}
# Settings both sides are forced to (what makes the two runs comparable step by step).
FORCED = {"logging_steps": 1, "train_sampling_strategy": "sequential", "save_strategy": "no", "eval_strategy": "no",
          "report_to": "none", "disable_tqdm": True, "push_to_hub": False}
SAMPLING_NOTE = ("sampling differs: TRL and trl_jax draw completions from different random streams, so their own "
                 "runs are not compared value by value. The per-step table compares the step on the SAME "
                 "completions: trl_jax samples each batch with its policy, TRL's trainer is fed exactly those prompt "
                 "+ completion tokens ({hook}) and computes {what} with its own code; both then take their "
                 "optimizer steps. Throughput and memory are each library's own full loop, its own sampling "
                 "included.")
_HOOK = {"grpo": ("GRPOTrainer's rollout_func hook", "rewards, advantages, reference log-probs, _compute_loss and "
                  "its metrics"),
         "online-dpo": ("OnlineDPOTrainer._generate returns them", "rewards, chosen/rejected pairs, reference "
                        "log-probs, the loss and its stats")}


def forced_settings(command: str) -> dict:
    """:data:`FORCED` for ``command`` (the sampling trainers keep their prompt order: TRL is fed trl_jax's)."""
    if command in ONLINE:
        return {k: v for k, v in FORCED.items() if k != "train_sampling_strategy"}
    return dict(FORCED)


def config_classes(command: str):
    """``(trainer config class, script arguments class or None)`` of trl_jax for ``command``."""
    from trl_jax import configs

    cls = {"sft": configs.SFTConfig, "dpo": configs.DPOConfig, "kto": configs.KTOConfig,
           "grpo": configs.GRPOConfig, "online-dpo": configs.OnlineDPOConfig}[command]
    return cls, (configs.GRPOScriptArguments if command in ONLINE else None)


_find_spec = importlib.util.find_spec  # module attribute, so tests can simulate a missing extra


# ---------------------------------------------------------------------------------------------------- comparison
def step_logs(history: list[dict]) -> list[dict]:
    """Per-step log entries only (drop summary / eval rows)."""
    return [h for h in history if "loss" in h and not (SUMMARY_KEYS & set(h))]


@dataclass
class Comparison:
    """Per-key worst error over the steps, and the keys only one side logs."""

    steps_trl: int
    steps_jax: int
    max_rel: dict = field(default_factory=dict)  # key -> max |a-b| / max(|b|, atol / rtol)
    worst_step: dict = field(default_factory=dict)  # key -> 1-based step of max_rel
    bad_steps: dict = field(default_factory=dict)  # key -> 1-based steps whose error exceeds rtol
    only_trl: list = field(default_factory=list)
    only_jax: list = field(default_factory=list)
    curves: dict = field(default_factory=dict)  # key -> (trl values, jax values)
    not_judged: list = field(default_factory=list)  # shared keys reported but left out of the verdict
    floors: dict = field(default_factory=dict)  # key -> per-step absolute resolution used in the verdict

    def failures(self, rtol: float = 1e-3) -> dict:
        return {k: v for k, v in self.max_rel.items() if not v <= rtol and k not in self.not_judged}

    def ok(self, rtol: float = 1e-3) -> bool:
        return self.steps_trl == self.steps_jax and not self.failures(rtol) and not self.only_trl

    def first_divergence(self, rtol: float = 1e-3) -> tuple[int, list[str]] | None:
        """``(1-based step, keys over tolerance there)`` of the first step where a judged shared key diverges."""
        bad = {k: s for k, s in self.bad_steps.items() if s and k not in self.not_judged}
        if not bad:
            return None
        first = min(s[0] for s in bad.values())
        return first, sorted(k for k, s in bad.items() if s[0] == first)


def compare(trl_logs: list[dict], jax_logs: list[dict], *, rtol: float = 1e-3, atol: float = 1e-6,
            not_judged=(), floors: dict | None = None) -> Comparison:
    """Step-by-step comparison of every numeric key both sides log (bookkeeping keys excluded); keys in
    ``not_judged`` are compared and reported but do not count in the verdict.

    Error of a value: ``|jax - trl| / max(|trl|, atol / rtol)`` -- relative, except near zero where ``atol``
    applies (e.g. DPO rewards at step 1 are exactly 0 on both sides). ``NaN`` on both sides counts as equal.
    ``floors``: key -> per-step absolute resolution of that metric (a difference within it counts as equal:
    the denominator is at least ``floor / rtol``), see :func:`resolution_floors`."""
    out = Comparison(len(trl_logs), len(jax_logs))
    keys_trl, keys_jax = _logged_keys(trl_logs), _logged_keys(jax_logs)
    out.only_trl, out.only_jax = sorted(keys_trl - keys_jax), sorted(keys_jax - keys_trl)
    out.not_judged = sorted(set(not_judged) & keys_trl & keys_jax)
    out.floors = {k: list(v) for k, v in (floors or {}).items() if k in keys_trl & keys_jax}
    for k in sorted(keys_trl & keys_jax):
        a = np.array([_num(h.get(k)) for h in trl_logs])
        b = np.array([_num(h.get(k)) for h in jax_logs])
        n = min(len(a), len(b))
        a, b = a[:n], b[:n]
        both_nan = np.isnan(a) & np.isnan(b)
        denom = np.maximum(np.abs(a), atol / rtol)
        if floors and k in floors:
            denom = np.maximum(denom, np.nan_to_num(np.asarray(floors[k], float)[:n]) / rtol)
        err = np.abs(b - a) / denom
        err = np.where(both_nan, 0.0, err)
        err = np.where(np.isnan(err), np.inf, err)
        out.max_rel[k] = float(err.max()) if n else float("nan")
        out.worst_step[k] = int(err.argmax()) + 1 if n else 0
        out.bad_steps[k] = [int(i) + 1 for i in np.nonzero(~(err <= rtol))[0]]
        out.curves[k] = (a.tolist(), b.tolist())
    return out


ULP_FACTOR = 2.0 ** -20  # 8 ulps of fp32 (2^-23 relative each)


def resolution_floors(command: str, trl_logs: list[dict]) -> tuple[dict, list[str]]:
    """Per-step absolute floors of metrics whose fp32 resolution is set by larger terms, and the notes saying so.

    Online DPO: ``rewards/chosen|rejected|margins`` are ``beta * (sum log pi - sum log pi_ref)``, differences of
    two sums of ``|logps/*|`` nats: their fp32 resolution is a few ulps of ``beta * |logps|`` whatever their own
    size (1e-3 rewards from 37-nat sums carry ~2e-6 of rounding), so an absolute error of 8 ulps of
    ``beta * max(|logps/chosen|, |logps/rejected|)`` counts as equal. TRL logs its online DPO ``loss`` rounded to
    4 decimals (``OnlineDPOTrainer._maybe_log_save_evaluate``): floor 5e-5."""
    if command != "online-dpo":
        return {}, []
    scale = np.array([abs(_num(h.get("beta"))) * max(abs(_num(h.get("logps/chosen"))),
                                                     abs(_num(h.get("logps/rejected")))) for h in trl_logs])
    floor = ULP_FACTOR * scale
    floors = {k: floor.tolist() for k in ("rewards/chosen", "rewards/rejected", "rewards/margins")}
    floors["loss"] = [5e-5] * len(trl_logs)
    notes = ["rewards/chosen|rejected|margins: an absolute difference within 8 fp32 ulps of beta * |logps| (the "
             "summed log-probs they are differences of; at most %.1e here) counts as equal" % float(
                 np.nanmax(floor) if len(floor) else 0.0),
             "loss: TRL logs online DPO's loss rounded to 4 decimals; a difference within 5e-5 counts as equal"]
    return floors, notes


def _logged_keys(logs: list[dict]) -> set[str]:
    """Keys with a value on some step; a key logged only as NaN (e.g. trl_jax's KTO ``rewards/rejected`` on
    batches without undesirable rows, where TRL omits the key) counts as not logged."""
    return {k for h in logs for k, v in h.items() if not math.isnan(_num(v))} - BOOKKEEPING


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


# ---------------------------------------------------------------------------------------------------- trainers
def build_jax_trainer(kind: str, model, args_kwargs: dict, dataset, callbacks=None, **trainer_kwargs):
    """trl_jax's trainer of ``kind`` for ``args_kwargs`` (fields of its config); ``trainer_kwargs`` (e.g.
    ``peft_config``) go to the trainer."""
    from trl_jax.configs import DPOConfig, KTOConfig, SFTConfig
    from trl_jax.trainers import DPOTrainer, KTOTrainer, SFTTrainer

    cfg_cls, trainer_cls = {"sft": (SFTConfig, SFTTrainer), "dpo": (DPOConfig, DPOTrainer),
                            "kto": (KTOConfig, KTOTrainer)}[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = cfg_cls(**args_kwargs)
        return trainer_cls(model=model, args=args, train_dataset=dataset, callbacks=callbacks, **trainer_kwargs)


# ---------------------------------------------------------------------------------------------------- workers
class StepTimer:
    """Callback (both libraries call ``on_train_begin`` / ``on_log``): wall time of train start and of each step's
    log (after ``sync``, e.g. ``torch.cuda.synchronize``; trl_jax's log already waits for the step's values)."""

    def __init__(self, sync=None):
        self.begin, self.times, self.sync = None, [], sync

    def on_train_begin(self, args, state, control, **kw):
        self.begin = time.perf_counter()
        return control

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs and not (SUMMARY_KEYS & set(logs)):
            if self.sync:
                self.sync()
            self.times.append(time.perf_counter())
        return control


def load_run(spec: dict):
    """trl_jax's parse of the user's config + overrides + forced settings (also used by the TRL worker: it gives
    the coerced values, the model directory and the dataset both sides train on)."""
    from trl_jax import configs

    cls, script_cls = config_classes(spec["command"])
    return configs.load_config(spec["config"] or {}, cls, spec["overrides"], script_cls=script_cls)


def explicit_keys(spec: dict) -> set[str]:
    """The fields the user set: the config file's keys and the overrides."""
    keys = set(spec["overrides"])
    if spec["config"]:
        import yaml

        with open(spec["config"], encoding="utf-8") as f:
            keys |= set((yaml.safe_load(f) or {}).keys())
    return keys


def train_dataset(run):
    """The run's training dataset, as the CLI loads it."""
    from trl_jax.cli import _datasets

    with contextlib.redirect_stderr(io.StringIO()):
        train, _ = _datasets(run, split_names=False)
    return train


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _jax_trainer(spec: dict, run, dataset, timer):
    from trl_jax import trainers as T

    from trl_jax.models.lora import apply_model_args

    command, model = spec["command"], run.model_args.model_name_or_path
    peft_config = apply_model_args(run.args, run.model_args)  # use_peft / lora_* / load_in_4bit / 8bit, as the CLI
    if peft_config is not None:  # dropout off on both sides (TRL's side switches every nn.Dropout off)
        import dataclasses

        peft_config = dataclasses.replace(peft_config, lora_dropout=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if command in ONLINE:
            from trl_jax.compare_record import recording_trainer_cls
            from trl_jax.rewards import resolve_reward_funcs

            funcs = resolve_reward_funcs(run.script_args.reward_funcs)
            reward_model = run.script_args.reward_model_name_or_path or getattr(run.args, "reward_model_path", None)
            if reward_model:
                funcs.insert(0, reward_model)
            trainer = recording_trainer_cls(command)(model, reward_funcs=funcs, args=run.args, train_dataset=dataset,
                                                     callbacks=[timer], peft_config=peft_config)
        else:
            trainer_cls = {"sft": T.SFTTrainer, "dpo": T.DPOTrainer, "kto": T.KTOTrainer}[command]
            trainer = trainer_cls(model, args=run.args, train_dataset=dataset, callbacks=[timer],
                                  peft_config=peft_config)
    if peft_config is not None:  # the TRL side starts from these same adapters (PeftModel.from_pretrained)
        trainer.save_model(spec["peft_init"])
    return trainer


def _worker_jax(spec: dict) -> dict:
    import jax

    run = load_run(spec)
    args = run.args
    args.output_dir = spec["out_dir"]
    if run.model_args.dtype not in (None, "auto", "float32") and args.param_dtype == "float32":
        args.param_dtype = run.model_args.dtype
    note = ""
    n = jax.device_count()
    if args.mesh_shape is None:
        if jax.default_backend() == "cpu" or n == 1:
            args.mesh_shape = (1, 1, 1)  # one CPU device, like TRL's single process
        elif args.per_device_train_batch_size % n == 0:
            args.per_device_train_batch_size //= n  # same global batch as TRL, data parallel over every device
        else:
            args.mesh_shape = (1, 1, 1)
            note = (f"batch {args.per_device_train_batch_size} does not divide over {n} devices: trl_jax ran on "
                    "one device")
    timer = StepTimer()
    trainer = _jax_trainer(spec, run, train_dataset(run), timer)
    t_call = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    if spec.get("rollouts"):
        trainer.save_records(spec["rollouts"])
    devs = trainer.mesh.devices.flatten().tolist() if hasattr(trainer, "mesh") else jax.devices()[:1]
    res = {"logs": step_logs(trainer.log_history), "t_call": t_call, "t_begin": timer.begin, "times": timer.times,
           "peak_rss_mb": peak_rss_mb(), "device": f"{devs[0].device_kind} x{len(devs)} (jax {jax.default_backend()})",
           "note": note}
    peaks = []
    for d in devs:
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001 - backends without allocator statistics
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"])
    if peaks:
        res["peak_device_mb"] = max(peaks) / 2 ** 20
        res["memory_kind"] = "jax memory_stats peak_bytes_in_use (max over devices)"
    else:
        res["memory_kind"] = "peak host RSS"
    return res


def _worker_main(spec_path: str, result_path: str) -> int:
    """The trl_jax side (``python -m trl_jax.compare --worker SPEC RESULT``); the TRL side is
    ``python -m trl_jax_compare.worker SPEC RESULT``."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
    res = _worker_jax(spec)
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump(res, f, default=float)
    return 0


# ---------------------------------------------------------------------------------------------------- driver
def check_reference_installed() -> None:
    """Raise a :class:`UsageError` naming the extra to install when TRL or torch (or the TRL side,
    ``trl_jax_compare``) cannot be imported."""
    missing = [m for m in ("torch", "trl", "trl_jax_compare") if _find_spec(m) is None]
    if missing:
        raise UsageError(f"`trl-jax compare` runs the config with TRL too, but {' and '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not installed: {EXTRA_HINT} "
                         "(TRL, torch and matplotlib).")


def _throughput(res: dict, warmup: int) -> dict:
    logs, times = res["logs"], res["times"]
    out = {"first_step_s": (times[0] - res["t_begin"]) if times and res.get("t_begin") else None,
           "train_call_to_first_log_s": (times[0] - res["t_call"]) if times else None}
    n = min(len(logs), len(times))
    w = min(max(warmup, 1), n - 1)
    if n < 2 or w < 1:
        out.update(tokens_per_s=None, samples_per_s=None, step_s=None, measured_steps=0)
        return out
    dt = times[n - 1] - times[w - 1]
    out.update(step_s=dt / (n - w), measured_steps=n - w)
    if "num_tokens" in logs[n - 1] and "num_tokens" in logs[w - 1]:
        out["tokens_per_s"] = (logs[n - 1]["num_tokens"] - logs[w - 1]["num_tokens"]) / dt
    else:
        out["tokens_per_s"] = None
    return out


def _run_worker(side: str, spec: dict, out_dir: str, env: dict) -> dict:
    spec_path = os.path.join(out_dir, f"{side}_spec.json")
    result_path = os.path.join(out_dir, f"{side}_result.json")
    log_path = os.path.join(out_dir, f"{side}.log")
    with open(spec_path, "w", encoding="utf-8") as f:
        json.dump(spec, f)
    if os.path.exists(result_path):
        os.remove(result_path)
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        module = ["trl_jax_compare.worker"] if side == "trl" else ["trl_jax.compare", "--worker"]
        proc = subprocess.run([sys.executable, "-m", *module, spec_path, result_path],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode or not os.path.exists(result_path):
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = f.read()[-2000:]
        raise RuntimeError(f"the {side} run failed (exit {proc.returncode}); its log is {log_path}:\n{tail}")
    with open(result_path, encoding="utf-8") as f:
        res = json.load(f)
    res["process_wall_s"] = wall
    return res


def _side_env(side: str, threads: int | None) -> dict:
    env = dict(os.environ)
    env.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    env.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if side == "trl":
        env.setdefault("CUDA_VISIBLE_DEVICES", "0")  # one process, one GPU (no DataParallel): TRL's global batch
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        if side == "trl_jax" and threads == 1:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                "intra_op_parallelism_threads=1").strip()
    return env


def run_compare(command: str, config: str | None, overrides: dict | None = None, *, steps: int | None = None,
                out_dir: str = "outputs/compare", rtol: float = 1e-3, atol: float = 1e-6, warmup: int | None = None,
                threads: int | None = None, plot: bool = True, echo=print) -> dict:
    """Run ``config`` with TRL and with trl_jax (each in a subprocess), compare, print, and write
    ``out_dir/compare.json`` (+ ``compare.png``). Returns the JSON's dict (``result["ok"]``: the verdict)."""
    if command not in COMMANDS:
        raise UsageError(f"compare: unknown trainer {command!r}; choose one of {', '.join(COMMANDS)}.")
    if config and not os.path.isfile(config):
        raise UsageError(f"--config {config!r}: no such file.")
    check_reference_installed()
    overrides = dict(overrides or {})
    if steps is not None:
        overrides["max_steps"] = str(int(steps))
    # Validate the config here (one-line usage errors before any subprocess) and resolve the model directory.
    from trl_jax import configs
    from trl_jax.cli import _model_id

    cls, script_cls = config_classes(command)
    forced = forced_settings(command)
    try:
        user_args = configs.load_config(config or {}, cls, overrides, script_cls=script_cls).args
        run = configs.load_config(config or {}, cls, {**overrides, **forced}, script_cls=script_cls)
    except UsageError:
        raise
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from e
    if command in ONLINE and not (run.script_args.reward_funcs or run.script_args.reward_model_name_or_path):
        raise UsageError(f"compare {command}: set `reward_funcs` (built-in names or dotted import paths) in the "
                         "config: TRL and trl_jax both call them on the same completions.")
    model = _model_id(run)
    from trl_jax.assets import resolve_model_path

    model_dir = os.path.abspath(resolve_model_path(model)) if os.path.exists(model) or model.startswith(
        "builtin:") else model
    if run.args.max_steps is None or run.args.max_steps <= 0:
        raise UsageError("compare needs a step count: set `max_steps` in the config or pass --steps N.")
    n_steps = int(run.args.max_steps)
    warmup = warmup if warmup is not None else max(1, min(3, n_steps // 4))
    notes = []
    user_sampling = getattr(user_args, "train_sampling_strategy", None)
    if command not in ONLINE and user_sampling not in (None, "sequential"):
        notes.append(f"train_sampling_strategy {user_sampling!r} (the config's, or the default) replaced by "
                     "'sequential' on both sides: TRL and trl_jax shuffle with different random streams")
    os.makedirs(out_dir, exist_ok=True)
    out_dir = os.path.abspath(out_dir)
    base = {"command": command, "config": os.path.abspath(config) if config else None,
            "overrides": {**overrides, **forced, "model_name_or_path": model_dir},
            "threads": threads}
    if run.model_args.use_peft:
        base["peft_init"] = os.path.join(out_dir, "initial-adapter")
        quant = (" on a 4-bit base" if run.model_args.load_in_4bit else
                 " on an 8-bit (LLM.int8) base" if run.model_args.load_in_8bit else "")
        notes.append("LoRA" + quant + ": both sides start from the same initial adapters (trl_jax's, written in "
                     "PEFT's format and loaded by PEFT); the base model is frozen on both")
        if run.model_args.load_in_4bit or run.model_args.load_in_8bit:
            notes.append("quantized base: TRL casts the adapters of a quantized model to bf16 (its QLoRA recipe), "
                         "trl_jax keeps them in param_dtype: TRL's grad_norm comes out at bf16 resolution and the "
                         "curves drift apart by about that much")
        if run.model_args.load_in_8bit:
            notes.append("8-bit: bitsandbytes' CPU training path (MatMul8bitFp: dequantize, no activation "
                         "quantization) is replaced by its LLM.int8 path (MatMul8bitLt, as on CUDA), which trl_jax "
                         "computes; LLM.int8 takes outlier columns over every row bitsandbytes is given (padding "
                         "included) and trl_jax over the real tokens, so padded batches can differ slightly "
                         "(padding_free: true compares the same rows)")
    if command in ONLINE:
        base["rollouts"] = os.path.join(out_dir, "trl_jax_rollouts.json")
        hook, what = _HOOK[command]
        notes.insert(0, SAMPLING_NOTE.format(hook=hook, what=what))
        notes.append(f"both sides: {', '.join(f'{k}={v}' for k, v in forced.items())}, dropout off (forced)")
    else:
        notes.append("both sides: train_sampling_strategy=sequential, logging_steps=1, no saving/evaluation, "
                     "dropout off (forced)")
    echo(f"[compare] {command}: {n_steps} steps of {config or '(overrides only)'} on {model_dir}")
    if command in ONLINE:
        echo("[compare] sampling differs between TRL and trl_jax (different random streams): the step is compared "
             "on trl_jax's sampled completions, fed to TRL's trainer")
    sides = {}
    # trl_jax first: the sampling trainers' TRL side replays the batches trl_jax recorded.
    for side in ("trl_jax", "trl"):
        echo(f"[compare] running {'TRL (PyTorch)' if side == 'trl' else 'trl_jax (JAX)'} ...")
        spec = {**base, "out_dir": os.path.join(out_dir, f"{side}-run")}
        sides[side] = _run_worker(side, spec, out_dir, _side_env(side, threads))
    sides = {"trl": sides["trl"], "trl_jax": sides["trl_jax"]}
    not_judged = NOT_JUDGED.get(command, {})
    floors, floor_notes = resolution_floors(command, sides["trl"]["logs"])
    cmp = compare(sides["trl"]["logs"], sides["trl_jax"]["logs"], rtol=rtol, atol=atol, not_judged=not_judged,
                  floors=floors)
    notes += floor_notes
    for k in cmp.not_judged:
        notes.append(f"{k} is reported but not judged: {not_judged[k]}")
    result = _summarise(command, config, cmp, sides, rtol=rtol, atol=atol, warmup=warmup, notes=notes,
                        n_steps=n_steps)
    if sides["trl_jax"].get("note"):
        result["notes"].append(sides["trl_jax"]["note"])
    echo(format_report(result))
    json_path = os.path.join(out_dir, "compare.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, default=float)
    result["json_path"] = json_path
    if plot:
        png = os.path.join(out_dir, "compare.png")
        try:
            plot_compare(result, png)
            result["png_path"] = png
        except ImportError:
            echo(f"[compare] matplotlib is not installed: no plot ({EXTRA_HINT})")
    echo(f"[compare] wrote {json_path}" + (f" and {result['png_path']}" if "png_path" in result else ""))
    return result


def _summarise(command, config, cmp: Comparison, sides, *, rtol, atol, warmup, notes, n_steps) -> dict:
    first = cmp.first_divergence(rtol)
    ok = cmp.ok(rtol)
    steps = []
    trl_logs, jax_logs = sides["trl"]["logs"], sides["trl_jax"]["logs"]
    for i in range(min(len(trl_logs), len(jax_logs))):
        row = {"step": i + 1, "metrics": {}}
        for k in sorted(cmp.max_rel):
            a, b = _num(trl_logs[i].get(k)), _num(jax_logs[i].get(k))
            d = abs(b - a)
            den = max(abs(a), atol / rtol)
            floor = cmp.floors.get(k)
            if floor and i < len(floor) and not math.isnan(floor[i]):
                den = max(den, floor[i] / rtol)
            rel = d / den if not (math.isnan(a) and math.isnan(b)) else 0.0
            row["metrics"][k] = {"trl": a, "trl_jax": b, "abs_diff": d, "rel_diff": rel,
                                 "ok": bool(rel <= rtol), "judged": k not in cmp.not_judged}
        steps.append(row)
    # the sampling trainers' TRL side: the throughput of its own loop (own sampling), not of the replay
    thr = {side: _throughput(sides[side].get("own_sampling", sides[side]), warmup) for side in sides}
    t_trl, t_jax = thr["trl"].get("tokens_per_s"), thr["trl_jax"].get("tokens_per_s")
    s_trl, s_jax = thr["trl"].get("step_s"), thr["trl_jax"].get("step_s")
    mem = {}
    for side, r in sides.items():
        mem[side] = {"kind": r["memory_kind"], "peak_device_mb": r.get("peak_device_mb"), "peak_rss_mb": r["peak_rss_mb"]}
    same_kind = ("peak_device_mb" in sides["trl"]) == ("peak_device_mb" in sides["trl_jax"])
    key = "peak_device_mb" if "peak_device_mb" in sides["trl"] and same_kind else "peak_rss_mb"
    mem["compared"] = key if same_kind else "peak_rss_mb"
    mem["ratio_jax_over_trl"] = sides["trl_jax"].get(mem["compared"]) / sides["trl"][mem["compared"]] if sides[
        "trl"].get(mem["compared"]) else None
    online = command in ONLINE
    return {
        "command": command, "config": config, "steps": n_steps, "rtol": rtol, "atol": atol, "warmup_steps": warmup,
        "compared": ("per-step logs of the two runs on the same rows" if not online else
                     "per-step logs on the same completions: trl_jax's sampled batches, replayed through TRL's "
                     "trainer (sampling differs between the libraries: different random streams)"),
        "sampling_differs": online,
        "throughput_measured_on": "each library's own full training loop" + (", sampling included" if online
                                                                             else ""),
        "ok": ok, "first_divergence": {"step": first[0], "keys": first[1]} if first else None,
        "steps_logged": {"trl": cmp.steps_trl, "trl_jax": cmp.steps_jax},
        "only_trl": cmp.only_trl, "only_trl_jax": cmp.only_jax, "not_judged": cmp.not_judged,
        "resolution_floors": cmp.floors,
        "max_rel": cmp.max_rel, "worst_step": cmp.worst_step, "bad_steps": cmp.bad_steps,
        "per_step": steps, "curves": {k: {"trl": v[0], "trl_jax": v[1]} for k, v in cmp.curves.items()},
        "main_metrics": MAIN_METRICS.get(command, []),
        "throughput": {**thr, "tokens_per_s_ratio": (t_jax / t_trl) if t_trl and t_jax else None,
                       "step_time_ratio": (s_trl / s_jax) if s_trl and s_jax else None},
        "memory": mem,
        "devices": {side: r["device"] for side, r in sides.items()},
        "process_wall_s": {side: r["process_wall_s"] for side, r in sides.items()},
        "logs": {side: r["logs"] for side, r in sides.items()},
        **({"trl_own_sampling_logs": sides["trl"]["own_sampling"]["logs"]} if "own_sampling" in sides["trl"]
           else {}),
        "notes": list(notes), "versions": _versions(),
    }


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("trl-jax", "jax", "jaxlib", "flax", "optax", "torch", "transformers", "trl"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


# ---------------------------------------------------------------------------------------------------- CLI
USAGE = "trl-jax compare sft|dpo|kto|grpo|online-dpo --config x.yaml [--steps N] [--out DIR] [--rtol R] [--field value ...]"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # a usage error: one line through the CLI's handler, exit status 2
        raise UsageError(f"compare: {message} (usage: {USAGE}).")

def main(argv: list[str] | None = None) -> int:
    """``trl-jax compare <trainer> --config x.yaml [--steps N] [--out DIR] [--field value ...]``: 0 within
    tolerance, 1 not within tolerance (a usage error raises :class:`UsageError`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return _worker_main(*argv[1:3])
    from trl_jax.cli import _parse_overrides

    p = _Parser(prog="trl-jax compare", add_help=False)
    p.add_argument("trainer", nargs="?")
    p.add_argument("--config")
    p.add_argument("--steps", type=int)
    p.add_argument("--out", default=None)
    p.add_argument("--rtol", type=float, default=1e-3)
    p.add_argument("--atol", type=float, default=1e-6)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-plot", action="store_true")
    ns, extra = p.parse_known_args(argv)
    if not ns.trainer:
        raise UsageError(f"compare: name the trainer (usage: {USAGE}).")
    out = ns.out or os.path.join("outputs", f"compare-{ns.trainer}")
    r = run_compare(ns.trainer, ns.config, _parse_overrides(extra), steps=ns.steps, out_dir=out, rtol=ns.rtol,
                    atol=ns.atol, warmup=ns.warmup, threads=ns.threads, plot=not ns.no_plot)
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
