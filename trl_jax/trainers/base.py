"""The training loop shared by the trainer facades (SFT, DPO, KTO).

A trainer subclass supplies three things: how to prepare a dataset (``_prepare_dataset``), how to collate rows into
a fixed-shape numpy batch (``_collate``), and a pure ``loss_fn(params, batch, rng, ref_params=None) -> LossTerms``.
Everything else lives here: model and tokenizer loading, the mesh, optimizer and schedule from the config, the
jitted sharded step (with gradient accumulation inside the step), the epoch/step loop, evaluation, metrics with
TRL's names averaged over the logging window, logging (stdout, JSONL, TensorBoard), checkpoints and exact resume.

Data order is a pure function of ``(seed, epoch)``: step ``k`` always reads the same rows, so resuming from a
checkpoint at step ``k`` continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import abc
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from trl_jax.losses.base import LossTerms
from trl_jax.models.model import router_aux_loss_coef
from trl_jax.parallel import batch_parallel_size, make_mesh
from trl_jax.parallel.distributed import (gather_to_host, is_main_process, is_multiprocess, make_global_batch,
                                          pad_to_common_shape, process_rows, sum_over_processes, sync_processes)
from trl_jax.parallel.sharding import shard_batch
from trl_jax.train import Checkpointer, TrainState, make_eval_step, make_train_step, optimizer_from_args
from trl_jax.train.checkpoint import (CheckpointSaveError, NoCheckpointError, OutputDirLock, as_path, check_output_dir,
                                      is_url)
from trl_jax.trainers.callbacks import CallbackHandler, TrainerControl, TrainerState
from trl_jax.trainers.logging import MetricsLogger
from trl_jax.trainers.peft import PeftMixin

def take_rows(dataset, indices) -> list[dict]:
    """``dataset[indices]`` as a list of row dicts, read in one batched (Arrow) access instead of one per row."""
    indices = list(indices)
    if not indices:
        return []
    cols = dataset[indices]
    return [dict(zip(cols, vals)) for vals in zip(*cols.values())]


class LocalBatch(dict):
    """A host batch holding only this process's rows of the global batch (``num_rows`` rows in all)."""

    def __init__(self, data, num_rows: int):
        super().__init__(data)
        self.num_rows = num_rows


def prompt_columns(dataset, split: str, trainer: str) -> list[str]:
    """The dataset's columns; an online trainer (GRPO, online DPO) needs a ``prompt`` column among them."""
    cols = dataset.column_names if hasattr(dataset, "column_names") else list(dataset[0].keys())
    if "prompt" not in cols:
        raise ValueError(f"{trainer} needs a `prompt` column (a string, or a list of chat messages); the {split} "
                         f"dataset has columns {cols}.")
    return cols


def _make_mesh(args):
    """The run's mesh. A fully specified ``mesh_shape`` smaller than the visible device count uses the first
    devices (e.g. ``(1, 1, 1)`` for a single-device run on a multi-device host)."""
    shape = args.mesh_shape
    if shape is not None and -1 not in shape and math.prod(shape) < jax.device_count():
        return make_mesh(shape, args.mesh_axis_names, devices=jax.devices()[:math.prod(shape)])
    return make_mesh(shape, args.mesh_axis_names)


def _nanmean(vals: np.ndarray) -> float:
    """Mean over the entries that were logged (NaN = a metric with no example in that batch, e.g. KTO's
    ``rewards/rejected`` on an all-desirable batch); NaN when none was."""
    vals = vals[~np.isnan(vals)]
    return float(vals.mean()) if vals.size else float("nan")


def reject_unsupported(trainer: str, **kwargs) -> None:
    """TRL constructor arguments trl_jax does not implement must not be silently ignored."""
    given = sorted(k for k, v in kwargs.items() if v is not None)
    if given:
        raise TypeError(f"{trainer}: {', '.join(given)} not supported by trl_jax (yet); remove them. See the README's "
                        "'Differences from TRL' section.")


# jax.checkpoint_policies names -> the models' remat option names.
_REMAT_ALIASES = {"nothing_saveable": "full", "everything_saveable": "none", None: "none"}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_COUNTERS_FILE = re.compile(r"^trainer_state-(\d+)\.json$")


