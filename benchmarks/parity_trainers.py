"""Loss-curve parity of trl_jax's SFT / DPO / KTO / reward trainers with TRL's PyTorch trainers.

One tiny PyTorch ``Qwen3ForCausalLM`` (random init, fixed seed, fp32, no dropout) is saved with ``save_pretrained``
next to trl_jax's character tokenizer. TRL's trainer (torch, CPU) and trl_jax's trainer (JAX, one-device mesh) both
load that directory and train on the same rows in the same order (``train_sampling_strategy="sequential"``; TRL's
``Trainer._get_train_sampler`` returns a ``SequentialSampler`` for it and ``KTOTrainer`` always does) with the same
hyperparameters. The per-step ``log_history`` entries (``logging_steps=1``) are compared key by key.

Reward cases start from one ``*ForSequenceClassification`` directory (:func:`make_reward_model_dir`: TRL's own
``AutoModelForSequenceClassification.from_pretrained(causal_lm, num_labels=1)`` after ``set_seed(0)``, saved), so
both trainers start from the same random ``score`` head.

Mesh: trl_jax runs on a ``(1, 1, 1)`` mesh (the first device) so that ``per_device_train_batch_size`` is the global
batch, as in TRL's single CPU process. The ``*-dp`` cases instead run trl_jax on its default mesh over all devices
(8 simulated CPU devices: ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` is set unless ``XLA_FLAGS`` is
already set) with ``per_device_train_batch_size = TRL's batch / 8``: the same global batch, sharded.

Usage::

    python benchmarks/parity_trainers.py                 # every case, 20 steps, prints a table
    python benchmarks/parity_trainers.py --cases sft-adamw dpo-sgd --steps 5
    python benchmarks/parity_trainers.py --markdown out.md

Importable: :func:`make_model_dir` (from :mod:`trl_jax_compare`), :func:`compare` (from :mod:`trl_jax.compare`),
:func:`make_dataset`, :func:`run_trl`, :func:`run_jax`, :func:`run_case`, ``CASES``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import numpy as np

# The comparison and the trl_jax trainer builder live in trl_jax (`trl-jax compare`); the TRL side (torch) -- the
# TRL trainer builder and the tiny PyTorch model directory -- in trl_jax_compare, shipped with it.
from trl_jax.compare import (  # noqa: F401 - re-exported for the tests and other scripts
    BOOKKEEPING,
    SUMMARY_KEYS,
    Comparison,
    build_jax_trainer,
    compare,
)
from trl_jax.compare import step_logs as _step_logs
from trl_jax_compare import build_trl_trainer, make_model_dir  # noqa: F401


# ---------------------------------------------------------------------------------------------------- assets
def make_dataset(kind: str, n: int, seed: int = 0):
    """``n`` rows of arithmetic of varied length: ``sft`` prompt/completion, ``dpo`` prompt/chosen/rejected,
    ``kto`` prompt/completion/label (labels alternate, so every batch of 2+ holds both kinds), ``reward``
    prompt/chosen/rejected, ``reward-margin`` the same plus a ``margin`` column."""
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        a, b = int(rng.integers(0, 10 ** int(rng.integers(1, 4)))), int(rng.integers(0, 100))
        prompt, good = f"{a}+{b}=", str(a + b)
        bad = str(a + b + int(rng.integers(1, 50)))
        if kind == "sft":
            rows.append({"prompt": prompt, "completion": good})
        elif kind in ("dpo", "reward"):
            rows.append({"prompt": prompt, "chosen": good, "rejected": bad})
        elif kind == "reward-margin":
            rows.append({"prompt": prompt, "chosen": good, "rejected": bad, "margin": float(rng.uniform(0.0, 1.0))})
        elif kind == "kto":
            label = bool(i % 2 == 0)
            rows.append({"prompt": prompt, "completion": good if label else bad, "label": label})
        else:
            raise ValueError(f"kind must be sft, dpo, kto, reward or reward-margin, got {kind!r}")
    return Dataset.from_list(rows)


# ---------------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One parity run: trainer ``kind`` + hyperparameters shared by both sides (``extra``: trainer-specific)."""

    name: str
    kind: str
    optim: str = "adamw_torch"
    learning_rate: float = 1e-3
    lr_scheduler_type: str = "constant"
    warmup_steps: float = 0
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    max_length: int = 32
    extra: dict = field(default_factory=dict)
    dataset: str = ""  # make_dataset kind (default: ``kind``)
    # below atol / rtol a value is compared absolutely (``compare``); reward metrics are O(0.1-1) numbers that
    # cross zero (min/max/mean_reward, margin), so a reward at 0.003 is held to 1e-5, not to 3e-9
    atol: float = 1e-6

    @property
    def data_kind(self) -> str:
        return self.dataset or self.kind


