"""Shared fixtures for the train/parallel tests: a tiny transformer-ish model with logical axis names, an SFT-like
token-mean loss returning ``LossTerms``, deterministic data -- and, run as a script, one process of the
two-process ``jax.distributed`` test (see ``tests/test_parallel_multiprocess.py``)."""

from __future__ import annotations

import os
import sys

import numpy as np

V, D, H, HD, F, L, T = 32, 16, 2, 8, 32, 2, 8
STEPS = 3

LOGICAL = {
    "embed_tokens": {"embedding": ("vocab", "embed")},
    "layers": {
        "input_layernorm": {"scale": ("layers", "embed")},
        "q_proj": {"kernel": ("layers", "embed", "heads")},
        "k_proj": {"kernel": ("layers", "embed", "kv_heads")},
        "v_proj": {"kernel": ("layers", "embed", "kv_heads")},
        "o_proj": {"kernel": ("layers", "heads", "embed")},
        "post_attention_layernorm": {"scale": ("layers", "embed")},
        "up_proj": {"kernel": ("layers", "embed", "mlp"), "bias": ("layers", "mlp")},
        "down_proj": {"kernel": ("layers", "mlp", "embed")},
    },
    "norm": {"scale": ("embed",)},
    "lm_head": {"kernel": ("embed", "vocab")},
}

SHAPES = {
    "embed_tokens": {"embedding": (V, D)},
    "layers": {
        "input_layernorm": {"scale": (L, D)},
        "q_proj": {"kernel": (L, D, H * HD)},
        "k_proj": {"kernel": (L, D, H * HD)},
        "v_proj": {"kernel": (L, D, H * HD)},
        "o_proj": {"kernel": (L, H * HD, D)},
        "post_attention_layernorm": {"scale": (L, D)},
        "up_proj": {"kernel": (L, D, F), "bias": (L, F)},
        "down_proj": {"kernel": (L, F, D)},
    },
    "norm": {"scale": (D,)},
    "lm_head": {"kernel": (D, V)},
}


def init_params(seed: int = 0):
    """Numpy fp32 params (norm scales near 1, matrices ~N(0, 0.3^2))."""
    rng = np.random.default_rng(seed)

    def make(path, shape):
        if "scale" in path:
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        return (0.3 * rng.standard_normal(shape)).astype(np.float32)

    def walk(tree, path=""):
        return {k: walk(v, path + "/" + k) if isinstance(v, dict) else make(path + "/" + k, v) for k, v in tree.items()}

    return walk(SHAPES)


