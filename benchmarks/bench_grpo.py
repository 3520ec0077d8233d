"""One GRPO optimizer step (generation + scoring + loss/update) with trl_jax's GRPOTrainer.

    python benchmarks/bench_grpo.py --preset cpu-tiny        # builtin:tiny-qwen3, 2 prompts x 8, prompt ~40, completion 16
    python benchmarks/bench_grpo.py --preset gpu-qwen3-0.6b  # Qwen3-0.6B shape (random init, bf16), 2 prompts x 8,
                                                             # prompt 128, completion 256: TRL takes 8.7 s/step there

Reports the median over ``--steps`` timed steps after ``--warmup`` steps (compiles excluded), split into generation
(sampling + decode + rewards + advantages, host included) and the jitted train step, as one JSON line. The reward is
a cheap Python function so the numbers are the trainer's own cost. Completions on a random model almost never hit EOS,
so they run the full ``max_completion_length`` (the sampler's worst case).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

PRESETS = {
    "cpu-tiny": dict(model="builtin:tiny-qwen3", prompts=2, generations=8, prompt_len=None, completion_len=16,
                     dtype="float32"),
    "gpu-qwen3-0.6b": dict(model="qwen3-0.6b-random", prompts=2, generations=8, prompt_len=128, completion_len=256,
                           dtype="bfloat16"),
}

QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                 rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


def length_reward(completion_ids, **kwargs):
    return [float(len(ids) % 7) for ids in completion_ids]


def _random_qwen3(dtype):
    import jax
    import jax.numpy as jnp
    from transformers import AutoConfig

    from trl_jax.assets import build_char_tokenizer
    from trl_jax.models import CausalLM, config_from_hf

    tok = build_char_tokenizer()
    hf = AutoConfig.for_model("qwen3", eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                              architectures=["Qwen3ForCausalLM"], **QWEN3_06B)
    cfg = config_from_hf(hf)
    model = CausalLM(cfg, hf_config=hf)
    params = jax.jit(model.init_params)(jax.random.PRNGKey(0))
    params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    return (model, params), tok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--loss_type", default="dapo")
    ap.add_argument("--beta", type=float, default=0.0)
    ns = ap.parse_args()
    p = PRESETS[ns.preset]

    import jax
    from datasets import Dataset

    from trl_jax.configs import GRPOConfig
    from trl_jax.trainers.grpo import GRPOTrainer

    n_rows = p["prompts"] * p["generations"]
    if p["prompt_len"] is None:
        from trl_jax.data.builtin import load_builtin_dataset

        ds = load_builtin_dataset("arithmetic_prompts").select(range(64))
    else:  # plain-text prompts of exactly prompt_len characters (= tokens with the char tokenizer)
        ds = Dataset.from_dict({"prompt": [("%d " % i * 200)[: p["prompt_len"]] for i in range(64)]})
    n_dev = jax.device_count()
    args = GRPOConfig(
        output_dir="/tmp/bench_grpo", per_device_train_batch_size=max(n_rows // n_dev, 1),
        num_generations=p["generations"], max_completion_length=p["completion_len"], temperature=1.0,
        loss_type=ns.loss_type, beta=ns.beta, max_steps=ns.warmup + ns.steps, logging_steps=10 ** 6,
        save_strategy="no", report_to="none", bf16=p["dtype"] == "bfloat16", gradient_checkpointing=True,
        learning_rate=1e-6, disable_tqdm=True,
    )
    if p["model"] == "qwen3-0.6b-random":
        model, tok = _random_qwen3(p["dtype"])
    else:
        model, tok = p["model"], None
    t0 = time.perf_counter()
    tr = GRPOTrainer(model, reward_funcs=length_reward, args=args, train_dataset=ds, processing_class=tok)
    tr._build(tr.num_training_steps())
    setup = time.perf_counter() - t0
    gen_t, step_t, total_t = [], [], []
    for s in range(ns.warmup + ns.steps):
        t0 = time.perf_counter()
        batch = tr._batch_for_step(s)
        t1 = time.perf_counter()
        tr.state, m = tr._train_step(tr.state, tr._device_batch(batch))
        jax.block_until_ready(m["loss"])
        t2 = time.perf_counter()
        if s >= ns.warmup:
            gen_t.append(t1 - t0)
            step_t.append(t2 - t1)
            total_t.append(t2 - t0)
    rec = {
        "preset": ns.preset, "device": jax.devices()[0].device_kind, "n_devices": n_dev,
        "rows": n_rows, "prompt_len": tr.prompt_length, "completion_len": p["completion_len"],
        "loss_type": ns.loss_type, "beta": ns.beta,
        "step_s_median": round(statistics.median(total_t), 4),
        "generation_s_median": round(statistics.median(gen_t), 4),
        "train_step_s_median": round(statistics.median(step_t), 4),
        "setup_and_first_compile_s": round(setup, 1),
        "jax": jax.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
