"""Gemma 2, Gemma 3 (text) and Phi-3 against transformers' PyTorch code (fp32, max abs diff <= 1e-4).

Tiny random checkpoints (``model_fixtures.NEW_ARCHS``) exercise what sets each family apart: soft-capped attention
and logits, ``query_pre_attn_scalar``, sandwich ``(1 + w)`` norms, alternating sliding (window 4 < sequence) and
global layers, Gemma 3's qk-norm and per-layer-type RoPE (linear-scaled global, own local base), Phi-3's fused
projections, LongRoPE (short and long factors) with partial rotary, and a window on every layer. Each family is
checked on padded (left and right) and packed batches, scanned and unrolled layers, token-by-token cache decoding
against transformers' own cached decoding, the sampler, the save -> transformers round trip, the
sequence-classification head, and one SFT and one GRPO run (whose first-batch SFT loss equals transformers').
Qwen3-MoE and Mixtral (4 experts, top 2): logits, cached decoding, round trip, the load-balancing loss, expert-axis
sharding, the sequence-classification head, SFT (with the aux term), DPO and KTO (TRL's aux term,
router_aux_loss_coef) and GRPO (the ragged expert dispatch and mixed dense/expert layers: tests/test_moe.py). LoRA
adapters from PEFT on Gemma 2 and Qwen3-MoE give PEFT's logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from model_fixtures import (
    NEW_ARCHS,
    make_torch_model,
    packed_batch,
    padded_batch,
    randomize_,
    save_torch_model,
    torch_logits,
)
from trl_jax.assets import build_char_tokenizer
from trl_jax.models import CausalLM, final_logit_softcapping, from_pretrained, save_pretrained

ATOL = 1e-4
NAMES = ["gemma2", "gemma3_text", "phi3"]
MOE = ["qwen3_moe", "mixtral"]
TRAINED = {"gemma3_text", "phi3", "qwen3_moe"}  # one end-to-end SFT + GRPO run per family
_CACHE: dict = {}


def _loaded(name, tmp_path_factory):
    if name not in _CACHE:
        tm = make_torch_model(name)
        d = save_torch_model(tm, tmp_path_factory.mktemp(name))
        model, params = from_pretrained(d)
        _CACHE[name] = (tm, d, model, params)
    return _CACHE[name]


def _torch_cached_logits(tm, ids, mask, pos, prompt_len):
    """transformers' own incremental decoding: the prompt through a ``DynamicCache``, then one token per call.
    Returns ``[B, T - prompt_len + 1, V]``: logits at the prompt's last slot and at every later token."""
    ids_t, mask_t = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(mask)
    pos_t = torch.as_tensor(pos, dtype=torch.long)
    cache = transformers.DynamicCache(config=tm.config)
    out = []
    with torch.no_grad():
        r = tm(input_ids=ids_t[:, :prompt_len], attention_mask=mask_t[:, :prompt_len],
               position_ids=pos_t[:, :prompt_len], cache=cache, use_cache=True)
        out.append(r.logits[:, -1])
        for t in range(prompt_len, ids.shape[1]):
            r = tm(input_ids=ids_t[:, t:t + 1], attention_mask=mask_t[:, :t + 1], position_ids=pos_t[:, t:t + 1],
                   cache=cache, use_cache=True)
            out.append(r.logits[:, -1])
    return torch.stack(out, 1).float().numpy()


