"""Mixed precision, two documented recipes.

1. **fp32 master params, bf16 compute** (default recommendation): keep ``TrainState.params`` fp32 and pass
   ``compute_dtype=jnp.bfloat16`` to ``make_train_step``: the step casts a bf16 copy of the params for the forward
   and backward; gradients arrive in fp32 (the cast is differentiated), the optimizer and its moments stay fp32.
2. **bf16 params, fp32 optimizer moments** (half the parameter memory): store params in bf16 and wrap the
   optimizer with :func:`fp32_optimizer_state`: moments are fp32, each update is computed in fp32 and rounded
   once into the bf16 params (no fp32 master copy, so very small updates can round away).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


KEEP_FP32 = ("kernel_absmax", "kernel_scb")  # 4-/8-bit quantization scales stay fp32 (as bitsandbytes keeps them)


def cast_floating(tree, dtype):
    """Cast every floating-point leaf of ``tree`` to ``dtype`` (ints, bools, keys and the quantization scales
    ``kernel_absmax`` / ``kernel_scb`` untouched)."""

    def one(path, x):
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            return x
        if path and str(getattr(path[-1], "key", "")) in KEEP_FP32:
            return x
        return x.astype(dtype)

    return jax.tree_util.tree_map_with_path(one, tree)


def fp32_optimizer_state(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """Run ``optimizer`` on fp32 copies of params and gradients, so its state (Adam moments) is fp32 whatever
    the params' dtype. Returned updates are fp32; ``optax.apply_updates`` rounds ``p + u`` to ``p.dtype``."""

    def init(params):
        return optimizer.init(cast_floating(params, jnp.float32))

    def update(grads, state, params=None):
        p32 = None if params is None else cast_floating(params, jnp.float32)
        return optimizer.update(cast_floating(grads, jnp.float32), state, p32)

    return optax.GradientTransformation(init, update)