CASES = {c.name: c for c in [
    Case("sft-adamw", "sft", warmup_steps=3, lr_scheduler_type="linear"),
    Case("sft-sgd", "sft", optim="sgd", learning_rate=0.5),
    Case("sft-adamw-ga2", "sft", gradient_accumulation_steps=2, per_device_train_batch_size=2, weight_decay=0.01),
    Case("dpo-adamw", "dpo", extra={"beta": 0.1}),
    Case("dpo-sgd", "dpo", optim="sgd", learning_rate=0.5, extra={"beta": 0.1}),
    Case("dpo-adamw-ga2", "dpo", gradient_accumulation_steps=2, per_device_train_batch_size=2,
         lr_scheduler_type="linear", warmup_steps=2, extra={"beta": 0.1}),
    Case("kto-adamw", "kto", extra={"beta": 0.1}),
    Case("kto-sgd", "kto", optim="sgd", learning_rate=0.5, extra={"beta": 0.1}),
    # trl_jax on the default mesh over every device (data parallel), per-device batch = 8 / device count.
    Case("sft-adamw-dp", "sft", per_device_train_batch_size=8),
    Case("dpo-adamw-dp", "dpo", per_device_train_batch_size=8, extra={"beta": 0.1}),
    Case("kto-adamw-ga2", "kto", gradient_accumulation_steps=2, per_device_train_batch_size=2,
         extra={"beta": 0.1, "desirable_weight": 1.2}),
    Case("reward-adamw", "reward", atol=1e-5),
    # SGD at 0.1: the reward gradient has no beta to scale it down (DPO's 0.5 x beta 0.1)
    Case("reward-sgd", "reward", optim="sgd", learning_rate=0.1, atol=1e-5),
    Case("reward-adamw-ga2-margin-center", "reward", gradient_accumulation_steps=2, per_device_train_batch_size=2,
         lr_scheduler_type="linear", warmup_steps=2, weight_decay=0.01, dataset="reward-margin",
         extra={"center_rewards_coefficient": 0.01}, atol=1e-5),
    Case("reward-adamw-dp", "reward", per_device_train_batch_size=8, atol=1e-5),
]}


def _args_kwargs(case: Case, steps: int, output_dir: str) -> dict:
    kw = dict(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=case.per_device_train_batch_size,
        gradient_accumulation_steps=case.gradient_accumulation_steps, learning_rate=case.learning_rate,
        lr_scheduler_type=case.lr_scheduler_type, warmup_steps=case.warmup_steps, optim=case.optim,
        max_grad_norm=case.max_grad_norm, weight_decay=case.weight_decay, logging_steps=1, save_strategy="no",
        report_to="none", bf16=False, fp16=False, seed=0, train_sampling_strategy="sequential",
        gradient_checkpointing=False, max_length=case.max_length, disable_tqdm=True,
    )
    kw.update(case.extra)
    return kw


def rows_needed(case: Case, steps: int) -> int:
    return steps * case.per_device_train_batch_size * case.gradient_accumulation_steps