@pytest.mark.parametrize("name", NAMES)
def test_padded_packed_scanned_and_unrolled_logits_match_transformers(name, tmp_path_factory):
    tm, d, model, params = _loaded(name, tmp_path_factory)
    assert model.config.model_type == name
    ids, mask, pos = padded_batch()  # T = 12 > window; phi3: beyond original_max_position_embeddings (long factors)
    ref = torch_logits(tm, ids, mask, pos)
    logits = jax.jit(model.logits)
    out = np.asarray(logits(params, ids, pos, mask))
    assert np.abs(out - ref)[mask.astype(bool)].max() <= ATOL
    model_u, params_u = from_pretrained(d, scan_layers=False)
    assert "layers_0" in params_u and "layers" not in params_u
    np.testing.assert_allclose(np.asarray(jax.jit(model_u.logits)(params_u, ids, pos, mask)), out, atol=1e-5, rtol=0)
    # packed rows, positions restarting per document: each document equals its own separate torch run
    ids, pos, seg, docs = packed_batch()
    if name == "phi3":
        # longrope picks short/long factors from max(position_ids) over the batch (as transformers does): rows 0-1
        # (documents <= 7 tokens) stay within original_max_position_embeddings (8), like each separate torch run
        ids, pos, seg, docs = ids[:2], pos[:2], seg[:2], [x for x in docs if x[0] < 2]
    out = np.asarray(logits(params, ids, pos, seg))
    for r, start, n, toks in docs:
        np.testing.assert_allclose(out[r, start:start + n], torch_logits(tm, toks[None])[0], atol=ATOL, rtol=0)


