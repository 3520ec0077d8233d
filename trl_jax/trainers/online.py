"""The online layer shared by the trainers that learn from their own samples (GRPO, RLOO).

:class:`OnlineTrainer` is everything between the dataset and the loss:

* A *generation batch* is ``per_device_train_batch_size x data-parallel devices x steps_per_generation`` rows:
  ``U = rows / num_generations`` prompts, each repeated ``num_generations`` times in a row (TRL's
  ``RepeatSampler`` order; prompts shuffled per epoch when ``shuffle_dataset``). Prompts are left-padded to one
  bucket length (the longest tokenized prompt, rounded up to a multiple of 8) and sampled with the jitted KV-cache
  sampler (:func:`trl_jax.generation.generate`) using the *current* policy params; completions are
  ``max_completion_length`` columns, right-padded.
* Completions are decoded (:func:`trl_jax.data.decode.decode_and_strip_padding`; conversational prompts get
  ``[{"role": "assistant", "content": text}]``) and scored by every reward function / reward model; the subclass
  turns the ``[N, F]`` rewards into advantages (:meth:`OnlineTrainer.compute_advantages`). The generation batch is
  shuffled, cut into ``steps_per_generation`` slices and reused ``num_iterations`` times; old log-probs are computed
  at generation time when :meth:`OnlineTrainer.keep_old_logps` says so (TRL's rule: when the buffer outlives one
  optimizer step).
* The subclass's loss (:meth:`OnlineTrainer.loss_terms`) runs inside the shared jitted step.

Generation metrics (``reward``, ``reward_std``, ``rewards/<name>/mean|std``, ``frac_reward_zero_std``,
``completions/*``) are logged once per generation (NaN on steps that only reuse a buffer, ignored by the window
average); loss metrics once per step. The last generation batch's prompts, completions, rewards and advantages are
appended to ``<output_dir>/completions.jsonl`` at every logging step (TRL's completions table).

Several processes (multi-host): the prompts are sampled as one global batch (the same draws as one process); each
process decodes and scores only its own rows (:meth:`BaseTrainer._local_rows`), the ``[B_local, n_funcs]`` rewards
are all-gathered so the group advantages and generation metrics are the one-process numbers, each process hands the
loop its rows (``LocalBatch``), and process 0 alone decodes every row for the completions table and writes it.
"""

from __future__ import annotations

import abc

import collections
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from trl_jax.data.decode import decode_and_strip_padding
from trl_jax.data.formats import is_conversational
from trl_jax.losses.base import LossTerms
from trl_jax.losses.grpo import truncated_completions
from trl_jax.ops import fused_log_probs
from trl_jax.models.model import final_logit_softcapping
from trl_jax.models.moe import router_aux_loss
from trl_jax.parallel import batch_parallel_size
from trl_jax.parallel.distributed import (gather_to_host, is_main_process, is_multiprocess, make_global_batch,
                                          process_rows, sum_over_processes)
from trl_jax.train.checkpoint import as_path
from trl_jax.trainers.base import BaseTrainer, LocalBatch, kernel_choices, prompt_columns, reject_unsupported
from trl_jax.trainers.logging import AppendFile, truncate_jsonl
from trl_jax.trainers.reference import ReferenceModelMixin

_PROMPT_BUCKET = 8