def make_reward_model_dir(causal_dir: str, path: str, seed: int = 0) -> str:
    """The causal LM of ``causal_dir`` as TRL's ``RewardTrainer`` builds it from a path (``set_seed(seed)``, then
    ``AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)``: a new random ``score`` head),
    with the tokenizer's pad id in the config, saved to ``path``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    tok = AutoTokenizer.from_pretrained(causal_dir)
    set_seed(seed)
    with suppress_seqcls_warning():
        model = AutoModelForSequenceClassification.from_pretrained(causal_dir, num_labels=1, dtype="float32")
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------- trainers
def _trl_reward_trainer(model_dir: str, kw: dict, dataset, tok):
    from trl import RewardConfig, RewardTrainer

    return RewardTrainer(model=model_dir, args=RewardConfig(**kw), train_dataset=dataset, processing_class=tok)


def _jax_reward_trainer(model_dir: str, kw: dict, dataset):
    import warnings

    from trl_jax.configs import RewardConfig
    from trl_jax.trainers import RewardTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return RewardTrainer(model=model_dir, args=RewardConfig(**kw), train_dataset=dataset)


# ---------------------------------------------------------------------------------------------------- runners
def run_trl(case: Case, model_dir: str, dataset, steps: int, output_dir: str) -> list[dict]:
    """Train with TRL's PyTorch trainer on CPU; returns its per-step ``log_history`` entries."""
    import torch
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(False)
    tok = AutoTokenizer.from_pretrained(model_dir)
    kw = _args_kwargs(case, steps, output_dir)
    kw["use_cpu"] = True
    kw["dataloader_num_workers"] = 0
    if case.kind == "reward":
        trainer = _trl_reward_trainer(model_dir, kw, dataset, tok)
    else:
        trainer = build_trl_trainer(case.kind, model_dir, kw, dataset, processing_class=tok)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    return _step_logs(trainer.state.log_history)


def run_jax(case: Case, model_dir: str, dataset, steps: int, output_dir: str, mesh_shape=(1, 1, 1)) -> list[dict]:
    """Train with trl_jax's trainer on a ``mesh_shape`` mesh; returns its per-step ``log_history`` entries.

    ``mesh_shape=None``: the trainer's default mesh over every device (data parallel); then
    ``per_device_train_batch_size`` is divided by the device count so the global batch stays TRL's.
    A fully given ``mesh_shape`` smaller than the device count (e.g. ``(1, 1, 1)`` under
    ``--xla_force_host_platform_device_count=8``) runs on the first devices (the trainer does this itself)."""
    import jax

    kw = _args_kwargs(case, steps, output_dir)
    if mesh_shape is None:
        n = jax.device_count()
        if case.per_device_train_batch_size % n:
            raise ValueError(f"{case.name}: batch {case.per_device_train_batch_size} is not a multiple of {n} devices")
        kw["per_device_train_batch_size"] = case.per_device_train_batch_size // n
    else:
        kw["mesh_shape"] = tuple(mesh_shape)
    if case.kind == "reward":
        trainer = _jax_reward_trainer(model_dir, kw, dataset)
    else:
        trainer = build_jax_trainer(case.kind, model_dir, kw, dataset)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        trainer.train()
    return _step_logs(trainer.log_history)