def _check_cached_decoding(tm, model, params, P=6, G=6):
    """Prefill ``P`` tokens (rows left-padded by 0, 2, 4), then ``G`` single-token steps: each step's logits equal
    transformers' own cached decoding of the same rows."""
    rng = np.random.default_rng(3)
    ids = rng.integers(1, 97, size=(3, P + G)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # left padding
    mask[2, :4] = 0
    ids[mask == 0] = 0
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    ref = _torch_cached_logits(tm, ids, mask, pos, P)
    prefill, step = jax.jit(model.prefill), jax.jit(model.decode_step)
    cache = model.init_cache(3, P + G, jnp.float32)
    last, cache = prefill(params, cache, ids[:, :P], pos[:, :P], mask[:, :P])
    np.testing.assert_allclose(np.asarray(last), ref[:, 0], atol=ATOL, rtol=0)
    for t in range(P, P + G):
        last, cache = step(params, cache, ids[:, t], pos[:, t])
        np.testing.assert_allclose(np.asarray(last), ref[:, t - P + 1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_kv_cache_decoding_matches_transformers_cached_decoding(name, tmp_path_factory):
    tm, _, model, params = _loaded(name, tmp_path_factory)
    _check_cached_decoding(tm, model, params)  # phi3: the prompt in the short-factor range, decoding past it


def test_sampler_logprobs_carry_the_final_logit_softcap(tmp_path_factory):
    """Greedy generation through trl_jax's sampler = transformers' ``generate``; the sampler's log-probs are those
    of transformers' soft-capped logits (the cap changes them, not the argmax)."""
    from trl_jax.generation.sampler import generate

    tm, _, model, params = _loaded("gemma2", tmp_path_factory)
    assert final_logit_softcapping(model) == 3.0
    prompt = np.random.default_rng(5).integers(1, 97, size=(2, 5)).astype(np.int32)
    N = 6
    with torch.no_grad():
        g = tm.generate(torch.as_tensor(prompt, dtype=torch.long), attention_mask=torch.ones(2, 5, dtype=torch.long),
                        max_new_tokens=N, min_new_tokens=N, do_sample=False, output_logits=True,
                        return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    ref_ids = g.sequences[:, 5:].numpy()
    ref_lp = np.stack([torch.log_softmax(s.float(), -1).numpy() for s in g.logits], 1)
    ref_lp = np.take_along_axis(ref_lp, ref_ids[..., None], -1)[..., 0]
    out = generate(model, params, prompt, np.ones_like(prompt), jax.random.PRNGKey(0), max_new_tokens=N,
                   do_sample=False, pad_token_id=0, eos_token_id=None)
    np.testing.assert_array_equal(np.asarray(out.completion_ids), ref_ids)
    np.testing.assert_allclose(np.asarray(out.logprobs), ref_lp, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_to_transformers_and_config_from_scratch(name, tmp_path):
    tm = make_torch_model(name)
    model, params = from_pretrained(save_torch_model(tm, tmp_path / "src"))
    ids, mask, pos = padded_batch()
    ref = torch_logits(tm, ids, mask, pos)
    # with the checkpoint's config, and with one rebuilt from ModelConfig alone (to_hf_config)
    for out, m in ((tmp_path / "out", model), (tmp_path / "scratch", CausalLM(model.config))):
        save_pretrained(m, params, str(out))
        back = transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
        assert type(back) is type(tm)
        sa, sb = tm.state_dict(), back.state_dict()
        assert set(sa) == set(sb)
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], atol=0, rtol=0, msg=k)
        np.testing.assert_array_equal(torch_logits(back, ids, mask, pos), ref)


@pytest.mark.parametrize("name", NAMES + MOE)  # MoE: Qwen3MoeForSequenceClassification, MixtralFor...
def test_sequence_classification_head_matches_transformers(name, tmp_path):
    tm = make_torch_model(name, kind="seqcls", num_labels=3)
    model, params = from_pretrained(save_torch_model(tm, tmp_path / "src"))
    ids, mask, pos = padded_batch()  # pad_token_id = 0 in both padded rows

    def scores(m):
        with torch.no_grad():
            return m(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask),
                     position_ids=torch.as_tensor(pos, dtype=torch.long)).logits.numpy()

    ref = scores(tm)
    np.testing.assert_allclose(np.asarray(jax.jit(model.sequence_scores)(params, ids, pos, mask)), ref, atol=ATOL,
                               rtol=0)
    save_pretrained(model, params, str(tmp_path / "out"))
    back = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out"),
                                                                         attn_implementation="eager")
    np.testing.assert_array_equal(scores(back.eval()), ref)


# ---------------------------------------------------------------------------------------------------- trainers
@pytest.fixture(scope="module")
def trainer_models(tmp_path_factory):
    """Each family with the built-in character tokenizer's vocabulary, saved with that tokenizer."""
    tok = build_char_tokenizer()
    out = {}
    for name in NAMES + MOE:
        tm = make_torch_model(name, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                              eos_token_id=tok.eos_token_id, bos_token_id=None)
        d = tmp_path_factory.mktemp(f"{name}_chars")
        save_torch_model(randomize_(tm, 1), d)
        tok.save_pretrained(str(d))
        out[name] = (tm, str(d))
    return out


def _digit_reward(completions, **kwargs):
    from trl_jax.rewards import completion_text

    return [float(sum(ch.isdigit() for ch in completion_text(c))) for c in completions]


@pytest.mark.parametrize("name", NAMES + MOE)
def test_sft_and_grpo_train_end_to_end(name, trainer_models, tmp_path, trl_jax_cache):
    from trl_jax.configs import GRPOConfig, SFTConfig
    from trl_jax.data.builtin import load_builtin_dataset
    from trl_jax.data.loading import load_dataset_any
    from trl_jax.trainers import SFTTrainer
    from trl_jax.trainers.base import take_rows
    from trl_jax.trainers.grpo import GRPOTrainer

    tm, path = trainer_models[name]
    common = dict(per_device_train_batch_size=1, max_steps=2, logging_steps=1, save_strategy="no", bf16=False,
                  gradient_checkpointing=False, disable_tqdm=True, report_to="none", learning_rate=3e-3)
    sft = SFTTrainer(path, args=SFTConfig(output_dir=str(tmp_path / "sft"), max_length=40, **common),
                     train_dataset=load_dataset_any("builtin:arithmetic_sft").select(range(24)))
    # the trainer's loss (fused log-probs, soft-capped where the model is; plus coef * the load-balancing loss for
    # mixtures of experts, TRL's default) on a batch = transformers' loss
    batch = sft._make_batch(take_rows(sft.train_dataset, [0, 1]), 2)
    terms = sft.loss_fn(sft.params, {k: jnp.asarray(v) for k, v in batch.items()}, None)
    moe = {"output_router_logits": True} if name in MOE else {}
    with torch.no_grad():
        labels = torch.as_tensor(np.where(batch["attention_mask"] == 1, batch["labels"], -100), dtype=torch.long)
        ref = tm(input_ids=torch.as_tensor(batch["input_ids"], dtype=torch.long),
                 attention_mask=torch.as_tensor(batch["attention_mask"]),
                 position_ids=torch.as_tensor(batch["position_ids"], dtype=torch.long), labels=labels, **moe)
    if moe:
        assert float(terms.metrics["aux_loss"]) == pytest.approx(float(ref.aux_loss), abs=1e-5)
    ref = ref.loss.item()
    assert float(terms.numerator / terms.denominator) == pytest.approx(ref, abs=1e-4)
    if name not in TRAINED:  # one SFT + GRPO run per family keeps the suite short; the loss check runs for all
        return
    sft.train()
    losses = [r["loss"] for r in sft.log_history if "loss" in r]
    assert len(losses) == 2 and np.all(np.isfinite(losses)) and len(set(losses)) > 1

    grpo = GRPOTrainer(path, reward_funcs=_digit_reward, train_dataset=load_builtin_dataset(
        "arithmetic_prompts").select(range(8)), args=GRPOConfig(
        output_dir=str(tmp_path / "grpo"), num_generations=4, max_completion_length=5, temperature=0.9, seed=3,
        **dict(common, max_steps=2)))
    before = jax.tree.map(np.asarray, grpo.params)
    grpo.train()
    logs = [r for r in grpo.log_history if "loss" in r]
    assert len(logs) == 2 and all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in logs)
    if name in MOE:  # TRL's default for mixture-of-experts models: coef * load-balancing loss in the loss
        assert all(np.isfinite(r["aux_loss"]) and r["aux_loss"] > 0 for r in logs)
        assert all(np.isfinite(r["aux_loss"]) for r in sft.log_history if "loss" in r)
    after = jax.tree.leaves(jax.tree.map(np.asarray, grpo.state.params))
    assert any(np.abs(a - b).max() > 0 for a, b in zip(jax.tree.leaves(before), after))


