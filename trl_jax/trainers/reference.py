"""The reference model shared by DPO and KTO: a frozen copy, a separate checkpoint, precomputed log-probs, or
TR-DPO-style syncing (``sync_ref_model``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from trl_jax.parallel import batch_parallel_size
from trl_jax.parallel.distributed import gather_to_host
from trl_jax.train.precision import cast_floating
from trl_jax.trainers.base import _dtype


def params_equal(a, b) -> jax.Array:
    """Scalar bool: every leaf of ``a`` equals ``b``'s bit for bit (compared in the wider of the two dtypes)."""
    def one(x, y):
        wide = jnp.promote_types(x.dtype, y.dtype)
        return jnp.array_equal(x.astype(wide), y.astype(wide))

    if jax.tree.structure(a) != jax.tree.structure(b):
        from trl_jax.models.lora import has_adapters
        from trl_jax.trainers.peft import lora_params_equal

        if has_adapters(a) and not has_adapters(b):
            return lora_params_equal(a, b, params_equal)
        return jnp.asarray(False)
    leaves = [one(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def reference_value(policy_value, reference_fn, params, ref_params):
    """The reference model's value (``reference_fn(ref_params)``, no gradient), or exactly the policy's own
    ``policy_value`` while the two hold the same weights (the first step; a full ``sync_ref_model``).

    TRL runs the policy and the reference through the same kernels, so at step 1 its rewards, KL and log-ratios
    are exactly 0 and ties (``rewards/accuracies`` uses a strict ``>``) come out as TRL's. Two XLA programs (one
    differentiated, one not) need not round identically, so here the tie is made exact by using one computation.
    """
    same = params_equal(params, ref_params)  # LoRA: adapters at identity and the base equal
    ref = reference_fn(jax.lax.stop_gradient(ref_params))
    return jax.lax.stop_gradient(jax.tree.map(lambda p, r: jnp.where(same, p, r), policy_value, ref))


class ReferenceModelMixin:
    """Mixed into a ``BaseTrainer`` subclass whose config has ``precompute_ref_log_probs``,
    ``precompute_ref_batch_size``, ``sync_ref_model``, ``ref_model_mixup_alpha`` and ``ref_model_sync_steps``."""

    def _resolve_ref_model(self, ref_model):
        """Reference params: a frozen copy of the initial weights (TRL reloads the same checkpoint), or
        ``ref_model`` given as a path / hub id or a ``(CausalLM, params)`` pair (same architecture)."""
        dtype = _dtype(getattr(self.args, "ref_param_dtype", None) or self.args.compute_dtype)
        is_base, originals = self._lora_reference_originals(ref_model)
        if is_base:
            return originals
        if ref_model is None:
            # held in `ref_param_dtype` (default: the compute dtype, as TRL holds it in the model's dtype): a
            # bf16 reference costs half an fp32 copy
            return jax.tree.map(lambda x: x.copy() if x.dtype == dtype or not jnp.issubdtype(x.dtype, jnp.floating)
                                else x.astype(dtype), self.params)
        if isinstance(ref_model, tuple):
            self._ref_from_caller = True
            return ref_model[1]
        _, params, _ = self._load_model(ref_model)
        return cast_floating(params, dtype)

    def _ref_params_for_state(self):
        return None if self.args.precompute_ref_log_probs else self.ref_model_params

    def _precompute_columns(self, fn) -> None:
        """Run ``fn(ref_params, batch) -> {column: [B] array}`` once over the train and eval sets (jitted, padded
        fixed-shape batches) and add the columns; then the reference weights are released."""
        jitted = jax.jit(fn)
        rows_per_batch = (self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size) * \
            batch_parallel_size(self.mesh)
        for split in ("train", "eval"):
            ds = self.train_dataset if split == "train" else self.eval_dataset
            if ds is None:
                continue
            columns: dict[str, list] = {}
            for start in range(0, len(ds), rows_per_batch):
                stop = min(start + rows_per_batch, len(ds))
                # each process collates its rows of the batch; the [B] outputs are gathered to every process
                # (each needs the whole column: later steps read other rows)
                local = self._collate_local(ds, range(start, stop), rows_per_batch, collate=self._collate)
                ref = self._reference(self.params, self.ref_model_params)
                out = gather_to_host(jitted(ref, self._device_batch(local)))
                for k, v in out.items():
                    if k in ds.column_names:
                        continue
                    columns.setdefault(k, []).extend(np.asarray(v[:stop - start], np.float32).tolist())
            for k, v in columns.items():
                ds = ds.add_column(k, v)
            if split == "train":
                self.train_dataset = ds
            else:
                self.eval_dataset = ds
        self.ref_model_params = None

    def _after_step(self, done: int) -> None:
        """TR-DPO: every ``ref_model_sync_steps`` steps, ``ref = alpha * policy + (1 - alpha) * ref``."""
        args = self.args
        if not args.sync_ref_model or self.state.ref_params is None or done % args.ref_model_sync_steps:
            return
        if not hasattr(self, "_mix_ref"):
            alpha = args.ref_model_mixup_alpha
            self._mix_ref = jax.jit(
                lambda p, r: jax.tree.map(lambda a, b: (alpha * a + (1 - alpha) * b).astype(b.dtype), p, r))
        self.state = self.state.replace(ref_params=self._mix_ref(self.state.params, self.state.ref_params))