def _round_up(n: int, m: int) -> int:
    return max(-(-int(n) // m) * m, m)


def _left_pad(rows: list[list[int]], length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(rows), length), pad, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        if len(r) > length:
            raise ValueError(f"prompt of {len(r)} tokens is longer than the prompt bucket ({length}).")
        if r:
            ids[i, length - len(r):] = r
            mask[i, length - len(r):] = 1
    return ids, mask


#: Reward-model batches are padded to one of these lengths (then to the next power of two past them): powers of
#: two from 64, so scoring compiles once per bucket, not once per batch length.
REWARD_MODEL_MIN_BUCKET = 64


def reward_model_bucket(n: int, cap: int | None = None) -> int:
    """Padded length of a reward-model batch whose longest row has ``n`` tokens: the smallest power of two
    ``>= max(n, 64)``; with ``cap`` (the policy's prompt + completion length, rounded up to 64) a power of two past
    ``cap`` is replaced by ``cap`` when ``n`` fits in it, so the largest bucket is never padded beyond the longest
    possible sequence. At most ``log2(cap / 64) + 2`` distinct lengths, one compile each."""
    n = max(int(n), 1)
    b = REWARD_MODEL_MIN_BUCKET
    while b < n:
        b *= 2
    if cap is not None:
        cap = _round_up(cap, REWARD_MODEL_MIN_BUCKET)
        if n <= cap < b:
            return cap
    return b


def gather_rows(local: np.ndarray, mesh) -> np.ndarray:
    """Every process's rows ``[B_local, ...]`` (this process's block :func:`process_rows` of a global batch) as
    the whole ``[B, ...]`` host array, on every process (``process_allgather``, blocks put in row order). One
    process: ``local`` itself. Every process must call it."""
    if not is_multiprocess():
        return local
    from jax.experimental import multihost_utils

    local = np.asarray(local)
    n = int(np.asarray(multihost_utils.process_allgather(np.int32(local.shape[0]))).sum())
    start = process_rows(mesh, n).start
    starts = np.asarray(multihost_utils.process_allgather(np.int32(start))).reshape(-1)
    every = np.asarray(multihost_utils.process_allgather(local, tiled=True))
    blocks = np.split(every, len(starts))
    return np.concatenate([blocks[i] for i in np.argsort(starts, kind="stable")], axis=0)


def _add_phase(trainer, name: str, t0: float) -> None:
    """Accumulate host wall time since ``t0`` under ``trainer.phase_seconds[name]`` (the benchmark's phase split)."""
    d = trainer.__dict__.setdefault("phase_seconds", {})
    d[name] = d.get(name, 0.0) + time.perf_counter() - t0


def reward_func_name(func) -> str:
    """TRL's naming: a function's ``__name__``, a reward model's checkpoint directory name."""
    if isinstance(func, str):
        return os.path.basename(func.rstrip("/"))
    if isinstance(func, tuple):
        m = func[0]
        name = getattr(m, "name_or_path", None) or getattr(getattr(m, "hf_config", None), "_name_or_path", None)
        return os.path.basename(str(name).rstrip("/")) if name else "reward_model"
    return getattr(func, "__name__", type(func).__name__)


def tokenize_prompts(dataset, tokenizer, chat_template_kwargs=None):
    """Each row's ``prompt`` as ``prompt_ids`` (conversational prompts through the chat template with the
    generation prompt, as TRL's sampling trainers tokenize them)."""
    kw = chat_template_kwargs if isinstance(chat_template_kwargs, dict) else {}

    def tokenize(example):
        p = example["prompt"]
        if is_conversational({"prompt": p}):
            ids = tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                **kw)["input_ids"]
        else:
            ids = tokenizer(text=p)["input_ids"]
        return {"prompt_ids": list(ids)}

    return dataset.map(tokenize)


def completion_metrics(lengths: np.ndarray, truncated: np.ndarray) -> dict[str, float]:
    """TRL's ``completions/*`` metrics from completion lengths ``[B]`` and not-ended-with-EOS flags ``[B]``."""
    lengths = lengths.astype(np.float64)
    term = lengths[~truncated] if (~truncated).any() else np.zeros(1)
    return {
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": float(truncated.mean()),
        "completions/mean_terminated_length": float(term.mean()),
        "completions/min_terminated_length": float(term.min()),
        "completions/max_terminated_length": float(term.max()),
    }


class _StepWithHostMetrics:
    """Wraps the compiled train step: adds this step's host-side generation metrics to the returned metrics."""

    def __init__(self, inner, trainer):
        self._inner, self._trainer = inner, trainer

    def __call__(self, state, batch):
        state, metrics = self._inner(state, batch)
        metrics = dict(metrics)
        metrics.update(self._trainer._step_host_metrics)
        return state, metrics

    def __getattr__(self, name):
        return getattr(self._inner, name)


class OnlineTrainer(ReferenceModelMixin, BaseTrainer):
    """The shared part of ``GRPOTrainer`` and ``RLOOTrainer``: ``Trainer(model, reward_funcs, args=...,
    train_dataset=..., processing_class=...)``.

    ``reward_funcs``: one or a list of: Python callables with TRL's signature (``prompts``, ``completions``,
    ``completion_ids`` and the dataset's other columns as keyword lists; return floats or ``None``), built-in names
    (:data:`trl_jax.rewards.REWARD_FUNCS`) or dotted import paths, and reward models (a local directory / hub id of
    a ``*ForSequenceClassification`` checkpoint, or a ``(CausalLM, params)`` pair with a ``score`` head).
    ``reward_processing_classes``: the reward models' tokenizers (default: loaded from the checkpoint, else the
    policy's tokenizer).

    A subclass sets ``_tag`` and ``config_class`` and defines :meth:`compute_advantages` (rewards -> advantages and
    generation metrics) and :meth:`loss_terms` (one micro-batch's loss).
    """

    _pad_last_batch = False

    def __init__(self, model, reward_funcs=None, args=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, reward_processing_classes=None, callbacks=None,
                 optimizers=None, quantization_config=None, peft_config=None, tools=None, rollout_func=None,
                 environment_factory=None):
        reject_unsupported(type(self).__name__, optimizers=optimizers, quantization_config=quantization_config,
                           tools=tools, rollout_func=rollout_func,
                           environment_factory=environment_factory)
        if args is not None:
            self._check_args(args)
        self._prompt_len = {}
        super().__init__(model, args, train_dataset, eval_dataset, processing_class, callbacks, peft_config=peft_config)
        self._check_args(self.args)
        self._setup_rewards(reward_funcs, reward_processing_classes)
        tok = self.processing_class
        self.pad_token_id = int(tok.pad_token_id)
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        extra = (self.args.generation_kwargs or {}).get("eos_token_id") if isinstance(
            self.args.generation_kwargs, dict) else None
        if extra is not None:
            eos += [extra] if isinstance(extra, int) else list(extra)
        self.eos_token_ids = list(dict.fromkeys(int(e) for e in eos))
        if not self.eos_token_ids:
            raise ValueError("The tokenizer has no eos_token_id; set `eos_token` in the config.")
        self._gen_cache: dict[int, list[dict]] = {}
        self._step_host_metrics: dict[str, float] = {}
        self._gen_metric_keys: list[str] | None = None
        self._pending_tokens = 0.0
        self._table = collections.deque(maxlen=self.generation_rows)
        self._logps_jit = None
        self._generated_step = None

    # ------------------------------------------------------------------ config
    @staticmethod
    def _check_args(args):
        if args.use_vllm:
            raise ValueError("use_vllm=True: trl_jax generates with its own jitted JAX sampler; set use_vllm=False.")
        if args.max_completion_length is None or args.max_completion_length < 1:
            raise ValueError("max_completion_length must be a positive int (completions are padded to it).")

    @property
    def num_generations(self) -> int:
        return int(self.args.num_generations)

    @property
    def steps_per_generation(self) -> int:
        return int(self.args.steps_per_generation)

    @property
    def generation_rows(self) -> int:
        """Rows (completions) in one generation batch: micro-batch rows x ``steps_per_generation``."""
        rows = self.micro_batch_rows * self.steps_per_generation
        if rows % self.num_generations:
            raise ValueError(
                f"The generation batch ({rows} = per_device_train_batch_size x {batch_parallel_size(self.mesh)} "
                f"devices x steps_per_generation {self.steps_per_generation}) must be divisible by num_generations "
                f"({self.num_generations}); change per_device_train_batch_size or num_generations."
            )
        return rows

    # ------------------------------------------------------------------ reference model (only when beta != 0)
    def _resolve_ref_model(self, ref_model):
        if self.args.beta == 0.0:
            return None
        return super()._resolve_ref_model(ref_model)

    def _ref_params_for_state(self):
        return self.ref_model_params

    # ------------------------------------------------------------------ rewards
    def _setup_rewards(self, reward_funcs, reward_processing_classes):
        from trl_jax.rewards import resolve_reward_funcs

        funcs = resolve_reward_funcs(reward_funcs)
        if not funcs:
            raise ValueError(f"{type(self).__name__} needs at least one reward function or reward model in `reward_funcs`.")
        if reward_processing_classes is None or not isinstance(reward_processing_classes, (list, tuple)):
            reward_processing_classes = [reward_processing_classes] * len(funcs)
        if len(reward_processing_classes) != len(funcs):
            raise ValueError(f"Got {len(reward_processing_classes)} reward_processing_classes for {len(funcs)} "
                             "reward functions; pass one per reward function (None for Python functions).")
        self.reward_func_names = [reward_func_name(f) for f in funcs]
        self.reward_funcs, self.reward_processing_classes = [], []
        for f, rpc in zip(funcs, reward_processing_classes, strict=True):
            if isinstance(f, (str, os.PathLike)):
                from trl_jax.assets import resolve_model_path
                from trl_jax.models import from_pretrained

                path = resolve_model_path(os.fspath(f))
                m, p = from_pretrained(path, mesh=self.mesh, scan_layers=self.args.scan_layers,
                                       **kernel_choices(self.args))
                if rpc is None:
                    from transformers import AutoTokenizer

                    rpc = AutoTokenizer.from_pretrained(path)
                f = (m, p)
            if isinstance(f, tuple):
                if "score" not in f[1]:
                    raise ValueError(f"Reward model {reward_func_name(f)!r} has no `score` head: pass a "
                                     "*ForSequenceClassification checkpoint.")
                rpc = rpc if rpc is not None else self.processing_class
                if rpc.pad_token_id is None:
                    rpc.pad_token = rpc.eos_token
            elif not callable(f):
                raise TypeError(f"reward_funcs entries must be callables, names or reward models; got {type(f)}.")
            self.reward_funcs.append(f)
            self.reward_processing_classes.append(rpc)
        w = self.args.reward_weights
        if w is not None and len(w) != len(self.reward_funcs):
            raise ValueError(f"Number of reward weights ({len(w)}) must match number of reward functions "
                             f"({len(self.reward_funcs)}).")
        self.reward_weights = np.asarray(w if w is not None else [1.0] * len(self.reward_funcs), np.float32)
        self._rm_jit = {}

    def _call_reward_func(self, i, func, prompts, completions, completion_ids, kwargs):
        name = self.reward_func_names[i]
        try:
            out = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised with the offending completion named
            bad = self._find_offender(func, prompts, completions, completion_ids, kwargs)
            where = ("on the batch as a whole (no single completion fails alone); first completion: "
                     f"{completions[0]!r}") if bad is None else (
                f"on completion {bad}: {completions[bad]!r} (prompt: {prompts[bad]!r})")
            raise RuntimeError(
                f"Reward function {name!r} raised {type(e).__name__}: {e} -- {where}. Fix the reward function (return "
                "None for completions it cannot score)."
            ) from e
        out = [float("nan") if r is None else float(r) for r in out]
        if len(out) != len(prompts):
            raise ValueError(
                f"The reward function '{name}' returned {len(out)} rewards, but {len(prompts)} were expected (one per "
                "prompt-completion pair). Make sure the reward function returns exactly one reward per completion."
            )
        return out

    @staticmethod
    def _find_offender(func, prompts, completions, completion_ids, kwargs):
        for j in range(len(prompts)):
            kw = {k: ([v[j]] if isinstance(v, list) and len(v) == len(prompts) else v) for k, v in kwargs.items()}
            try:
                func(prompts=[prompts[j]], completions=[completions[j]], completion_ids=[completion_ids[j]], **kw)
            except Exception:  # noqa: BLE001
                return j
        return None

    def _dispatch_reward_model(self, i, prompts, completions):
        """Tokenize for reward model ``i``, pad to its length bucket (:func:`reward_model_bucket`) and start the
        scoring forward pass without waiting: returns the device scores ``[N, num_labels]``. One compile per bucket,
        counted in ``self.reward_model_compiles[i]``."""
        from trl_jax.data.chat_template import apply_chat_template

        model, params = self.reward_funcs[i]
        rpc = self.reward_processing_classes[i]
        if is_conversational({"prompt": prompts[0]}):
            texts = [apply_chat_template({"messages": p + c}, rpc)["text"] for p, c in zip(prompts, completions)]
        else:
            texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        enc = rpc(text=texts, add_special_tokens=False)["input_ids"]
        cap = self.prompt_length + int(self._sampling_kwargs()["max_new_tokens"])
        longest, num_rows = max(len(e) for e in enc), len(enc)
        if is_multiprocess():  # this process's rows of the batch: one bucket and one global batch for all
            from jax.experimental import multihost_utils

            every = np.asarray(multihost_utils.process_allgather(np.asarray([longest, len(enc)], np.int32)))
            every = every.reshape(-1, 2)
            longest, num_rows = int(every[:, 0].max()), int(every[:, 1].sum())
        length = reward_model_bucket(longest, cap)
        ids = np.full((len(enc), length), rpc.pad_token_id, np.int32)
        mask = np.zeros_like(ids)
        for r, e in enumerate(enc):
            ids[r, :len(e)], mask[r, :len(e)] = e, 1
        if is_multiprocess():
            g = make_global_batch({"ids": ids, "mask": mask}, self.mesh, num_rows)
            ids, mask = g["ids"], g["mask"]
        compiles = self.__dict__.setdefault("reward_model_compiles", {})
        if i not in self._rm_jit:
            pad = int(rpc.pad_token_id)

            def score(p, x, m, i=i):
                compiles[i] = compiles.get(i, 0) + 1  # runs once per trace, i.e. per compiled bucket
                return model.sequence_scores(p, x, attention_mask=m, pad_token_id=pad)

            self._rm_jit[i] = jax.jit(score)
        return self._rm_jit[i](params, ids, mask)

    def _fetch_reward_model_scores(self, pending) -> np.ndarray:
        """A dispatched reward-model batch's scores ``[N_local, num_labels]`` fp32: this process's rows of the
        global batch scored on every process's devices (all of them with one process)."""
        scores = np.asarray(gather_to_host(pending), np.float32)
        if is_multiprocess():
            scores = scores[process_rows(self.mesh, scores.shape[0])]
        return scores

    def _reward_model_scores(self, i, prompts, completions):
        return self._fetch_reward_model_scores(self._dispatch_reward_model(i, prompts, completions))[:, 0].tolist()

    def _calculate_rewards(self, rows, prompts, completions, completion_ids):
        """``[N, F]`` rewards (NaN where a function returned ``None``), TRL's ``_calculate_rewards``."""
        keys = [k for k in rows[0] if k not in ("prompt", "completion", "completion_ids", "prompt_ids")]
        kwargs = {k: [r[k] for r in rows] for k in keys}
        kwargs["trainer_state"] = self.trainer_state
        kwargs["log_extra"] = lambda column, values: None
        kwargs["log_metric"] = self._log_metric
        out = np.zeros((len(prompts), len(self.reward_funcs)), np.float32)
        # Reward models first: their forward passes run on the device while the Python functions run on the host.
        pending = {i: self._dispatch_reward_model(i, prompts, completions)
                   for i, func in enumerate(self.reward_funcs) if isinstance(func, tuple)}
        order = [i for i in range(len(self.reward_funcs)) if i not in pending] + list(pending)
        for i in order:
            func = self.reward_funcs[i]
            if i in pending:
                out[:, i] = self._fetch_reward_model_scores(pending[i])[:, 0]
            else:
                out[:, i] = self._call_reward_func(i, func, prompts, completions, completion_ids, kwargs)
            infinite = np.isinf(out[:, i])
            if infinite.any():  # TRL would turn it into a NaN advantage, then a silent 0; refuse instead
                r = int(np.nonzero(infinite)[0][0])
                raise ValueError(
                    f"Reward function {self.reward_func_names[i]!r} returned {out[r, i]} for completion {r}: "
                    f"{completions[r]!r} (prompt: {prompts[r]!r}); {int(infinite.sum())} of {len(prompts)} rewards "
                    "are infinite. Rewards must be finite: clip the value, or return None (NaN) for a completion "
                    "the function cannot score."
                )
        # TRL 1.16: None and NaN are the same ("not applicable"): nansum across functions; a completion that no
        # function scores is left out of the baselines with advantage 0 (compute_advantages), with TRL's warning.
        unscorable = np.isnan(out).all(axis=1)
        if unscorable.any():
            r = int(np.nonzero(unscorable)[0][0])
            row_kwargs = {k: v[r] for k, v in kwargs.items()
                          if k not in ("trainer_state", "log_extra", "log_metric")}
            row_kwargs["prompt"] = prompts[r]
            row_kwargs["completion"] = completions[r]
            print(f"[trl_jax] warning: All reward functions returned None for the following kwargs:\n{row_kwargs}\n"
                  "Please ensure that at least one reward function returns a valid reward.", file=sys.stderr)
        return out

    def _log_metric(self, name, value):
        self._user_metrics.setdefault(name, []).append(float(value))

    def _gather_user_metrics(self) -> None:
        """With several processes, each reward function logged metrics (``log_metric``) for its own rows: every
        process's values, as a (sum, count) per name, so that the logged mean is over all of them."""
        if not is_multiprocess() or not self._user_metrics:
            return
        local = {}
        for k, v in self._user_metrics.items():
            local[f"{k}\x00sum"], local[f"{k}\x00n"] = float(np.sum(v)), float(len(v))
        total = sum_over_processes(local)
        self._user_metrics = {k: [total[f"{k}\x00sum"] / max(total[f"{k}\x00n"], 1.0)] for k in self._user_metrics}

    # ------------------------------------------------------------------ data
    def _prepare_dataset(self, dataset, split):
        prompt_columns(dataset, split, type(self).__name__)
        dataset = tokenize_prompts(dataset, self.processing_class, self.args.chat_template_kwargs)
        self._prompt_len[split] = max(len(x) for x in dataset["prompt_ids"])
        return dataset

    @property
    def prompt_length(self) -> int:
        """The prompt bucket: longest tokenized prompt over the datasets, rounded up to a multiple of 8."""
        return _round_up(max(self._prompt_len.values()), _PROMPT_BUCKET)

    def _collate(self, rows, num_rows):
        raise TypeError(f"{type(self).__name__} builds its batches from generated completions; it has no row collator.")

    def steps_per_epoch(self) -> int:
        u = self.generation_rows // self.num_generations
        gens = len(self.train_dataset) // u
        if gens == 0:
            raise ValueError(
                f"The train dataset has {len(self.train_dataset)} prompts, fewer than one generation batch needs "
                f"({u}); lower per_device_train_batch_size or steps_per_generation."
            )
        micro = gens * self.steps_per_generation * self.args.num_iterations
        return max(micro // self.args.gradient_accumulation_steps, 1)

    def _prompt_order(self, epoch: int) -> np.ndarray:
        n = len(self.train_dataset)
        if not self.args.shuffle_dataset:
            return np.arange(n)
        return np.random.default_rng([self.args.seed, epoch]).permutation(n)

    # ------------------------------------------------------------------ generation
    def _sampling_kwargs(self):
        a = self.args
        return dict(
            max_new_tokens=int(a.max_completion_length), temperature=a.temperature,
            top_k=a.top_k or None, top_p=None if a.top_p == 1.0 else a.top_p, min_p=a.min_p,
            repetition_penalty=None if a.repetition_penalty == 1.0 else a.repetition_penalty,
            eos_token_id=self.eos_token_ids, pad_token_id=self.pad_token_id,
        )

    def _sample(self, params, prompt_ids, prompt_mask, rng, *, num_generations: int = 1,
                group_layout: str = "consecutive", return_logprobs: bool = False):
        """Sample with the policy cast and resharded to its decode layout (``args.decode_layout``, default
        ``"auto"``; ``None``: the params as given); rows that are ``num_generations`` copies of each prompt (checked
        here) share one prefill. Returns numpy ``(completion_ids, completion_mask)``, plus the sampled tokens'
        log-probs ``[B, C]`` fp32 (0 after EOS) with ``return_logprobs``. The phase's wall time (sampling dispatch
        to the fetched tokens: prefill + decode) accumulates in ``self.phase_seconds["generate"]``."""
        from trl_jax.generation import generate, rows_grouped

        t0 = time.perf_counter()
        g = num_generations if rows_grouped(prompt_ids, prompt_mask, num_generations, group_layout) else 1
        batch = self._device_batch({"ids": prompt_ids, "mask": prompt_mask})
        out = generate(self.model, params, batch["ids"], batch["mask"], rng, mesh=self.mesh,
                       return_logprobs=return_logprobs, check_inputs=False, decode_layout=self.args.decode_layout,
                       decode_block_size=int(self.args.decode_block_size), num_generations=g,
                       group_layout=group_layout, **self._sampling_kwargs())
        fetched = gather_to_host((out.completion_ids, out.completion_mask) + ((out.logprobs,) if return_logprobs
                                                                              else ()))
        _add_phase(self, "generate", t0)
        return tuple(np.asarray(x) for x in fetched)

    def sampler_logps_are_exact(self) -> bool:
        """Are the sampler's log-probs those of the training forward's distribution (``log_softmax(logits /
        temperature)`` of the same params, in fp32)? True unless a warper or penalty reshapes the sampling
        distribution (``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``) or the model computes in a low
        precision (bf16: the KV-cache decode and the full forward then differ by bf16 rounding, so on the first
        iteration the ratio would not be exactly 1 as in TRL). The sampler's log-probs are then TRL's recomputed
        ``old_per_token_logps`` up to fp32 association, and they are used instead of a second forward pass
        (:attr:`reuse_sampler_logps`)."""
        kw = self._sampling_kwargs()
        dtype = getattr(getattr(self.model, "config", None), "dtype", None)
        fp32 = dtype is not None and jnp.dtype(dtype) == jnp.float32
        unwarped = (kw["top_k"] is None and kw["top_p"] is None and kw["min_p"] in (None, 0.0)
                    and kw["repetition_penalty"] is None)
        return unwarped and (fp32 or self.reuse_sampler_logps == "always")

    #: Use the sampler's log-probs as ``old_per_token_logps`` where TRL recomputes them at generation time and they
    #: are the same distribution (:meth:`sampler_logps_are_exact`); ``"always"`` also in bf16 (the sampler's own
    #: rounding, as TRL's vLLM log-probs); False always recomputes them (TRL's code path).
    reuse_sampler_logps = True

    def _token_logps(self, params, batch, *, entropy=False, aux_loss=False):
        """Per-token log-probs (and entropies) of the completion tokens: ``[R, C]`` fp32.

        ``batch``: ``input_ids [R, P + C]`` (left-padded prompt + right-padded completion), ``segment_ids`` (1 = real
        token), ``completion_ids [R, C]``, ``completion_mask [R, C]``. Logits are divided by ``temperature``.
        ``aux_loss`` (mixture-of-experts models): also return the load-balancing loss of this forward over the real
        tokens, as ``(log-probs result, aux)``.
        """
        ids, seg = batch["input_ids"], batch["segment_ids"]
        c = batch["completion_ids"].shape[1]
        pos = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
        if aux_loss:
            hidden, router_logits = self.model.hidden_states_and_router_logits(params, ids, pos, seg)
        else:
            hidden = self.model.hidden_states(params, ids, pos, seg)
        h = hidden[:, ids.shape[1] - c - 1:-1]
        out = fused_log_probs(
            h, self.model.lm_head_weight(params), batch["completion_ids"], chunk_size=self.args.logprob_chunk_size,
            temperature=self.args.temperature, return_entropy=entropy, mask=batch["completion_mask"].astype(bool),
            final_logit_softcapping=final_logit_softcapping(self.model),
        )
        if not aux_loss:
            return out
        return out, router_aux_loss(router_logits, self.model.config.num_experts_per_tok, seg != 0)

    def _dispatch_old_logps(self, params, arrays) -> list:
        """Start the old-log-prob forward passes (one per micro-batch) without waiting: device arrays; fetch them
        with :meth:`_fetch_old_logps` once the host work that runs meanwhile is done (JAX's async dispatch)."""
        if self._logps_jit is None:
            self._logps_jit = jax.jit(lambda p, b: self._token_logps(p, b))
        rows = self.micro_batch_rows
        keys = ("input_ids", "segment_ids", "completion_ids", "completion_mask")
        return [self._logps_jit(params, self._device_batch({k: arrays[k][s:s + rows] for k in keys}))
                for s in range(0, arrays["input_ids"].shape[0], rows)]

    def _fetch_old_logps(self, pending: list) -> np.ndarray:
        t0 = time.perf_counter()
        out = np.concatenate([np.asarray(x, np.float32) for x in gather_to_host(pending)], axis=0)
        _add_phase(self, "old_logps_wait", t0)
        return out

    def _old_logps(self, params, arrays):
        return self._fetch_old_logps(self._dispatch_old_logps(params, arrays))

    def _rows_for_generation(self, gen_index: int) -> list[dict]:
        u = self.generation_rows // self.num_generations
        gens_per_epoch = len(self.train_dataset) // u
        epoch, within = divmod(gen_index, gens_per_epoch)
        idx = self._prompt_order(epoch)[within * u:(within + 1) * u]
        return [self.train_dataset[int(i)] for i in idx for _ in range(self.num_generations)]

    def generate_and_score(self, rows: list[dict], params, rng, *, num_generations: int, shuffle_seed=None,
                           with_old_logps: bool = False):
        """Sample, decode, score one generation batch (``rows`` already repeated ``num_generations`` times).

        Returns ``(arrays, metrics, table)``: ``arrays`` is a dict of numpy arrays with one row per completion
        (``input_ids``, ``segment_ids``, ``completion_ids``, ``completion_mask``, ``advantages``,
        ``num_items_in_batch``; with ``with_old_logps`` also ``old_per_token_logps``, the log-probs under ``params``),
        ``metrics`` TRL's generation metrics, ``table`` the rows of the completions table.

        Device work is dispatched before the host work it does not depend on (JAX's async dispatch): the
        old-log-prob forward passes start before the completions are decoded and the reward functions run, and
        reward models are scored on the device while the Python reward functions run. The numbers are those of the
        serial order. Where the sampler's log-probs are exactly ``old_per_token_logps``
        (:meth:`sampler_logps_are_exact`, :attr:`reuse_sampler_logps`), they are used and no forward pass runs.
        """
        args = self.args
        prompts = [r["prompt"] for r in rows]
        prompt_ids, prompt_mask = _left_pad([r["prompt_ids"] for r in rows], self.prompt_length, self.pad_token_id)
        reuse = bool(with_old_logps and self.reuse_sampler_logps and self.sampler_logps_are_exact())
        sampled = self._sample(params, prompt_ids, prompt_mask, rng, num_generations=num_generations,
                               return_logprobs=reuse)
        cids, cmask = sampled[0], sampled[1]
        truncated = np.asarray(truncated_completions(cids, cmask, self.eos_token_ids, self.pad_token_id))
        loss_mask = cmask * (~truncated)[:, None] if args.mask_truncated_completions else cmask
        n = len(rows)
        arrays = {
            "input_ids": np.concatenate([prompt_ids, cids], axis=1).astype(np.int32),
            "segment_ids": np.concatenate([prompt_mask, loss_mask], axis=1).astype(np.int32),
            "completion_ids": cids.astype(np.int32),
            "completion_mask": loss_mask.astype(np.int32),
        }
        pending_old = self._dispatch_old_logps(params, arrays) if with_old_logps and not reuse else None
        pending_extra = self._dispatch_generation_forwards(params, arrays)
        t_host = time.perf_counter()
        lengths = cmask.sum(axis=1)
        # Decoding and the reward functions: this process's rows only (all rows with one process); the rewards of
        # every process's rows are then gathered, so the group statistics are those of the whole batch.
        sl = self._local_rows(n)
        everything = (sl.start, sl.stop) == (0, n)
        conversational = is_conversational({"prompt": prompts[0]})

        def decode(r):
            texts = decode_and_strip_padding(cids[r], self.processing_class, mask=cmask[r], think_start=None,
                                             think_end=None)
            return [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts

        completion_ids_list = [row[:k].tolist() for row, k in zip(cids[sl], lengths[sl], strict=True)]
        completions = decode(sl)

        self._user_metrics = {}
        rewards_per_func = gather_rows(
            self._calculate_rewards(rows[sl], prompts[sl], completions, completion_ids_list), self.mesh)
        self._gather_user_metrics()
        if reuse:  # the sampler's log-probs, zero where the loss mask is (the recomputed path's convention)
            arrays["old_per_token_logps"] = (sampled[2] * loss_mask).astype(np.float32)
        elif pending_old is not None:
            arrays["old_per_token_logps"] = self._fetch_old_logps(pending_old)
        advantages, adv_metrics = self.compute_advantages(rewards_per_func, arrays, num_generations=num_generations,
                                                          pending=pending_extra)
        advantages = np.asarray(advantages, np.float32)
        arrays["advantages"] = advantages
        arrays["num_items_in_batch"] = np.full((n,), float(loss_mask.sum()), np.float32)
        metrics = completion_metrics(lengths, truncated)
        metrics.update({k: float(v) for k, v in jax.device_get(adv_metrics).items()})
        metrics.update({k: float(np.mean(v)) for k, v in self._user_metrics.items()})
        # this process's rows' tokens (the loop sums the counters over processes)
        self._pending_tokens += float(prompt_mask[sl].sum() + lengths[sl].sum())
        # the completions table: process 0 decodes every row (the sampled ids are on every process)
        table = []
        if everything or is_main_process():
            table = [
                {"prompt": p, "completion": c, **{name: float(rewards_per_func[j, i]) if not math.isnan(
                    rewards_per_func[j, i]) else None for i, name in enumerate(self.reward_func_names)},
                 "advantage": float(advantages[j])}
                for j, (p, c) in enumerate(zip(prompts, completions if everything else decode(slice(0, n)),
                                               strict=True))
            ]
        _add_phase(self, "host", t_host)
        return arrays, metrics, table

    def _generation(self, gen_index: int):
        """Generate, score and slice generation batch ``gen_index`` (TRL's buffered ``_generate_and_score``)."""
        args = self.args
        rows = self._rows_for_generation(gen_index)
        rng = jax.random.fold_in(jax.random.PRNGKey(args.seed + 1), gen_index)
        arrays, metrics, table = self.generate_and_score(
            rows, self.state.params, rng, num_generations=self.num_generations, with_old_logps=self.keep_old_logps())
        perm = np.random.default_rng([args.seed, gen_index, 7]).permutation(len(rows))
        arrays = {k: v[perm] for k, v in arrays.items()}
        m = self.micro_batch_rows
        slices = [{k: v[s * m:(s + 1) * m] for k, v in arrays.items()} for s in range(self.steps_per_generation)]
        self._table.extend(table)
        return slices, metrics

    def _batch_for_step(self, step: int):
        ga = self.args.gradient_accumulation_steps
        per_gen = self.steps_per_generation * self.args.num_iterations
        parts, new_metrics = [], []
        for j in range(ga):
            micro = step * ga + j
            g = micro // per_gen
            if g not in self._gen_cache:
                slices, metrics = self._generation(g)
                self._gen_cache = {g: slices}
                new_metrics.append(metrics)
            parts.append(self._gen_cache[g][micro % self.steps_per_generation])
        if self._gen_metric_keys is None:
            self._gen_metric_keys = sorted(new_metrics[0])
        self._step_host_metrics = {
            k: float(np.mean([m[k] for m in new_metrics if k in m])) if new_metrics else float("nan")
            for k in self._gen_metric_keys
        }
        batch = {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}
        n = batch["input_ids"].shape[0]
        sl = self._local_rows(n)
        return LocalBatch({k: v[sl] for k, v in batch.items()}, n)

    def _batch_stats(self, batch):
        tokens, self._pending_tokens = self._pending_tokens, 0.0
        return {"num_tokens": tokens}

    def _build(self, total_steps: int):
        super()._build(total_steps)
        self._train_step = _StepWithHostMetrics(self._train_step, self)

    # ------------------------------------------------------------------ the subclass's objective
    def keep_old_logps(self) -> bool:
        """Compute ``old_per_token_logps`` at generation time? TRL's rule: only when the buffer outlives one
        optimizer step (else the ratio is exactly 1 and the loss uses the current log-probs)."""
        generate_every = self.steps_per_generation * self.args.num_iterations
        return self.args.gradient_accumulation_steps % generate_every != 0

    def _dispatch_generation_forwards(self, params, arrays):
        """Device work the advantages need besides the old log-probs (e.g. reference log-probs), started before
        the host work (decoding, reward functions) and handed to :meth:`compute_advantages` as ``pending``."""
        return None

    @abc.abstractmethod
    def compute_advantages(self, rewards_per_func, arrays, *, num_generations: int, pending=None):
        """``(advantages [N], generation metrics)`` from the gathered ``[N, F]`` rewards; ``arrays`` holds the
        generation batch (with ``old_per_token_logps`` when kept)."""

    @abc.abstractmethod
    def loss_terms(self, params, batch, ref_params=None, *, training=True) -> LossTerms:
        """One micro-batch's loss terms and metrics (TRL's names)."""

    # ------------------------------------------------------------------ logging
    def _after_step(self, done: int) -> None:
        super()._after_step(done)
        args = self.args
        total = self.num_training_steps()
        if self._should(args.logging_strategy, args.logging_steps, done, self.steps_per_epoch(), total) or (
                args.logging_first_step and done == 1) or done == total:
            self._write_completions(done)

    def _completions_path(self):
        return as_path(self.args.output_dir) / "completions.jsonl"

    def _resume(self, resume_from_checkpoint, ckpt) -> int:
        """Also rewrite ``completions.jsonl`` to the steps up to the one resumed from (a fresh run: empty), so a
        killed-and-resumed run lists each step's completions once."""
        start = super()._resume(resume_from_checkpoint, ckpt)
        if is_main_process():
            truncate_jsonl(self._completions_path(), start)
        return start

    def _write_completions(self, step: int) -> None:
        """Append the completions table (process 0 only: the only one that keeps it) to ``completions.jsonl``
        (a local path or a URL) and print it with ``log_completions``."""
        if not self._table or not is_main_process():
            self._table.clear()
            return
        path = self._completions_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        f = AppendFile(path)
        try:
            for row in self._table:
                f.write(json.dumps({"step": step, **row}, default=str) + "\n")
        finally:
            f.close()
        if self.args.log_completions:
            k = self.args.num_completions_to_print or len(self._table)
            for row in list(self._table)[:k]:
                print(json.dumps({"step": step, **row}, default=str), flush=True)
        self._table.clear()

    # ------------------------------------------------------------------ eval
    def evaluate(self, eval_dataset=None, metric_key_prefix: str = "eval") -> dict:
        """Generate for the eval prompts (``num_generations_eval`` or ``num_generations`` each) with the current
        params and report the loss and TRL's generation metrics, averaged over eval batches, prefixed ``eval_``."""
        ds = self._checked(eval_dataset, "eval") if eval_dataset is not None else self.eval_dataset
        if ds is None:
            raise ValueError("evaluate() needs an eval_dataset (in the constructor or as an argument).")
        if self.state is None:
            self._build(self.num_training_steps() if self.train_dataset is not None else 1)
        g = int(self.args.num_generations_eval or self.num_generations)
        rows_per_batch = self.args.per_device_eval_batch_size * batch_parallel_size(self.mesh)
        if rows_per_batch % g:
            raise ValueError(f"The eval batch ({rows_per_batch} rows) must be divisible by the number of eval "
                             f"generations ({g}).")
        u = rows_per_batch // g
        nb = len(ds) // u
        if nb == 0:
            raise ValueError(f"The eval dataset has {len(ds)} prompts, fewer than one eval batch needs ({u}).")
        if self._eval_loss_jit is None:
            self._eval_loss_jit = jax.jit(
                lambda p, b, r: self.loss_terms(p, b, r, training=False))
        values: dict[str, list] = {}
        for b in range(nb):
            rows = [ds[i] for i in range(b * u, (b + 1) * u) for _ in range(g)]
            rng = jax.random.fold_in(jax.random.PRNGKey(self.args.seed + 2), b)
            arrays, metrics, _ = self.generate_and_score(rows, self.state.params, rng, num_generations=g)
            terms = jax.device_get(self._eval_loss_jit(self.state.params, self._device_batch(arrays),
                                                       self.state.ref_params))
            metrics["loss"] = float(terms.numerator / (terms.denominator or 1.0))
            metrics.update({k: float(v) for k, v in terms.metrics.items()})
            for k, v in metrics.items():
                values.setdefault(k, []).append(v)
        return {f"{metric_key_prefix}_{k}": float(np.nanmean(v)) if not np.all(np.isnan(v)) else float("nan")
                for k, v in values.items()}

    _eval_loss_jit = None