@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_preference_losses_add_the_moe_load_balancing_loss_as_trl(kind, trainer_models, tmp_path):
    """DPO and KTO on Qwen3-MoE: TRL's ``loss + router_aux_loss_coef * aux_loss`` with ``aux_loss`` transformers'
    load-balancing loss of the policy forward (chosen and rejected rows as one batch for DPO; the completion rows,
    not the KL rows, for KTO), logged as ``aux_loss``. ``router_aux_loss_coef`` set in the config replaces the
    checkpoint's (0 turns it off); set on a dense model it is an error, as in TRL."""
    from trl_jax.configs import DPOConfig, KTOConfig
    from trl_jax.data.formats import unpair_preference_dataset
    from trl_jax.data.loading import load_dataset_any
    from trl_jax.trainers import DPOTrainer, KTOTrainer
    from trl_jax.trainers.base import take_rows

    tm, path = trainer_models["qwen3_moe"]
    rows = load_dataset_any("builtin:arithmetic_preference").select(range(8))
    cls, cfg = (DPOTrainer, DPOConfig) if kind == "dpo" else (KTOTrainer, KTOConfig)
    data = rows if kind == "dpo" else unpair_preference_dataset(rows)
    common = dict(per_device_train_batch_size=4, max_length=48, save_strategy="no", bf16=False, report_to="none",
                  disable_tqdm=True)

    def loss_and_batch(coef):
        tr = cls(path, args=cfg(output_dir=str(tmp_path / f"{kind}{coef}"), router_aux_loss_coef=coef, **common),
                 train_dataset=data)
        batch = {k: jnp.asarray(v) for k, v in tr._make_batch(take_rows(tr.train_dataset, [0, 1, 2, 3]), 4).items()}
        return tr, batch, jax.jit(tr.loss_fn)(tr.params, batch, None, ref_params=tr.params)  # one program

    tr, batch, terms = loss_and_batch(None)
    assert tr.router_aux_loss_coef == pytest.approx(tm.config.router_aux_loss_coef) and tr.router_aux_loss_coef > 0
    _, _, off = loss_and_batch(0.0)
    _, _, half = loss_and_batch(0.5)
    assert "aux_loss" not in off.metrics
    if kind == "dpo":  # the policy forward: chosen rows then rejected rows
        ids = np.concatenate([batch["input_ids"][:, 0], batch["input_ids"][:, 1]])
        mask = np.concatenate([batch["attention_mask"][:, 0], batch["attention_mask"][:, 1]])
    else:
        ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        ref = tm(input_ids=torch.as_tensor(np.asarray(ids), dtype=torch.long),
                 attention_mask=torch.as_tensor(np.asarray(mask)), output_router_logits=True).aux_loss.item()
    assert float(terms.metrics["aux_loss"]) == pytest.approx(ref, abs=1e-5)
    for t, coef in ((terms, tm.config.router_aux_loss_coef), (half, 0.5)):
        assert float(t.loss) == pytest.approx(float(off.loss) + coef * ref, abs=1e-5)
    with pytest.raises(ValueError, match="not a mixture-of-experts model"):
        cls(trainer_models["phi3"][1], args=cfg(output_dir=str(tmp_path / "dense"), router_aux_loss_coef=0.5,
                                                **common), train_dataset=data)