def make_batch(seed: int, batch_size: int = 8, lengths=None):
    """``input_ids [B, T]`` int32 and ``completion_mask [B, T]`` with a different number of counted tokens per row."""
    rng = np.random.default_rng(1000 + seed)
    ids = rng.integers(0, V, size=(batch_size, T), dtype=np.int32)
    if lengths is None:
        lengths = rng.integers(1, T, size=batch_size)
    mask = (np.arange(T)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    return {"input_ids": ids, "completion_mask": mask}


def forward(params, input_ids):
    """``input_ids [B, T]`` -> logits ``[B, T, V]`` (fp32 accumulation, compute in the params' dtype)."""
    import jax
    import jax.numpy as jnp

    def rms(x, scale):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
        return (y * scale.astype(jnp.float32)).astype(x.dtype)

    x = params["embed_tokens"]["embedding"][input_ids]
    B, Tn = input_ids.shape
    causal = jnp.tril(jnp.ones((Tn, Tn), bool))

    def layer(x, p):
        h = rms(x, p["input_layernorm"]["scale"])
        q = (h @ p["q_proj"]["kernel"]).reshape(B, Tn, H, HD)
        k = (h @ p["k_proj"]["kernel"]).reshape(B, Tn, H, HD)
        v = (h @ p["v_proj"]["kernel"]).reshape(B, Tn, H, HD)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(HD)
        s = jnp.where(causal, s, -1e9)
        a = jax.nn.softmax(s, axis=-1).astype(x.dtype)
        o = jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(B, Tn, H * HD)
        x = x + o @ p["o_proj"]["kernel"]
        h = rms(x, p["post_attention_layernorm"]["scale"])
        x = x + jax.nn.gelu(h @ p["up_proj"]["kernel"] + p["up_proj"]["bias"]) @ p["down_proj"]["kernel"]
        return x, None

    x, _ = jax.lax.scan(layer, x, params["layers"])
    x = rms(x, params["norm"]["scale"])
    return (x @ params["lm_head"]["kernel"]).astype(jnp.float32)


def sft_loss(params, batch, rng):
    """Token-mean next-token NLL over ``completion_mask`` as ``LossTerms`` (numerator = summed NLL,
    denominator = counted tokens)."""
    import jax
    import jax.numpy as jnp

    from trl_jax.losses.base import LossTerms

    del rng
    ids = batch["input_ids"]
    logits = forward(params, ids)[:, :-1]
    targets = ids[:, 1:]
    mask = batch["completion_mask"][:, 1:].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    tok = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    num = -jnp.sum(tok * mask)
    den = jnp.sum(mask)
    acc = jnp.sum((jnp.argmax(logits, -1) == targets) * mask) / jnp.maximum(den, 1.0)
    return LossTerms(num, den, {"mean_token_accuracy": acc})


def make_optimizer():
    from trl_jax.train import make_optimizer as mk, make_schedule

    sched = make_schedule("linear", 1e-2, num_training_steps=10, warmup_steps=2)
    return mk(sched, optim="adamw_torch", weight_decay=0.01), sched


def run_steps(mesh=None, steps=STEPS, batch_fn=None, step_logical=False, **step_kwargs):
    """Train ``steps`` steps; returns ``(losses, state, step)``. ``batch_fn(i)`` gives the device batch.

    ``step_logical``: create the state unsharded and let ``make_train_step(logical_axes=...)`` shard it."""
    import jax

    from trl_jax.parallel import shard_batch
    from trl_jax.train import TrainState, make_train_step

    tx, sched = make_optimizer()
    if step_logical:
        state = TrainState.create(init_params(), tx, jax.random.PRNGKey(0))
        step_kwargs["logical_axes"] = LOGICAL
    else:
        state = TrainState.create(
            init_params(), tx, jax.random.PRNGKey(0), mesh=mesh, logical_axes=LOGICAL if mesh else None
        )
    step = make_train_step(sft_loss, tx, mesh=mesh, max_grad_norm=1.0, learning_rate_fn=sched, **step_kwargs)
    losses = []
    for i in range(steps):
        b = batch_fn(i) if batch_fn else (make_batch(i) if mesh is None else shard_batch(make_batch(i), mesh))
        state, m = step(state, b)
        losses.append(float(m["loss"]))
    return losses, state, step


def _worker(process_id: int, num_processes: int, port: int, out: str):
    import jax

    from trl_jax.parallel import initialize_distributed, local_batch_slice, make_global_batch, make_mesh

    initialize_distributed(f"127.0.0.1:{port}", num_processes, process_id)
    assert jax.process_count() == num_processes and jax.device_count() == 8, (jax.process_count(), jax.device_count())
    mesh = make_mesh((2, 2, 2))

    def batch_fn(i):
        full = make_batch(i)
        rows = local_batch_slice(mesh, full["input_ids"].shape[0])
        local = {k: v[rows] for k, v in full.items()}
        return make_global_batch(local, mesh, full["input_ids"].shape[0])

    losses, state, _ = run_steps(mesh, batch_fn=batch_fn)
    from jax.experimental import multihost_utils

    params = multihost_utils.process_allgather(state.params, tiled=True)
    if process_id == 0:
        flat = {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
        np.savez(out, losses=np.asarray(losses), **flat)
    jax.distributed.shutdown()


if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
