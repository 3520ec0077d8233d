"""Per-device work of a sharded train step, read from the compiled program (no timing; any machine).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python benchmarks/bench_sharded_cost.py

An SFT-style step (``hidden_states`` + ``fused_log_probs`` at its default chunking + AdamW, Qwen3-shaped: hidden
256, 2 layers, vocab 32768, batch 16 x 256) is compiled for 1 device and for 8 devices on each mesh
``(data, fsdp, tensor)``. ``trl_jax.utils.hlo_cost`` reads per-device matmul FLOPs and collective bytes from the
partitioned HLO (loop trip counts included). Prints one JSON line per mesh: ``flops_ratio`` = 8 x per-device
FLOPs / one device's (ideal 1.0) and ``collective_over_params`` = collective bytes / fp32 parameter bytes.
``--bf16`` compiles with a bf16 compute dtype.
"""

from __future__ import annotations

import argparse
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from trl_jax.losses.base import LossTerms
from trl_jax.models.config import ModelConfig
from trl_jax.models.model import CausalLM
from trl_jax.ops import fused_log_probs
from trl_jax.parallel import make_mesh
from trl_jax.train import TrainState, make_train_step
from trl_jax.utils.hlo_cost import hlo_cost


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--bf16", action="store_true")
    a = ap.parse_args()
    cfg = ModelConfig(model_type="qwen3", vocab_size=a.vocab, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8, head_dim=32, qk_norm=True,
                      tie_word_embeddings=True)
    model = CausalLM(cfg)
    params = model.abstract_params()

    def loss_fn(p, batch, rng):
        lp = fused_log_probs(model.hidden_states(p, batch["input_ids"]), model.lm_head_weight(p), batch["labels"])
        return LossTerms(-jnp.sum(lp), jnp.asarray(lp.size, jnp.float32), {})

    batch = {k: jax.ShapeDtypeStruct((a.batch, a.seq), jnp.int32) for k in ("input_ids", "labels")}
    param_bytes = sum(math.prod(x.shape) * 4 for x in jax.tree.leaves(params))
    opt = optax.adamw(1e-4)
    state = jax.eval_shape(lambda p: TrainState.create(p, opt, jax.random.PRNGKey(0)), params)
    one = None
    for shape in [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]:
        if math.prod(shape) > jax.device_count():
            print(json.dumps({"mesh": shape, "skipped": f"needs {math.prod(shape)} devices"}))
            continue
        mesh = make_mesh(shape, devices=jax.devices()[:math.prod(shape)])
        step = make_train_step(loss_fn, opt, mesh=mesh, logical_axes=model.logical_axes(),
                               compute_dtype=jnp.bfloat16 if a.bf16 else None)
        c = hlo_cost(step.lower(state, batch).compile())
        one = one or c["matmul_flops"]
        print(json.dumps({"mesh": shape, "flops_ratio": round(math.prod(shape) * c["matmul_flops"] / one, 3),
                          "collective_over_params": round(c["collective_bytes_total"] / param_bytes, 2),
                          "collectives": {k: round(v / param_bytes, 2) for k, v in c["collective_bytes"].items()},
                          "jax": jax.__version__}), flush=True)


if __name__ == "__main__":
    main()