def test_splash_soft_capped_attention_equals_xla(monkeypatch):
    """Gemma 2's attention soft-cap in the Pallas splash kernel (interpreted on CPU) = XLA attention's, with
    padding, packing, GQA and a window; cuDNN cannot soft-cap, so ``cudnn`` calls with a cap run on XLA."""
    from trl_jax.models import attention as A

    monkeypatch.setattr(A, "SPLASH_INTERPRET", True)
    b, t, n, k, h, cap, window = 2, 128, 4, 2, 16, 0.8, 37
    rng = np.random.default_rng(0)
    q, kk, v = (jnp.asarray(rng.normal(size=(b, t, m, h)), jnp.float32) for m in (n, k, k))
    seg = np.ones((b, t), np.int32)
    seg[0, :20] = 0
    seg[1, 50:] = 2
    seg[1, 120:] = 0
    slots = jnp.arange(t, dtype=jnp.int32)
    mask = A.build_mask(slots, slots, jnp.asarray(seg), jnp.asarray(seg)) & A.window_mask(slots, slots, window)
    ref = A.xla_attention(q, kk, v, mask, scale=h**-0.5, softcap=cap)
    assert np.abs(np.asarray(ref - A.xla_attention(q, kk, v, mask, scale=h**-0.5))).max() > 1e-2  # the cap bites
    got = A.attend(q, kk, v, mask, scale=h**-0.5, impl="splash", segment_ids=jnp.asarray(seg), window=window,
                   softcap=cap)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(np.asarray(A.attend(q, kk, v, mask, scale=h**-0.5, impl="cudnn", softcap=cap)),
                                  np.asarray(ref))


def test_sharded_load_onto_8_device_mesh(tmp_path_factory):
    """Gemma 3 (sandwich norms, qk-norm, two RoPE tables) and Phi-3 (fused projections split on load) placed on a
    (fsdp 2, tensor 4) mesh: the q kernel sharded, logits as transformers'."""
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    ids, mask, pos = padded_batch()
    for name in ("gemma3_text", "phi3"):
        tm, d, _, _ = _loaded(name, tmp_path_factory)
        model, params = from_pretrained(d, mesh=mesh)
        q = params["layers"]["self_attn"]["q_proj"]["kernel"]  # (layers, embed, heads, head_dim)
        assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
        out = np.asarray(jax.jit(model.logits)(params, ids, pos, mask))
        assert np.abs(out - torch_logits(tm, ids, mask, pos))[mask.astype(bool)].max() <= ATOL


# ---------------------------------------------------------------------------------------------- mixtures of experts


