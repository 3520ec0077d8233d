"""One GRPO optimizer step (generation + scoring + loss/update) with trl_jax's GRPOTrainer, split into phases, and
(CPU presets) TRL's GRPOTrainer step on the same tiny model and settings, in one run.

    python benchmarks/bench_grpo.py --preset cpu-tiny        # builtin:tiny-qwen3, 2 prompts x 8, prompt ~40,
                                                             # completion 16; + TRL 1.16's GRPOTrainer side by side
    python benchmarks/bench_grpo.py --preset gpu-qwen3-0.6b  # Qwen3-0.6B shape (random init, bf16), 2 prompts x 8,
                                                             # prompt 128, completion 256: TRL takes 8.7 s/step there

Reports over ``--steps`` timed steps after ``--warmup`` steps (compiles excluded), as one JSON line:

* ``step_s`` / ``step_s_mean``: median / mean of the whole optimizer step as the trainer runs it (device work
  overlapped with host work);
* phases (``trl_jax.phases_s``), each the mean wall time per optimizer step the host spends in it (a generation
  shared by ``steps_per_generation`` steps is amortized over them, so the phases add up to ``step_s_mean``):
  ``generate`` (prefill + decode, until the sampled tokens are on the host), ``host_rewards`` (decoding the text,
  reward functions, advantages), ``old_logps_wait`` (waiting for the old log-prob forward passes after the host
  work, which they overlap; 0 when TRL's rule computes none or the sampler's log-probs are reused), ``train``
  (the jitted step: policy forward/backward, reference log-probs when ``beta != 0``, update), plus
  ``logps_pass`` (one forward log-prob pass over the generation batch, measured alone: the cost of an old or
  reference log-prob computation);
* TRL (``trl``): ``step_s`` and the same split from wrapped methods: ``generate`` (``_generate``: transformers
  ``generate`` + its host side), ``host_rewards`` (``_calculate_rewards``), ``old_ref_logps`` (the
  ``_get_per_token_logps_and_entropies`` calls made while scoring the generation batch), ``train`` (the rest of
  the step: ``compute_loss`` forward/backward + optimizer).

The reward is a cheap Python function so the numbers are the trainers' own cost. Completions on a random model almost
never hit EOS, so they run the full ``max_completion_length`` (the sampler's worst case).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time

PRESETS = {
    "cpu-tiny": dict(model="builtin:tiny-qwen3", prompts=2, generations=8, prompt_len=None, completion_len=16,
                     dtype="float32", trl=True),
    "gpu-qwen3-0.6b": dict(model="qwen3-0.6b-random", prompts=2, generations=8, prompt_len=128, completion_len=256,
                           dtype="bfloat16", trl=False),
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


def _median(xs):
    return round(statistics.median(xs), 4) if xs else None


def _mean(xs):
    return round(statistics.fmean(xs), 4) if xs else None


def _settings(p, ns):
    return dict(num_generations=p["generations"], max_completion_length=p["completion_len"], temperature=1.0,
                loss_type=ns.loss_type, beta=ns.beta, num_iterations=ns.num_iterations,
                steps_per_generation=ns.steps_per_generation, max_steps=ns.warmup + ns.steps,
                logging_steps=10 ** 6, save_strategy="no", report_to="none", gradient_checkpointing=True,
                learning_rate=1e-6, disable_tqdm=True, top_k=ns.top_k)


def bench_trl_jax(p, ns, ds):
    import jax
    import numpy as np

    from trl_jax.configs import GRPOConfig
    from trl_jax.trainers.grpo import GRPOTrainer

    n_rows = p["prompts"] * p["generations"]
    n_dev = jax.device_count()
    args = GRPOConfig(output_dir="/tmp/bench_grpo", per_device_train_batch_size=max(n_rows // n_dev, 1),
                      bf16=p["dtype"] == "bfloat16", decode_layout=ns.decode_layout, **_settings(p, ns))
    if p["model"] == "qwen3-0.6b-random":
        model, tok = _random_qwen3(p["dtype"])
    else:
        model, tok = p["model"], None
    t0 = time.perf_counter()
    tr = GRPOTrainer(model, reward_funcs=length_reward, args=args, train_dataset=ds, processing_class=tok)
    tr._build(tr.num_training_steps())
    setup = time.perf_counter() - t0
    names = ("generate", "host", "old_logps_wait")
    step_t, train_t, phases = [], [], {k: [] for k in names}
    arrays = None
    for s in range(ns.warmup + ns.steps):
        tr.phase_seconds = {}
        t0 = time.perf_counter()
        batch = tr._batch_for_step(s)
        t1 = time.perf_counter()
        tr.state, m = tr._train_step(tr.state, tr._device_batch(batch))
        jax.block_until_ready(m["loss"])
        t2 = time.perf_counter()
        arrays = batch
        if s >= ns.warmup:
            step_t.append(t2 - t0)
            train_t.append(t2 - t1)
            for k in names:
                phases[k].append(tr.phase_seconds.get(k, 0.0))
    # one log-prob forward pass over a generation batch, alone (what an old or reference log-prob pass costs)
    gen_batch = {k: arrays[k] for k in ("input_ids", "segment_ids", "completion_ids", "completion_mask")}
    gen_batch = {k: np.concatenate([v] * tr.steps_per_generation, 0) for k, v in gen_batch.items()}
    tr._old_logps(tr.state.params, gen_batch)  # compile
    lp = []
    for _ in range(ns.steps):
        t0 = time.perf_counter()
        tr._old_logps(tr.state.params, gen_batch)
        lp.append(time.perf_counter() - t0)
    generate_every = tr.steps_per_generation * args.num_iterations
    return {
        "step_s": _median(step_t), "step_s_mean": _mean(step_t),
        "phases_s": {"generate": _mean(phases["generate"]), "host_rewards": _mean(phases["host"]),
                     "old_logps_wait": _mean(phases["old_logps_wait"]), "train": _mean(train_t),
                     "logps_pass": _median(lp)},
        "old_logps": ("none (TRL's rule: ratio 1)" if args.gradient_accumulation_steps % generate_every == 0 else
                      "sampler's" if tr.reuse_sampler_logps and tr.sampler_logps_are_exact() else "recomputed"),
        "n_devices": n_dev, "rows": n_rows, "prompt_len": tr.prompt_length,
        "setup_and_first_compile_s": round(setup, 1), "decode_layout": ns.decode_layout,
    }


def bench_trl(p, ns, ds):
    import torch
    import transformers
    import trl
    from transformers import TrainerCallback

    from trl_jax.assets import builtin_model_dir

    path = builtin_model_dir(p["model"])
    n_rows = p["prompts"] * p["generations"]
    args = trl.GRPOConfig(output_dir="/tmp/bench_grpo_trl", per_device_train_batch_size=n_rows, use_cpu=True,
                          bf16=False, **_settings(p, ns))
    tr = trl.GRPOTrainer(model=path, reward_funcs=length_reward, args=args, train_dataset=ds)
    times = {"generate": 0.0, "host_rewards": 0.0, "old_ref_logps": 0.0, "score": 0.0}
    in_scoring = [False]

    def timed(name, fn, when=None):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            if when is not None and not when():
                return fn(*a, **kw)
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                times[name] += time.perf_counter() - t0
        return wrapper

    gs = tr._generate_and_score_completions

    def scoring(*a, **kw):
        in_scoring[0] = True
        try:
            return gs(*a, **kw)
        finally:
            in_scoring[0] = False

    tr._generate_and_score_completions = timed("score", scoring)
    tr._generate = timed("generate", tr._generate)
    tr._calculate_rewards = timed("host_rewards", tr._calculate_rewards)
    tr._get_per_token_logps_and_entropies = timed("old_ref_logps", tr._get_per_token_logps_and_entropies,
                                                   when=lambda: in_scoring[0])
    rec = {"step": [], **{k: [] for k in times}}

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            for k in times:
                times[k] = 0.0
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if state.global_step > ns.warmup:
                rec["step"].append(time.perf_counter() - self.t0)
                for k in times:
                    rec[k].append(times[k])

    tr.add_callback(Clock())
    tr.train()
    train = [s - g for s, g in zip(rec["step"], rec["score"], strict=True)]
    return {
        "step_s": _median(rec["step"]), "step_s_mean": _mean(rec["step"]),
        "phases_s": {"generate": _mean(rec["generate"]), "host_rewards": _mean(rec["host_rewards"]),
                     "old_ref_logps": _mean(rec["old_ref_logps"]), "train": _mean(train)},
        "trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--loss_type", default="dapo")
    ap.add_argument("--beta", type=float, default=0.0)
    ap.add_argument("--num_iterations", type=int, default=1)
    ap.add_argument("--steps_per_generation", type=int, default=None)
    ap.add_argument("--top_k", type=int, default=0)
    ap.add_argument("--decode_layout", default="auto", type=lambda s: None if s in ("none", "None") else s)
    ap.add_argument("--no-trl", dest="trl", action="store_false", help="skip TRL's step (CPU presets run it)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads per side (torch.set_num_threads / XLA intra-op); default 1 for cpu-tiny (as "
                         "bench_trainers.py: 2-thread OpenMP on shared cores stalls torch), 0 = library defaults")
    ns = ap.parse_args()
    p = PRESETS[ns.preset]
    threads = ns.threads if ns.threads is not None else (1 if ns.preset == "cpu-tiny" else 0)
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        if threads == 1:
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                       "intra_op_parallelism_threads=1").strip()
        import torch

        torch.set_num_threads(threads)

    import jax
    from datasets import Dataset

    if p["prompt_len"] is None:
        from trl_jax.data.builtin import load_builtin_dataset

        ds = load_builtin_dataset("arithmetic_prompts").select(range(64))
    else:  # plain-text prompts of exactly prompt_len characters (= tokens with the char tokenizer)
        ds = Dataset.from_dict({"prompt": [("%d " % i * 200)[: p["prompt_len"]] for i in range(64)]})
    out = {
        "preset": ns.preset, "device": jax.devices()[0].device_kind, "completion_len": p["completion_len"],
        "loss_type": ns.loss_type, "beta": ns.beta, "num_iterations": ns.num_iterations,
        "steps_per_generation": ns.steps_per_generation, "top_k": ns.top_k, "threads": threads,
        "trl_jax": bench_trl_jax(p, ns, ds),
    }
    if p["trl"] and ns.trl:
        out["trl"] = bench_trl(p, ns, ds)
        out["speedup_vs_trl"] = round(out["trl"]["step_s_mean"] / out["trl_jax"]["step_s_mean"], 2)
    out.update({"jax": jax.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
                "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