@dataclass
class TrainOutput:
    """What ``train()`` returns (transformers' ``TrainOutput`` fields)."""

    global_step: int
    training_loss: float
    metrics: dict


def _dtype(name):
    return _DTYPES[name] if isinstance(name, str) else name


def kernel_choices(args) -> dict:
    """The config's attention kernel and expert dispatch (``attn_implementation``, ``moe_implementation``) as
    ``from_pretrained`` keyword arguments: every model a trainer loads (policy, teacher, reward models) uses them."""
    return dict(attention_impl=getattr(args, "attn_implementation", None) or "auto",
                moe_impl=getattr(args, "moe_implementation", None) or "auto")


class BaseTrainer(PeftMixin, abc.ABC):
    """Shared loop; see the module docstring. Subclasses set ``_tag`` and ``config_class`` and implement the hooks."""

    _tag = "base"
    config_class: type = None  # set by subclasses
    # True: a short last batch is padded with masked rows (the losses take an example/token mask). A trainer whose
    # batches cannot be padded (GRPO's prompt groups) sets False and drops the incomplete tail of an epoch.
    _pad_last_batch = True

    def __init__(self, model, args=None, train_dataset=None, eval_dataset=None, processing_class=None,
                 callbacks=None, ref_model=None, data_collator=None, peft_config=None):
        if args is None:
            name = model if isinstance(model, str) else "model"
            args = self.config_class(output_dir=f"{os.path.basename(str(name).rstrip('/'))}-{self._tag.upper()}")
        self.args = args
        self.callback_handler = CallbackHandler(callbacks)
        self.trainer_state = TrainerState(logging_steps=args.logging_steps, eval_steps=args.eval_steps,
                                          save_steps=args.save_steps, is_world_process_zero=is_main_process())
        self.mesh = _make_mesh(args)
        self.model, self.params, model_path = self._load_model(model)
        self.model, self.params, model_path = self._setup_peft(self.model, self.params, model_path, peft_config)
        # mixture-of-experts models: the weight of the load-balancing loss added to the training loss (TRL's rule)
        self.router_aux_loss_coef = router_aux_loss_coef(self.model, getattr(args, "router_aux_loss_coef", None))
        self.processing_class = self._load_tokenizer(processing_class, model_path)
        self.ref_model_params = self._resolve_ref_model(ref_model)
        self.train_dataset = self._checked(train_dataset, "train")
        self.eval_dataset = self._checked(eval_dataset, "eval") if eval_dataset is not None else None
        self.state: TrainState | None = None
        self._train_step = None
        self._eval_step = None
        self.log_history: list[dict] = self.trainer_state.log_history
        self.data_collator = data_collator

    # ------------------------------------------------------------------ loading
    def _load_model(self, model):
        """``model``: a local HF directory or hub id, or a ``(CausalLM, params)`` pair."""
        from trl_jax.assets import resolve_model_path
        from trl_jax.models import from_pretrained

        args = self.args
        if isinstance(model, (str, os.PathLike)):
            model = resolve_model_path(os.fspath(model))
            from trl_jax.models.peft_io import is_adapter_dir, read_adapter_config

            if is_adapter_dir(model):  # a PEFT adapter: load its base, the adapters go on in _setup_peft
                self._adapter_dir = os.fspath(model)
                base = read_adapter_config(model).get("base_model_name_or_path")
                if not base:
                    raise ValueError(f"{model} is a PEFT adapter directory without base_model_name_or_path in "
                                     "adapter_config.json; set it to the base model's directory or hub id.")
                model = resolve_model_path(base)
            self._base_model_path = os.fspath(model)
            init_kwargs = getattr(args, "model_init_kwargs", None)
            if isinstance(init_kwargs, dict) and init_kwargs.get("dtype") in _DTYPES:
                args.param_dtype = init_kwargs["dtype"]  # TRL: the dtype the weights are loaded in
            self._owns_params = True
            m, params = from_pretrained(
                os.fspath(model),
                dtype=_dtype(args.compute_dtype),
                param_dtype=_dtype(args.param_dtype),
                mesh=self.mesh,
                scan_layers=args.scan_layers,
                remat_policy=_REMAT_ALIASES.get(args.remat_policy, args.remat_policy),
                value_head=self._needs_value_head(),
                **kernel_choices(args),
            )
            return m, params, os.fspath(model)
        if isinstance(model, tuple) and len(model) == 2:
            m, params = model
            return m, params, getattr(m, "name_or_path", None)
        raise TypeError(
            "model must be a local directory / hub id of an HF checkpoint, or a (trl_jax.models.CausalLM, params) "
            f"pair; got {type(model).__name__}."
        )

    def _needs_value_head(self) -> bool:
        return False

    def _load_tokenizer(self, processing_class, model_path):
        from trl_jax.data.tokenization import setup_tokenizer

        if processing_class is None:
            if model_path is None:
                raise ValueError("processing_class is required when the model is passed as (model, params).")
            from transformers import AutoTokenizer

            processing_class = AutoTokenizer.from_pretrained(model_path)
        return setup_tokenizer(processing_class, self.args)

    def _resolve_ref_model(self, ref_model):
        return None

    def _checked(self, dataset, split):
        if dataset is None:
            return None
        from trl_jax.data.loading import load_dataset_any

        if isinstance(dataset, (str, os.PathLike)):
            dataset = load_dataset_any(os.fspath(dataset), split="train" if split == "train" else split)
        dataset = self._materialize(dataset, split)
        if hasattr(dataset, "__len__") and len(dataset) == 0:
            raise ValueError(f"The {split} dataset is empty; pass a dataset with at least one row.")
        prepared = self._prepare_dataset(dataset, split)
        if hasattr(prepared, "__len__") and len(prepared) == 0:
            raise ValueError(
                f"The {split} dataset has no rows left after preparation (every row was filtered out, e.g. prompts "
                "longer than max_length); raise max_length or shorten the prompts."
            )
        return prepared

    def _materialize(self, dataset, split):
        """An ``IterableDataset`` (streaming) is read up to what the run needs: ``max_steps`` optimizer steps of
        training rows (as transformers requires ``max_steps`` for iterable datasets), or the whole eval stream."""
        from datasets import Dataset, IterableDataset

        if not isinstance(dataset, IterableDataset):
            return dataset
        if split == "train":
            if not (self.args.max_steps and self.args.max_steps > 0):
                raise ValueError("A streaming (IterableDataset) train_dataset needs max_steps > 0 in the config, as "
                                 "transformers requires; set max_steps.")
            rows_needed = self.args.max_steps * self.args.per_device_train_batch_size * \
                batch_parallel_size(self.mesh) * self.args.gradient_accumulation_steps
            dataset = dataset.take(rows_needed)
        return Dataset.from_list(list(dataset))

    # ------------------------------------------------------------------ hooks
    @abc.abstractmethod
    def _prepare_dataset(self, dataset, split: str):
        """Validate the format and tokenize (and pack/filter) a dataset; returns a map-style dataset of rows."""

    @abc.abstractmethod
    def _collate(self, rows: list[dict], num_rows: int) -> dict[str, np.ndarray]:
        """Rows -> a fixed-shape numpy batch with ``num_rows`` rows (padding rows masked out)."""

    @abc.abstractmethod
    def loss_fn(self, params, batch, rng, ref_params=None) -> LossTerms:
        """Pure, jit-able loss of one micro-batch."""

    def _batch_stats(self, batch: dict[str, np.ndarray]) -> dict[str, float]:
        """Host-side per-step counters (e.g. ``num_tokens``), summed over training."""
        return {}

    def _ref_params_for_state(self):
        return self.ref_model_params

    # ------------------------------------------------------------------ batching
    @property
    def micro_batch_rows(self) -> int:
        return self.args.per_device_train_batch_size * batch_parallel_size(self.mesh)

    @property
    def step_rows(self) -> int:
        return self.micro_batch_rows * self.args.gradient_accumulation_steps

    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (see ``_pad_last_batch``)."""
        n = len(self.train_dataset)
        micro = math.ceil(n / self.micro_batch_rows) if self._pad_last_batch else n // self.micro_batch_rows
        if micro == 0:
            raise ValueError(f"The train dataset has {n} rows, fewer than one batch of {self.micro_batch_rows} "
                             "(per_device_train_batch_size x data-parallel devices); lower per_device_train_batch_size.")
        return max(micro // self.args.gradient_accumulation_steps, 1)

    def num_training_steps(self) -> int:
        if self.args.max_steps and self.args.max_steps > 0:
            return int(self.args.max_steps)
        return max(int(math.ceil(self.args.num_train_epochs * self.steps_per_epoch())), 1)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """Row order of an epoch: ``train_sampling_strategy="sequential"`` keeps the dataset order (TRL's KTO
        default; also what makes runs comparable row for row with TRL), otherwise a permutation seeded by
        ``(data_seed or seed, epoch)``."""
        n = len(self.train_dataset)
        if getattr(self.args, "train_sampling_strategy", "random") == "sequential":
            return np.arange(n)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return np.random.default_rng([seed, epoch]).permutation(n)

    def _rows_for_step(self, step: int) -> list[int]:
        spe = self.steps_per_epoch()
        epoch, within = divmod(step, spe)
        order = self._epoch_order(epoch)
        start = within * self.step_rows
        return order[start:start + self.step_rows].tolist()

    def _device_batch(self, batch):
        """A whole global host batch on the mesh. With several processes each one contributes only its rows
        (every process must call it with the same batch)."""
        if self.mesh is None:
            return batch
        if isinstance(batch, LocalBatch):
            return self._global_batch(batch, batch.num_rows)
        if not is_multiprocess():
            return shard_batch(batch, self.mesh)
        n = np.shape(jax.tree.leaves(batch)[0])[0]
        rows = process_rows(self.mesh, n)
        return make_global_batch(jax.tree.map(lambda x: np.asarray(x)[rows], batch), self.mesh, n)

    def _local_rows(self, num_rows: int) -> slice:
        """This process's rows ``[start, stop)`` of a global batch of ``num_rows`` rows (all rows with one)."""
        return process_rows(self.mesh, num_rows)

    def _pad_value(self, key: str):
        """What the collators pad a column with along its sequence axis."""
        if key.endswith("input_ids"):
            return self.processing_class.pad_token_id
        return -100 if key.endswith("labels") else 0

    def _global_batch(self, local: dict, num_rows: int):
        """This process's collated rows -> global arrays of ``num_rows`` rows (``make_array_from_process_local_data``);
        the sequence axes are first padded to the longest any process collated. One process: ``shard_batch``."""
        if self.mesh is None:
            return dict(local)
        if not is_multiprocess():
            return shard_batch(dict(local), self.mesh)
        local = pad_to_common_shape(dict(local), self._pad_value)
        return make_global_batch(local, self.mesh, num_rows)

    def _collate_local(self, ds, indices, num_rows: int, collate=None) -> LocalBatch:
        """Collate this process's rows of the global batch ``indices`` (``num_rows`` rows with padding)."""
        indices = list(indices)
        sl = self._local_rows(num_rows)
        collate = collate or self._make_batch
        rows = take_rows(ds, indices[sl])
        if rows or not indices:
            return LocalBatch(collate(rows, sl.stop - sl.start), num_rows)
        # A short last batch leaves this process only padding rows: collate one real row of the batch padded to
        # two rows and repeat the padding row (masked out, as every padding row is).
        probe = collate(take_rows(ds, indices[:1]), 2)
        if any(np.shape(v)[0] != 2 for v in probe.values()):
            raise ValueError("data_collator must pad its output to the num_rows it is asked for when several "
                             "processes share a batch (a process can hold only padding rows of a short batch).")
        n = sl.stop - sl.start
        return LocalBatch({k: np.repeat(np.asarray(v)[1:2], n, axis=0) for k, v in probe.items()}, num_rows)

    def _make_batch(self, rows: list[dict], num_rows: int) -> dict[str, np.ndarray]:
        """A user ``data_collator`` (rows -> dict of fixed-shape numpy arrays with the keys the loss reads) if
        given, else the trainer's own collator."""
        if self.data_collator is not None:
            return {k: np.asarray(v) for k, v in self.data_collator(rows).items()}
        return self._collate(rows, num_rows)

    def _batch_for_step(self, step: int):
        """This process's rows of step ``step``'s global batch, collated (all rows with one process)."""
        return self._collate_local(self.train_dataset, self._rows_for_step(step), self.step_rows)

    # ------------------------------------------------------------------ state
    def _build(self, total_steps: int):
        args = self.args
        self.optimizer, self.lr_schedule = optimizer_from_args(args, num_training_steps=total_steps)
        rng = jax.random.PRNGKey(args.seed)
        ref = self._ref_params_for_state()
        # Weights the trainer loaded itself are handed over to the state (donated: no identity copy at start-up);
        # weights a caller passed in as (model, params) stay valid for the caller.
        owned = getattr(self, "_owns_params", False) and (ref is None or not getattr(self, "_ref_from_caller", False))
        self.state = TrainState.create(
            self.params, self.optimizer, rng, ref,
            mesh=self.mesh, logical_axes=self.model.logical_axes(), donate=owned, trainable=self._trainable_pred(),
        )
        self.params = None  # owned by the state from now on (donated every step)
        if owned and ref is not None:
            self.ref_model_params = None
        # Mixed precision: with a compute dtype narrower than the stored params, the step casts a compute-dtype
        # copy of the weights (reference included) for the forward and backward pass, LM head included.
        compute = _dtype(args.compute_dtype)
        compute = None if compute is None or jnp.dtype(compute) == jnp.dtype(_dtype(args.param_dtype)) else compute
        self._train_step = make_train_step(
            self.loss_fn, self.optimizer, mesh=self.mesh,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            max_grad_norm=args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None,
            learning_rate_fn=self.lr_schedule, compute_dtype=compute,
            trainable=self._trainable_pred(), training_context=self._training_context(),
        )
        self._eval_step = make_eval_step(self.loss_fn, mesh=self.mesh, compute_dtype=compute)

    def _checkpointer(self) -> Checkpointer:
        return Checkpointer(as_path(self.args.output_dir) / "checkpoints", max_to_keep=self.args.save_total_limit)

    def _resume(self, resume_from_checkpoint, ckpt: Checkpointer) -> int:
        if not resume_from_checkpoint:
            return 0
        step = None
        if isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.lower() in ("true", "latest"):
            resume_from_checkpoint = True
        if isinstance(resume_from_checkpoint, str):
            path = as_path(resume_from_checkpoint)
            if path.name.isdigit():
                step = int(path.name)
                path = path.parent
            if os.fspath(path) != ckpt.directory:
                ckpt = Checkpointer(path)
        if ckpt.latest_step() is None:
            raise NoCheckpointError(
                f"resume_from_checkpoint={resume_from_checkpoint!r}: no checkpoint found in {ckpt.directory}; "
                "train without resume_from_checkpoint or point it at an output_dir/checkpoints directory."
            )
        step, self.state = ckpt.restore(self.state, step)
        if is_main_process():
            print(f"[trl_jax] resumed from {ckpt.directory} at step {step}", file=sys.stderr)
        return int(step)

    # ------------------------------------------------------------------ loop
    def train(self, resume_from_checkpoint=None) -> TrainOutput:
        """Run the loop; returns ``TrainOutput(global_step, training_loss, metrics)``.

        One run per ``output_dir``: the run holds ``<output_dir>/trl_jax.lock`` until it returns or raises (see
        :class:`~trl_jax.train.checkpoint.OutputDirLock`). Before any step, an ``output_dir`` that already holds
        checkpoints must be resumed (``resume_from_checkpoint``) or overwritten (``overwrite_output_dir``)."""
        args = self.args
        if self.train_dataset is None:
            raise ValueError("train() needs a train_dataset.")
        resume_from_checkpoint = resume_from_checkpoint or args.resume_from_checkpoint
        if isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.strip().lower() in ("", "false", "no",
                                                                                                  "0", "none"):
            resume_from_checkpoint = None  # `--resume_from_checkpoint false` from a CLI or YAML
        lock = OutputDirLock(args.output_dir) if jax.process_index() == 0 else None
        if lock is not None:
            lock.acquire()
        try:
            check_output_dir(args.output_dir, resume_from_checkpoint=resume_from_checkpoint,
                             overwrite_output_dir=args.overwrite_output_dir, delete=lock is not None,
                             check_lock=False)
            sync_processes("trl_jax:output_dir_checked")  # process 0 may have deleted an old run's files
            return self._train(resume_from_checkpoint)
        finally:
            if lock is not None:
                lock.release()

    def _train(self, resume_from_checkpoint) -> TrainOutput:
        args = self.args
        total = self.num_training_steps()
        if self.state is None:
            self._build(total)
        if is_main_process():
            as_path(args.output_dir).mkdir(parents=True, exist_ok=True)
        ckpt = self._checkpointer()
        start = self._resume(resume_from_checkpoint, ckpt)
        counters = self._load_counters(start) if start else {}
        counters.setdefault("skipped_updates", 0)
        logger = MetricsLogger(args, total, start_step=start, log_history=self.log_history)
        spe = self.steps_per_epoch()
        ts = self.trainer_state
        ts.max_steps, ts.num_train_epochs, ts.global_step, ts.epoch = total, args.num_train_epochs, start, start / spe
        ts.train_batch_size = self.step_rows
        control = self.callback_handler("on_train_begin", args, ts, TrainerControl())
        window, pending = [], None
        t_window, tokens_window = time.perf_counter(), 0.0
        running_loss, running_n = 0.0, 0
        # Non-finite updates: every step's metrics are accounted once (``accounted`` = last step seen).
        nonfinite = {"accounted": start, "consecutive": 0}

        def flush(done):
            nonlocal window, t_window, tokens_window, running_loss, running_n
            host = jax.device_get(window)
            rec = self._average(host)
            running_loss += rec["loss"] * len(host)
            running_n += len(host)
            rec.update(counters)
            rec["epoch"] = round(done / spe, 4)
            if tokens_window:
                rec["train_tokens_per_second"] = round(tokens_window / max(time.perf_counter() - t_window, 1e-9), 1)
            logger.log(rec, done)
            self.callback_handler("on_log", args, ts, control, logs=rec)
            window, tokens_window, t_window = [], 0.0, time.perf_counter()

        def save(done):
            if done in ckpt.all_steps(reload=False):
                return
            ckpt.save(done, self.state, force=True)
            try:
                if is_main_process():
                    self._save_counters(done, counters)
            except OSError as e:
                raise CheckpointSaveError(
                    f"saving step {done}'s trainer state to {self._counters_path(done)} failed "
                    f"({type(e).__name__}: {e}). Free disk space or fix the directory's permissions, then rerun "
                    "with resume_from_checkpoint=True (`--resume_from_checkpoint true`)."
                ) from e
            self._prune_counters(ckpt, keep=done)
            self.callback_handler("on_save", args, ts, control)

        def account(metrics, step_done):
            """Count step ``step_done``'s update if it was skipped as non-finite; stop after too many in a row."""
            if step_done <= nonfinite["accounted"]:
                return
            nonfinite["accounted"] = step_done
            loss, grad_norm = float(metrics["loss"]), float(metrics.get("grad_norm", 0.0))
            if math.isfinite(loss) and math.isfinite(grad_norm):
                nonfinite["consecutive"] = 0
                return
            counters["skipped_updates"] += 1
            nonfinite["consecutive"] += 1
            limit = args.max_consecutive_nonfinite_updates
            if limit and nonfinite["consecutive"] >= limit:
                self._stop_nonfinite(loss, grad_norm, step_done, nonfinite["consecutive"], ckpt, save)
            if is_main_process():
                print(f"[trl_jax] step {step_done}: non-finite update skipped (loss {loss}, grad_norm {grad_norm}); "
                      f"{counters['skipped_updates']} skipped so far", file=sys.stderr)

        if args.eval_on_start and self.eval_dataset is not None:
            logger.log(self.evaluate(), start)
        done = start
        try:
            try:
                for step in range(start, total):
                    batch = self._batch_for_step(step)
                    stats = self._batch_stats(batch)
                    if isinstance(batch, LocalBatch):  # this process's rows: sum the counters over processes
                        stats = sum_over_processes(stats)
                    for k, v in stats.items():
                        counters[k] = counters.get(k, 0.0) + v
                    tokens_window += stats.get("num_tokens", 0.0)
                    self.state, metrics = self._train_step(self.state, self._device_batch(batch))
                    # Account the previous step's update while this one runs: one step in flight, no stall.
                    if pending is not None:
                        account(pending, done)
                    ckpt.check_for_errors()  # an asynchronous save that failed stops the run here
                    pending = metrics
                    window.append(metrics)
                    done = step + 1
                    self._after_step(done)
                    ts.global_step, ts.epoch = done, done / spe
                    logger.progress(done)
                    control = self.callback_handler("on_step_end", args, ts, control)
                    if self._should(args.logging_strategy, args.logging_steps, done, spe, total) or \
                            control.should_log or (args.logging_first_step and done == 1):
                        account(metrics, done)
                        flush(done)
                        control.should_log = False
                    if self.eval_dataset is not None and (control.should_evaluate or self._should(
                            args.eval_strategy, args.eval_steps or args.logging_steps, done, spe, total)):
                        metrics_eval = self.evaluate()
                        logger.log(metrics_eval, done)
                        self.callback_handler("on_evaluate", args, ts, control, metrics=metrics_eval)
                        control.should_evaluate = False
                    if control.should_save or (args.save_strategy != "no" and self._should(
                            args.save_strategy, args.save_steps, done, spe, total)):
                        save(done)
                        control.should_save = False
                    if done % spe == 0:
                        control = self.callback_handler("on_epoch_end", args, ts, control)
                    if control.should_training_stop:
                        break
                if pending is not None:
                    account(pending, done)
                if window:
                    flush(done)
            except BaseException:
                try:  # the error in flight is the one to report; a pending save's own failure would mask it
                    ckpt.close()
                except Exception:  # noqa: BLE001
                    pass
                raise
            ckpt.wait()  # raises CheckpointSaveError if the last asynchronous save failed
            self._prune_counters(ckpt)
            ckpt.close()
        finally:
            logger.close()
        train_loss = running_loss / max(running_n, 1)
        summary = {"train_loss": train_loss, "epoch": done / spe, "global_step": done}
        self.log_history.append(summary)
        self.callback_handler("on_train_end", args, ts, control)
        return TrainOutput(done, train_loss, summary)

    def _after_step(self, done: int) -> None:
        """Hook run after each optimizer step (e.g. TR-DPO's reference sync)."""

    def _stop_nonfinite(self, loss, grad_norm, step_done: int, consecutive: int, ckpt, save) -> None:
        """Stop after ``consecutive`` non-finite updates ending at step ``step_done``. Each was skipped (non-finite
        updates are never applied), so the state is the last good one: it is checkpointed before raising."""
        good = int(self.state.step)
        save(good)
        ckpt.wait()
        raise FloatingPointError(
            f"loss is {loss} (grad_norm {grad_norm}) at step {step_done}: {consecutive} non-finite updates in a row "
            f"(max_consecutive_nonfinite_updates={self.args.max_consecutive_nonfinite_updates}; 0 never stops). The "
            "updates "
            f"were skipped and the last good state was saved as step {good} in {ckpt.directory}. Lower "
            "learning_rate, set max_grad_norm, check the data for rows without completion tokens, or use "
            "compute_dtype='float32'; resume with resume_from_checkpoint."
        )

    # ------------------------------------------------------------------ counters saved with checkpoints
    def _counters_path(self, step: int) -> str:
        return os.fspath(as_path(self.args.output_dir) / "checkpoints" / f"trainer_state-{step}.json")

    def _save_counters(self, step: int, counters: dict) -> None:
        """Process 0 writes them (atomic: written aside and renamed locally; one object write on a URL)."""
        path = self._counters_path(step)
        data = json.dumps({"global_step": step, "counters": counters, "log_history": self.log_history})
        if is_url(path):
            as_path(path).write_text(data)
            return
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(data)
        os.replace(tmp, path)

    def _prune_counters(self, ckpt: Checkpointer, keep: int | None = None) -> None:
        """Delete ``trainer_state-<step>.json`` files whose orbax checkpoint is gone (``save_total_limit``)."""
        if jax.process_index() != 0:
            return
        steps = set(ckpt.all_steps(reload=keep is None)) | ({keep} if keep is not None else set())
        directory = as_path(self._counters_path(0)).parent
        if not directory.is_dir():
            return
        for p in directory.iterdir():
            m = _COUNTERS_FILE.match(p.name)
            if m and int(m.group(1)) not in steps:
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass

    def _load_counters(self, step: int) -> dict:
        path = as_path(self._counters_path(step))
        if not path.is_file():
            return {}
        saved = json.loads(path.read_text(encoding="utf-8"))
        if not self.log_history:
            self.log_history.extend(saved.get("log_history", []))
        return dict(saved.get("counters", {}))

    @staticmethod
    def _should(strategy: str, every, done: int, spe: int, total: int) -> bool:
        if strategy in (None, "no"):
            return False
        if strategy == "epoch":
            return done % spe == 0
        if strategy == "steps":
            every = float(every or 0)
            if 0 < every < 1:  # a ratio of the total steps, as transformers allows
                every = math.ceil(every * total)
            return every > 0 and done % int(every) == 0
        if strategy == "best":
            return False
        raise ValueError(f"unknown strategy {strategy!r}; use 'no', 'steps' or 'epoch'.")

    @staticmethod
    def _average(host_metrics: list[dict]) -> dict:
        """Average a logging window like transformers does (loss, metrics; NaN = not logged that step); last value
        for ``learning_rate`` and ``grad_norm``."""
        out = {}
        for k in host_metrics[0]:
            vals = np.array([float(m[k]) for m in host_metrics])
            out[k] = float(vals[-1]) if k in ("learning_rate", "grad_norm") else _nanmean(vals)
        return out

    # ------------------------------------------------------------------ eval
    def evaluate(self, eval_dataset=None, metric_key_prefix: str = "eval") -> dict:
        """Loss (pooled numerator / denominator over the whole set) and loss metrics averaged over batches."""
        ds = self._checked(eval_dataset, "eval") if eval_dataset is not None else self.eval_dataset
        if ds is None:
            raise ValueError("evaluate() needs an eval_dataset (in the constructor or as an argument).")
        if self.state is None:
            self._build(self.num_training_steps() if self.train_dataset is not None else 1)
        rows_per_batch = self.args.per_device_eval_batch_size * batch_parallel_size(self.mesh)
        n = len(ds)
        nb = math.ceil(n / rows_per_batch)
        num = den = 0.0
        values: dict[str, list] = {}
        for b in range(nb):
            local = self._collate_local(ds, range(b * rows_per_batch, min((b + 1) * rows_per_batch, n)), rows_per_batch)
            out = jax.device_get(self._eval_step(self.state, self._device_batch(local)))
            num += float(out["numerator"])
            den += float(out["denominator"])
            for k, v in out.items():
                if k not in ("loss", "numerator", "denominator"):
                    values.setdefault(k, []).append(float(v))
        res = {f"{metric_key_prefix}_loss": num / den if den else 0.0}
        res.update({f"{metric_key_prefix}_{k}": _nanmean(np.array(v)) for k, v in values.items()})
        return res

    # ------------------------------------------------------------------ saving
    @property
    def trained_params(self):
        return self.state.params if self.state is not None else self.params

    def save_model(self, output_dir: str | None = None, merged: bool | None = None) -> str:
        """Write HF-format safetensors + config (+ tokenizer), loadable by transformers and trl_jax; with LoRA,
        PEFT's adapter directory (``adapter_model.safetensors`` + ``adapter_config.json``, loadable by
        ``peft.PeftModel.from_pretrained``), or the merged full model with ``merged=True`` (default:
        ``args.save_merged_model``).

        Several processes: every process must call it (the params are gathered to host, a collective); process 0
        writes. ``output_dir`` may be a URL (``gs://``, ``s3://``, any epath/fsspec filesystem): the directory is
        written locally, then copied there."""
        output_dir = output_dir or self.args.output_dir
        merged = bool(getattr(self.args, "save_merged_model", False)) if merged is None else merged
        params = gather_to_host(self.trained_params) if is_multiprocess() else self.trained_params
        if is_main_process():
            if is_url(output_dir):
                import tempfile

                with tempfile.TemporaryDirectory() as tmp:
                    self._save_adapter_or_model(params, tmp, merged)
                    dest = as_path(output_dir)
                    dest.mkdir(parents=True, exist_ok=True)
                    for p in dest.iterdir():  # stale weights of an earlier save would be picked up on load
                        if p.name.endswith(".safetensors") or p.name.endswith(".safetensors.index.json"):
                            p.unlink()
                    for name in sorted(os.listdir(tmp)):
                        (dest / name).write_bytes(as_path(os.path.join(tmp, name)).read_bytes())
            else:
                self._save_adapter_or_model(params, os.fspath(as_path(output_dir)), merged)
        sync_processes("trl_jax:save_model")
        return output_dir
