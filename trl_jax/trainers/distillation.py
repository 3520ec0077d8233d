"""``DistillationTrainer``: TRL 1.16's on-policy knowledge distillation on the shared loop.

Each optimizer step, as TRL's ``_prepare_inputs``:

* reads one *generation batch* of prompts (``per_device_train_batch_size x data-parallel devices x
  gradient_accumulation_steps`` rows; shuffled per epoch when ``shuffle_dataset``), left-pads the tokenized prompts
  to one bucket (the longest prompt of the datasets, rounded up to a multiple of 8) and samples one completion per
  prompt with the *student's* current params (the jitted KV-cache sampler, :func:`trl_jax.generation.generate`:
  ``max_completion_length`` new tokens at ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty``);
  the completion ends at its first EOS (kept) and is right-padded;
* runs the student and the frozen teacher over prompt + completion and minimises the generalized JSD of their
  next-token distributions over the completion tokens (:func:`trl_jax.losses.distillation.distillation_loss`:
  ``beta`` 0 forward KL, 1 reverse KL, else JSD; ``temperature``), normalised by the number of completion tokens
  of the generation batch (TRL's ``num_items_in_batch``), so the ``gradient_accumulation_steps`` micro-batches of a
  step back-propagate exactly TRL's sum.

The teacher (``teacher_model=`` a local directory / hub id / ``builtin:`` name or a ``(CausalLM, params)`` pair;
else ``args.teacher_model_name_or_path``) may be a different architecture with the same vocabulary. It is held in
the compute dtype (or ``teacher_model_init_kwargs["dtype"]``), sharded over the mesh by its own logical axes, in
the train state's ``ref_params`` slot, so the jitted step reads it without a copy and never differentiates it.

Metrics (TRL's names): ``loss``, ``entropy`` (the student's mean per-token entropy at ``temperature``), ``grad_norm``,
``learning_rate``, ``num_tokens`` and the generation metrics ``completions/mean_length``, ``min_length``,
``max_length``, ``clipped_ratio``, ``mean_terminated_length``, ``min_terminated_length``, ``max_terminated_length``.
With ``log_completions`` the last generation batch's prompts and completions are appended to
``<output_dir>/completions.jsonl`` at every logging step (``num_completions_to_print`` of them printed).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from trl_jax.configs import DistillationConfig
from trl_jax.data.decode import decode_and_strip_padding
from trl_jax.losses.base import LossTerms
from trl_jax.losses.distillation import distillation_loss
from trl_jax.models.model import final_logit_softcapping
from trl_jax.ops.padding import pad
from trl_jax.parallel import batch_parallel_size
from trl_jax.parallel.distributed import gather_to_host, is_main_process
from trl_jax.train.checkpoint import as_path
from trl_jax.train.precision import cast_floating
from trl_jax.trainers.base import (_DTYPES, BaseTrainer, LocalBatch, _dtype, kernel_choices, prompt_columns,
                                   reject_unsupported, take_rows)
from trl_jax.trainers.logging import AppendFile, truncate_jsonl
from trl_jax.trainers.online import _StepWithHostMetrics, completion_metrics, tokenize_prompts  # shared layer

_PROMPT_BUCKET = 8


class DistillationTrainer(BaseTrainer):
    """``DistillationTrainer(model, teacher_model, args=DistillationConfig(...), train_dataset=...)``.

    ``train_dataset`` needs a ``prompt`` column (a string, or a list of chat messages); other columns are ignored.
    """

    _tag = "distillation"
    config_class = DistillationConfig
    _pad_last_batch = False

    def __init__(self, model, teacher_model=None, args: DistillationConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, callbacks=None, optimizers=None, quantization_config=None,
                 peft_config=None, tools=None):
        reject_unsupported("DistillationTrainer", optimizers=optimizers, quantization_config=quantization_config,
                           tools=tools)
        if args is None:  # TRL's default output_dir: "<model name>-Distillation"
            name = os.path.basename(str(model).rstrip("/")) if isinstance(model, (str, os.PathLike)) else "model"
            args = DistillationConfig(output_dir=f"{name}-Distillation")
        self._check_args(args)
        self._teacher_arg = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        if self._teacher_arg is None:
            raise ValueError("A teacher model is required for distillation: pass `teacher_model` (a model directory, "
                             "hub id, builtin:NAME or a (CausalLM, params) pair) or set "
                             "`teacher_model_name_or_path` in the config.")
        self._prompt_len: dict[str, int] = {}
        super().__init__(model, args, train_dataset, eval_dataset, processing_class, callbacks,
                         peft_config=peft_config)
        tok = self.processing_class
        self.pad_token_id = int(tok.pad_token_id)
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        gen_kw = self.args.generation_kwargs if isinstance(self.args.generation_kwargs, dict) else {}
        extra = gen_kw.get("eos_token_id")
        if extra is not None:
            eos += [extra] if isinstance(extra, int) else list(extra)
        self.eos_token_ids = list(dict.fromkeys(int(e) for e in eos))
        if not self.eos_token_ids:
            raise ValueError("The tokenizer has no eos_token_id; set `eos_token` on the tokenizer.")
        self._step_host_metrics: dict[str, float] = {}
        self._pending_tokens = 0.0
        self._table: list[dict] = []
        self._loss_jit = None

    @staticmethod
    def _check_args(args):
        if args.use_vllm:
            raise ValueError("use_vllm=True: trl_jax samples with its own jitted JAX sampler; set use_vllm=False.")
        if args.max_tool_calling_iterations is not None:
            raise ValueError("Tool calling is not supported by trl_jax yet; unset max_tool_calling_iterations.")
        if args.max_completion_length is None or args.max_completion_length < 1:
            raise ValueError("max_completion_length must be a positive int (completions are padded to it).")

    # ------------------------------------------------------------------ the teacher
    def _resolve_ref_model(self, ref_model):
        """Load the teacher (frozen, compute dtype, sharded by its own logical axes); it goes into the train
        state's ``ref_params`` slot in :meth:`_build`."""
        from trl_jax.assets import resolve_model_path
        from trl_jax.models import from_pretrained

        args, teacher = self.args, self._teacher_arg
        kwargs = args.teacher_model_init_kwargs if isinstance(args.teacher_model_init_kwargs, dict) else {}
        dtype = _dtype(kwargs.get("dtype") if kwargs.get("dtype") in _DTYPES else args.compute_dtype)
        if isinstance(teacher, tuple) and len(teacher) == 2:
            if args.teacher_model_init_kwargs is not None:
                raise ValueError("You passed teacher_model_init_kwargs to the config, but your teacher_model is "
                                 "already instantiated.")
            self.teacher_model, params = teacher
            params = cast_floating(params, dtype)
        elif isinstance(teacher, (str, os.PathLike)):
            path = resolve_model_path(os.fspath(teacher))
            self.teacher_model, params = from_pretrained(
                path, dtype=_dtype(args.compute_dtype), param_dtype=dtype, mesh=self.mesh,
                scan_layers=args.scan_layers, **kernel_choices(args))
        else:
            raise TypeError("teacher_model must be a local directory / hub id / builtin:NAME of an HF checkpoint, or "
                            f"a (trl_jax.models.CausalLM, params) pair; got {type(teacher).__name__}.")
        student_vocab, teacher_vocab = self.model.config.vocab_size, self.teacher_model.config.vocab_size
        if student_vocab != teacher_vocab:
            raise ValueError(
                f"The student model has vocab_size {student_vocab} but the teacher model has vocab_size "
                f"{teacher_vocab}. Distillation compares the teacher's full next-token distribution, which requires "
                "a shared vocabulary. Use a teacher with the same vocab_size."
            )
        self.teacher_params = params
        return None

    def _build(self, total_steps: int):
        super()._build(total_steps)
        # the teacher rides in the state (donated with it each step, never updated), keeping its own sharding
        self.state = self.state.replace(ref_params=self.teacher_params)
        self.teacher_params = None
        self._train_step = _StepWithHostMetrics(self._train_step, self)

    def _teacher(self):
        return self.state.ref_params if self.state is not None else self.teacher_params

    # ------------------------------------------------------------------ data
    def _prepare_dataset(self, dataset, split):
        prompt_columns(dataset, split, "DistillationTrainer")
        dataset = tokenize_prompts(dataset, self.processing_class, self.args.chat_template_kwargs)
        self._prompt_len[split] = max(len(x) for x in dataset["prompt_ids"])
        return dataset

    @property
    def prompt_length(self) -> int:
        """The prompt bucket: the longest tokenized prompt of the datasets, rounded up to a multiple of 8."""
        n = max(self._prompt_len.values())
        return max(-(-n // _PROMPT_BUCKET) * _PROMPT_BUCKET, _PROMPT_BUCKET)

    def _collate(self, rows, num_rows):
        raise TypeError("DistillationTrainer builds its batches from sampled completions; it has no row collator.")

    def _epoch_order(self, epoch: int) -> np.ndarray:
        n = len(self.train_dataset)
        if not self.args.shuffle_dataset:
            return np.arange(n)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return np.random.default_rng([seed, epoch]).permutation(n)

    # ------------------------------------------------------------------ generation
    def _sampling_kwargs(self, do_sample: bool = True):
        a = self.args
        return dict(
            max_new_tokens=int(a.max_completion_length), do_sample=do_sample, temperature=a.temperature,
            top_k=a.top_k or None, top_p=None if a.top_p == 1.0 else a.top_p, min_p=a.min_p,
            repetition_penalty=None if a.repetition_penalty == 1.0 else a.repetition_penalty,
            eos_token_id=self.eos_token_ids, pad_token_id=self.pad_token_id,
        )

    def _prompt_arrays(self, rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        ids = pad([np.asarray(r["prompt_ids"], np.int32) for r in rows], self.pad_token_id, "left")
        mask = pad([np.ones(len(r["prompt_ids"]), np.int32) for r in rows], 0, "left")
        width = self.prompt_length
        if ids.shape[1] < width:
            ids = np.pad(ids, ((0, 0), (width - ids.shape[1], 0)), constant_values=self.pad_token_id)
            mask = np.pad(mask, ((0, 0), (width - mask.shape[1], 0)))
        return ids, mask

    def _sample(self, model, params, prompt_ids, prompt_mask, rng, *, do_sample=True):
        """Completions ``[B, N]`` and their masks (1 through the first EOS) as numpy, sampled from ``model``."""
        from trl_jax.generation import generate

        batch = self._device_batch({"ids": prompt_ids, "mask": prompt_mask})
        out = generate(model, params, batch["ids"], batch["mask"], rng, mesh=self.mesh, check_inputs=False,
                       decode_layout=self.args.decode_layout, decode_block_size=int(self.args.decode_block_size),
                       **self._sampling_kwargs(do_sample))
        ids, mask = gather_to_host((out.completion_ids, out.completion_mask))
        return np.asarray(ids), np.asarray(mask)

    def generate_completions(self, rows: list[dict], params, rng) -> tuple[dict, dict]:
        """Sample one completion per row with the student ``params``; returns the arrays the loss reads
        (``input_ids``, ``segment_ids``, ``completion_ids``, ``completion_mask``) and the generation metrics."""
        prompt_ids, prompt_mask = self._prompt_arrays(rows)
        cids, cmask = self._sample(self.model, params, prompt_ids, prompt_mask, rng)
        arrays = self.completion_arrays(prompt_ids, prompt_mask, cids, cmask)
        lengths = cmask.sum(axis=1)
        last = cids[np.arange(len(cids)), np.maximum(lengths - 1, 0)]
        truncated = ~np.isin(last, self.eos_token_ids + [self.pad_token_id])
        metrics = completion_metrics(lengths, truncated)
        sl = self._local_rows(len(rows))  # this process's rows: the loop sums the counters over processes
        self._pending_tokens += float(prompt_mask[sl].sum() + lengths[sl].sum())
        if self.args.log_completions and is_main_process():
            texts = decode_and_strip_padding(cids, self.processing_class, mask=cmask, think_start=None,
                                             think_end=None)
            self._table = [{"prompt": r["prompt"], "completion": t} for r, t in zip(rows, texts, strict=True)]
        return arrays, metrics

    @staticmethod
    def completion_arrays(prompt_ids, prompt_mask, completion_ids, completion_mask) -> dict[str, np.ndarray]:
        """The loss's inputs from left-padded prompts and right-padded completions (numpy)."""
        return {
            "input_ids": np.concatenate([prompt_ids, completion_ids], axis=1).astype(np.int32),
            "segment_ids": np.concatenate([prompt_mask, completion_mask], axis=1).astype(np.int32),
            "completion_ids": np.asarray(completion_ids, np.int32),
            "completion_mask": np.asarray(completion_mask, np.int32),
        }

    def _batch_for_step(self, step: int):
        rows = take_rows(self.train_dataset, self._rows_for_step(step))
        rng = jax.random.fold_in(jax.random.PRNGKey(self.args.seed + 1), step)
        arrays, metrics = self.generate_completions(rows, self.state.params, rng)
        # TRL shuffles the generation batch before cutting it into micro-batches
        perm = np.random.default_rng([self.args.seed, step, 7]).permutation(len(rows))
        arrays = {k: v[perm] for k, v in arrays.items()}
        self._step_host_metrics = metrics
        n = arrays["input_ids"].shape[0]
        sl = self._local_rows(n)
        return LocalBatch({k: v[sl] for k, v in arrays.items()}, n)

    def _batch_stats(self, batch):
        tokens, self._pending_tokens = self._pending_tokens, 0.0
        return {"num_tokens": tokens}

    # ------------------------------------------------------------------ loss
    def loss_fn(self, params, batch, rng, ref_params=None) -> LossTerms:
        """The divergence summed over this micro-batch's completion tokens over their number: accumulated over a
        step's micro-batches, TRL's ``sum / num_items_in_batch`` of the generation batch."""
        teacher = ref_params if ref_params is not None else self._teacher()
        if teacher is None:
            raise ValueError("The teacher's params are missing from the train state.")
        ids, seg = batch["input_ids"], batch["segment_ids"]
        c = batch["completion_ids"].shape[1]
        pos = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
        start = ids.shape[1] - c - 1
        h_s = self.model.hidden_states(params, ids, pos, seg)[:, start:-1]
        h_t = self.teacher_model.hidden_states(jax.lax.stop_gradient(teacher), ids, pos, seg)[:, start:-1]
        # as TRL: the backbones' hidden states through each LM head (Gemma's final-logit soft-cap included); the
        # mixture-of-experts load-balancing loss is not added (TRL's distillation loss bypasses the model's forward)
        return distillation_loss(
            h_s, self.model.lm_head_weight(params), h_t, self.teacher_model.lm_head_weight(teacher),
            batch["completion_mask"], beta=self.args.beta, temperature=self.args.temperature,
            student_final_logit_softcapping=final_logit_softcapping(self.model),
            teacher_final_logit_softcapping=final_logit_softcapping(self.teacher_model),
            chunk_size=self.args.logprob_chunk_size,
        )

    # ------------------------------------------------------------------ logging
    def _after_step(self, done: int) -> None:
        super()._after_step(done)
        args = self.args
        if not args.log_completions or not self._table:
            return
        total = self.num_training_steps()
        if self._should(args.logging_strategy, args.logging_steps, done, self.steps_per_epoch(), total) or (
                args.logging_first_step and done == 1) or done == total:
            path = as_path(args.output_dir) / "completions.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            f = AppendFile(path)
            try:
                for row in self._table:
                    f.write(json.dumps({"step": done, **row}, default=str) + "\n")
            finally:
                f.close()
            k = args.num_completions_to_print or len(self._table)
            for row in self._table[:k]:
                print(json.dumps({"step": done, **row}, default=str), flush=True)

    def _resume(self, resume_from_checkpoint, ckpt) -> int:
        """Also cut ``completions.jsonl`` back to the step resumed from (a fresh run: empty)."""
        start = super()._resume(resume_from_checkpoint, ckpt)
        if is_main_process():
            truncate_jsonl(as_path(self.args.output_dir) / "completions.jsonl", start)
        return start

    # ------------------------------------------------------------------ eval
    def _eval_rows(self, ds, b: int, rows_per_batch: int) -> list[dict]:
        return take_rows(ds, range(b * rows_per_batch, min((b + 1) * rows_per_batch, len(ds))))

    def evaluate(self, eval_dataset=None, metric_key_prefix: str = "eval") -> dict:
        """Sample completions for the eval prompts with the current student and report the loss (pooled over the
        set), ``entropy`` and the generation metrics, prefixed ``eval_``. A short last batch is dropped."""
        ds = self._checked(eval_dataset, "eval") if eval_dataset is not None else self.eval_dataset
        if ds is None:
            raise ValueError("evaluate() needs an eval_dataset (in the constructor or as an argument).")
        if self.state is None:
            self._build(self.num_training_steps() if self.train_dataset is not None else 1)
        rows_per_batch = self.args.per_device_eval_batch_size * batch_parallel_size(self.mesh)
        nb = len(ds) // rows_per_batch
        if nb == 0:
            raise ValueError(f"The eval dataset has {len(ds)} prompts, fewer than one eval batch ({rows_per_batch}).")
        if self._loss_jit is None:
            self._loss_jit = jax.jit(lambda p, b, t: self.loss_fn(p, b, None, ref_params=t))
        num = den = 0.0
        values: dict[str, list] = {}
        pending = self._pending_tokens
        for b in range(nb):
            rng = jax.random.fold_in(jax.random.PRNGKey(self.args.seed + 2), b)
            arrays, metrics = self.generate_completions(self._eval_rows(ds, b, rows_per_batch), self.state.params,
                                                        rng)
            terms = jax.device_get(self._loss_jit(self.state.params, self._device_batch(arrays),
                                                  self.state.ref_params))
            num += float(terms.numerator)
            den += float(terms.denominator)
            metrics["entropy"] = float(terms.metrics["entropy"])
            for k, v in metrics.items():
                values.setdefault(k, []).append(v)
        self._pending_tokens = pending  # eval tokens are not training tokens
        out = {f"{metric_key_prefix}_loss": num / den if den else 0.0}
        out.update({f"{metric_key_prefix}_{k}": float(np.mean(v)) for k, v in values.items()})
        return out

    def teacher_agreement(self, dataset=None, max_prompts: int | None = None) -> dict[str, float]:
        """How far the student acts like its teacher on ``dataset`` (default: the eval set, else the train set),
        both decoding greedily: ``agreement`` = fraction of prompts whose completion is the teacher's token for
        token; ``token_agreement`` = fraction of the teacher's completion tokens that are also the student's
        argmax given the same prefix. Whole eval batches only."""
        ds = self._checked(dataset, "eval") if dataset is not None else (
            self.eval_dataset if self.eval_dataset is not None else self.train_dataset)
        if self.state is None:
            self._build(self.num_training_steps() if self.train_dataset is not None else 1)
        if self._argmax_jit is None:
            def argmax(p, b):
                ids, seg = b["input_ids"], b["segment_ids"]
                c = b["completion_ids"].shape[1]
                pos = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
                h = self.model.hidden_states(p, ids, pos, seg)[:, ids.shape[1] - c - 1:-1]
                return jnp.argmax(self.model.logits_from_hidden(p, h), axis=-1)

            self._argmax_jit = jax.jit(argmax)
        n = len(ds) if max_prompts is None else min(len(ds), max_prompts)
        rows_per_batch = self.args.per_device_eval_batch_size * batch_parallel_size(self.mesh)
        same = total = tok_same = tok_total = 0
        for start in range(0, n - rows_per_batch + 1, rows_per_batch):
            rows = take_rows(ds, range(start, start + rows_per_batch))
            prompt_ids, prompt_mask = self._prompt_arrays(rows)
            key = jax.random.PRNGKey(0)
            s_ids, s_mask = self._sample(self.model, self.state.params, prompt_ids, prompt_mask, key, do_sample=False)
            t_ids, t_mask = self._sample(self.teacher_model, self.state.ref_params, prompt_ids, prompt_mask, key,
                                         do_sample=False)
            same += int(np.all((s_ids * s_mask == t_ids * t_mask) & (s_mask == t_mask), axis=1).sum())
            total += len(rows)
            arrays = self.completion_arrays(prompt_ids, prompt_mask, t_ids, t_mask)
            pred = np.asarray(gather_to_host(self._argmax_jit(self.state.params, self._device_batch(arrays))))
            tok_same += int(((pred == t_ids) & (t_mask == 1)).sum())
            tok_total += int(t_mask.sum())
        if not total:
            raise ValueError(f"teacher_agreement needs at least one batch of {rows_per_batch} prompts; got {n}.")
        return {"agreement": same / total, "token_agreement": tok_same / max(tok_total, 1)}

    _argmax_jit = None