@pytest.mark.parametrize("name", MOE)
def test_moe_logits_cache_round_trip_and_aux_loss_match_transformers(name, tmp_path_factory):
    """Dense dispatch = transformers' routed experts (top-2 of 4, each family's renormalization rule): padded and
    packed logits, scanned = unrolled, cached decoding, save round trip, and the load-balancing loss equal to
    transformers' ``aux_loss`` (``output_router_logits=True``, padding masked)."""
    from trl_jax.models import router_aux_loss

    tm, d, model, params = _loaded(name, tmp_path_factory)
    width = 24 if name == "qwen3_moe" else 64  # moe_intermediate_size / Mixtral's intermediate_size
    assert params["layers"]["mlp"]["gate_proj"]["kernel"].shape == (2, 32, 4, width)
    ids, mask, pos = padded_batch()
    ref = torch_logits(tm, ids, mask, pos)
    out = np.asarray(jax.jit(model.logits)(params, ids, pos, mask))
    assert np.abs(out - ref)[mask.astype(bool)].max() <= ATOL
    model_u, params_u = from_pretrained(d, scan_layers=False)
    np.testing.assert_allclose(np.asarray(jax.jit(model_u.logits)(params_u, ids, pos, mask)), out, atol=1e-5, rtol=0)
    pids, ppos, pseg, docs = packed_batch()
    pout = np.asarray(jax.jit(model.logits)(params, pids, ppos, pseg))
    for r, start, n, toks in docs:
        np.testing.assert_allclose(pout[r, start:start + n], torch_logits(tm, toks[None])[0], atol=ATOL, rtol=0)
    # load-balancing loss: transformers' load_balancing_loss_func over its router logits, padding excluded
    with torch.no_grad():
        r = tm(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask),
               position_ids=torch.as_tensor(pos, dtype=torch.long), output_router_logits=True)
    for m, p in ((model, params), (model_u, params_u)):
        logits = jax.jit(m.router_logits)(p, ids, pos, mask)
        assert logits.shape == (2, 3, 12, 4)
        aux = router_aux_loss(logits, model.config.num_experts_per_tok, mask)
        assert float(aux) == pytest.approx(float(r.aux_loss), abs=1e-5)
    _check_cached_decoding(tm, model, params)
    # save -> transformers: per-expert tensors, identical weights and logits
    out_dir = tmp_path_factory.mktemp(f"{name}_out")
    save_pretrained(CausalLM(model.config), params, str(out_dir))  # config rebuilt by to_hf_config
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out_dir), attn_implementation="eager").eval()
    sa, sb = tm.state_dict(), back.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=0, rtol=0, msg=k)
    np.testing.assert_array_equal(torch_logits(back, ids, mask, pos), ref)


def test_moe_expert_weights_shard_over_an_expert_mesh_axis(tmp_path_factory):
    """The ``expert`` logical axis maps to a mesh axis of the same name: experts split over it, logits unchanged."""
    tm, d, _, _ = _loaded("qwen3_moe", tmp_path_factory)
    mesh = jax.make_mesh((2, 2, 2), ("fsdp", "expert", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    model, params = from_pretrained(d, mesh=mesh)
    up = params["layers"]["mlp"]["up_proj"]["kernel"]  # (layers, embed, expert, mlp)
    assert up.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "expert", "tensor")
    down = params["layers"]["mlp"]["down_proj"]["kernel"]  # (layers, expert, mlp, embed)
    assert down.sharding.spec == jax.sharding.PartitionSpec(None, "expert", "tensor", "fsdp")
    ids, mask, pos = padded_batch()
    out = np.asarray(jax.jit(model.logits)(params, ids, pos, mask))
    assert np.abs(out - torch_logits(tm, ids, mask, pos))[mask.astype(bool)].max() <= ATOL


@pytest.mark.parametrize("name,targets", [("gemma2", "all-linear"), ("qwen3_moe", ["q_proj", "v_proj"])])
def test_peft_lora_adapters_give_peft_logits(name, targets, tmp_path_factory):
    """LoRA through ``_dense`` on the new layers: a random PEFT adapter loads with PEFT's logits (Gemma 2's every
    projection; Qwen3-MoE's attention)."""
    import peft

    from trl_jax.models.peft_io import load_adapter

    tm, d, model, params = _loaded(name, tmp_path_factory)
    torch.manual_seed(0)
    pm = peft.get_peft_model(make_torch_model(name), peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM", target_modules=targets)).eval()
    adapter = tmp_path_factory.mktemp(f"{name}_lora")
    pm.save_pretrained(str(adapter))
    ids, mask, pos = padded_batch()
    lmodel, lparams = load_adapter(adapter, model, params)
    got = np.asarray(jax.jit(lmodel.logits)(lparams, ids, pos, mask))
    assert np.abs(got - torch_logits(pm, ids, mask, pos))[mask.astype(bool)].max() <= ATOL