# ---------------------------------------------------------------------------------------------------- run
def run_case(case: Case | str, steps: int = 20, workdir: str | None = None, model_dir: str | None = None,
             mesh_shape=(1, 1, 1)) -> tuple[Comparison, dict]:
    """Build (or reuse) the model dir, run both trainers, compare. Returns ``(comparison, timings_s)``.
    Cases named ``*-dp`` run trl_jax on the default all-device (data-parallel) mesh."""
    case = CASES[case] if isinstance(case, str) else case
    if case.name.endswith("-dp"):
        mesh_shape = None
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory())
        if model_dir is None:
            model_dir = make_model_dir(os.path.join(workdir, "model"))
        if case.kind == "reward":
            model_dir = _reward_dir(model_dir, workdir)
        ds = make_dataset(case.data_kind, rows_needed(case, steps))
        t0 = time.perf_counter()
        trl_logs = run_trl(case, model_dir, ds, steps, os.path.join(workdir, f"trl-{case.name}"))
        t1 = time.perf_counter()
        jax_logs = run_jax(case, model_dir, ds, steps, os.path.join(workdir, f"jax-{case.name}"), mesh_shape)
        t2 = time.perf_counter()
    return compare(trl_logs, jax_logs, atol=case.atol), {"trl_s": t1 - t0, "jax_s": t2 - t1}


def _reward_dir(causal_dir: str, workdir: str) -> str:
    path = os.path.join(workdir, "reward-model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        make_reward_model_dir(causal_dir, path)
    return path


# ---------------------------------------------------------------------------------------------------- report
def format_report(results: dict, steps: int, rtol: float) -> str:
    lines = [f"### Loss-curve parity, {steps} steps, tolerance {rtol:g} relative", "",
             "| case | steps trl/jax | worst key (rel. err, step) | loss max rel. err | status | keys only in TRL | "
             "keys only in trl_jax | time trl/jax (s) |", "|---|---|---|---|---|---|---|---|"]
    for name, (cmp, t) in results.items():
        worst = max(cmp.max_rel, key=lambda k: cmp.max_rel[k]) if cmp.max_rel else "-"
        w = f"{worst} ({cmp.max_rel[worst]:.2e}, {cmp.worst_step[worst]})" if cmp.max_rel else "-"
        status = "ok" if cmp.ok(rtol) else "MISMATCH: " + ", ".join(sorted(cmp.failures(rtol))) or "keys"
        lines.append(f"| {name} | {cmp.steps_trl}/{cmp.steps_jax} | {w} | {cmp.max_rel.get('loss', float('nan')):.2e} "
                     f"| {status} | {', '.join(cmp.only_trl) or '-'} | {', '.join(cmp.only_jax) or '-'} "
                     f"| {t['trl_s']:.1f}/{t['jax_s']:.1f} |")
    lines.append("")
    for name, (cmp, _) in results.items():
        lines.append(f"<details><summary>{name}: per-key max relative error</summary>\n")
        lines.append("| key | max rel. err | at step | steps over tolerance | TRL first/last | trl_jax first/last |")
        lines.append("|---|---|---|---|---|---|")
        for k in sorted(cmp.max_rel):
            a, b = cmp.curves[k]
            bad = ", ".join(map(str, cmp.bad_steps[k])) or "-"
            lines.append(f"| {k} | {cmp.max_rel[k]:.2e} | {cmp.worst_step[k]} | {bad} | {a[0]:.6g} / {a[-1]:.6g} "
                         f"| {b[0]:.6g} / {b[-1]:.6g} |")
        lines.append("\n</details>\n")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rtol", type=float, default=1e-3)
    p.add_argument("--markdown", default=None, help="append the report to this file")
    a = p.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(os.path.join(tmp, "model"))
        for name in a.cases:
            results[name] = run_case(name, a.steps, workdir=tmp, model_dir=model_dir)
            cmp = results[name][0]
            print(f"{name}: {'ok' if cmp.ok(a.rtol) else 'MISMATCH'} loss={cmp.max_rel.get('loss')} "
                  f"fail={ {k: cmp.bad_steps[k] for k in cmp.failures(a.rtol)} } only_trl={cmp.only_trl} "
                  f"only_jax={cmp.only_jax}", flush=True)
    report = format_report(results, a.steps, a.rtol)
    print(report)
    if a.markdown:
        with open(a.markdown, "a", encoding="utf-8") as f:
            f.write(report + "\n")
    return 0 if all(c.ok(a.rtol) for c, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
