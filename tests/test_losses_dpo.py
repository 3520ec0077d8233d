"""trl_jax.losses.dpo against TRL 1.16's own ``DPOTrainer._compute_loss``.

TRL is driven on a stand-in trainer (``DPOTrainer.__new__`` plus the attributes ``_compute_loss`` reads) whose
policy and reference "models" return a fixed ``FusedCausalLMOutput`` — the per-token log-probs, entropy, mean
logits, top-1 flags and ``log Σ p²`` that TRL's fused LM head would return. The same arrays go through our
``dpo_loss_terms_from_token_logps``; loss, every logged metric and the gradient w.r.t. the policy per-token
log-probs (torch autograd vs ``jax.grad``) must agree to 1e-5.
"""

from __future__ import annotations

import functools
import re
import types
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.utils import FusedCausalLMOutput

from trl_jax.losses.base import LossTerms
from trl_jax.losses.dpo import (
    LOSS_TYPES,
    DPOInputs,
    DPOTokenInputs,
    dpo_loss,
    dpo_loss_from_token_logps,
    dpo_loss_terms,
    dpo_loss_terms_from_token_logps,
    wpo_weights,
)

B, T = 4, 10  # pairs, sequence length (per-token arrays are T - 1 long)
TOL = dict(rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------------------------


def make_batch(seed: int = 0, empty_prompt_row: bool = True):
    """A [chosen; rejected] batch of 2B sequences as TRL's collator lays it out, plus fused-head outputs."""
    rng = np.random.RandomState(seed)
    completion_mask = np.zeros((2 * B, T), np.int64)
    attention_mask = np.zeros((2 * B, T), np.int64)
    for i in range(B):
        prompt = 0 if (empty_prompt_row and i == 1) else rng.randint(1, 4)
        for row in (i, B + i):  # chosen and rejected share the prompt, differ in completion length
            comp = rng.randint(1, T - prompt + 1)
            completion_mask[row, prompt : prompt + comp] = 1
            attention_mask[row, : prompt + comp] = 1
    shift = completion_mask[:, 1:].astype(bool)
    L = T - 1

    def per_token(x):
        return np.where(shift, x, 0.0).astype(np.float32)

    policy = -rng.uniform(0.05, 2.5, (2 * B, L))
    return dict(
        completion_mask=completion_mask,
        attention_mask=attention_mask,
        input_ids=rng.randint(0, 50, (2 * B, T)),
        shift=shift,
        policy=per_token(policy),
        ref=per_token(policy + rng.normal(0.0, 0.4, (2 * B, L))),
        # log Σ p² ≥ log p for the label token's p; keep the WPO weights in a sane range
        log_sum_sq=per_token(np.minimum(policy + rng.uniform(0.0, 1.0, (2 * B, L)), 0.0)),
        entropy=per_token(rng.uniform(0.0, 4.0, (2 * B, L))),
        mean_logits=per_token(rng.normal(0.0, 2.0, (2 * B, L))),
        is_top1=shift & (rng.uniform(size=(2 * B, L)) < 0.4),
        # precomputed reference sums (TRL's precompute_ref_log_probs columns)
        ref_chosen_logps=rng.normal(-8.0, 3.0, B).astype(np.float32),
        ref_rejected_logps=rng.normal(-8.0, 3.0, B).astype(np.float32),
    )


# ------------------------------------------------------------------------------------------------------------------
# TRL side: its own _compute_loss on a stand-in trainer
# ------------------------------------------------------------------------------------------------------------------


class _FixedModel(torch.nn.Module):  # a Module: accelerate inspects it when peft is installed
    """Returns a fixed fused-head output, whatever the inputs (TRL computes everything else itself)."""

    training = True
    is_gradient_checkpointing = False

    def __init__(self, output):
        super().__init__()
        self.output = output

    def __call__(self, **kwargs):
        assert "labels" in kwargs and kwargs.get("fused_lm_head") is True
        return self.output


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    @staticmethod
    def gather_for_metrics(x):
        return x


def trl_dpo(batch, cfg, precompute_ref=False):
    """Loss, metrics and d loss / d policy per-token log-probs ([2B, T-1]) from TRL's ``_compute_loss``."""
    loss_types = cfg.get("loss_type", "sigmoid")
    loss_types = [loss_types] if isinstance(loss_types, str) else list(loss_types)
    trainer = DPOTrainer.__new__(DPOTrainer)
    trainer.beta = cfg.get("beta", 0.1)
    trainer.loss_types = loss_types
    trainer.loss_weights = cfg.get("loss_weights") or [1.0] * len(loss_types)
    trainer.ld_alpha = cfg.get("ld_alpha")
    trainer.f_divergence_type = cfg.get("f_divergence_type", "reverse_kl")
    trainer.f_alpha_divergence_coef = cfg.get("f_alpha_divergence_coef", 0.5)
    trainer.label_smoothing = cfg.get("label_smoothing", 0.0)
    trainer.use_weighting = cfg.get("use_weighting", False)
    trainer.precompute_ref_logps = precompute_ref
    trainer.aux_loss_enabled = False
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    trainer.accelerator = _Accelerator()
    trainer.args = types.SimpleNamespace(
        discopop_tau=cfg.get("discopop_tau", 0.05), gradient_checkpointing_kwargs=None
    )

    shift = torch.tensor(batch["shift"])
    leaf = torch.tensor(batch["policy"], requires_grad=True)
    trainer.model = _FixedModel(
        FusedCausalLMOutput(
            log_probs=leaf.masked_fill(~shift, 0.0),  # the fused head's masked_fill: no gradient off the mask
            entropy=torch.tensor(batch["entropy"]),
            log_sum_sq_probs=torch.tensor(batch["log_sum_sq"]),
            mean_logits=torch.tensor(batch["mean_logits"]),
            is_top1=torch.tensor(batch["is_top1"]),
            label_mask=shift,
        )
    )
    ref_output = FusedCausalLMOutput(log_probs=torch.tensor(batch["ref"]))
    trainer.ref_model = None if precompute_ref else _FixedModel(ref_output)
    inputs = {
        "input_ids": torch.tensor(batch["input_ids"]),
        "attention_mask": torch.tensor(batch["attention_mask"]),
        "completion_mask": torch.tensor(batch["completion_mask"]),
    }
    if precompute_ref:
        inputs["ref_chosen_logps"] = torch.tensor(batch["ref_chosen_logps"])
        inputs["ref_rejected_logps"] = torch.tensor(batch["ref_rejected_logps"])
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k != "num_tokens"}
    return loss.item(), metrics, leaf.grad.numpy()


# ------------------------------------------------------------------------------------------------------------------
# Our side
# ------------------------------------------------------------------------------------------------------------------


def our_tokens(batch, precompute_ref=False, explicit_lengths=True):
    c, r = slice(0, B), slice(B, 2 * B)
    lengths = batch["completion_mask"].sum(1).astype(np.float32)  # TRL's unshifted completion_mask.sum(-1)
    return DPOTokenInputs(
        chosen_token_logps=jnp.asarray(batch["policy"][c]),
        rejected_token_logps=jnp.asarray(batch["policy"][r]),
        chosen_mask=jnp.asarray(batch["shift"][c]),
        rejected_mask=jnp.asarray(batch["shift"][r]),
        ref_chosen_token_logps=None if precompute_ref else jnp.asarray(batch["ref"][c]),
        ref_rejected_token_logps=None if precompute_ref else jnp.asarray(batch["ref"][r]),
        ref_chosen_logps=jnp.asarray(batch["ref_chosen_logps"]) if precompute_ref else None,
        ref_rejected_logps=jnp.asarray(batch["ref_rejected_logps"]) if precompute_ref else None,
        chosen_lengths=jnp.asarray(lengths[c]) if explicit_lengths else None,
        rejected_lengths=jnp.asarray(lengths[r]) if explicit_lengths else None,
        chosen_log_sum_sq_probs=jnp.asarray(batch["log_sum_sq"][c]),
        rejected_log_sum_sq_probs=jnp.asarray(batch["log_sum_sq"][r]),
        chosen_entropy=jnp.asarray(batch["entropy"][c]),
        rejected_entropy=jnp.asarray(batch["entropy"][r]),
        chosen_mean_logits=jnp.asarray(batch["mean_logits"][c]),
        rejected_mean_logits=jnp.asarray(batch["mean_logits"][r]),
        chosen_is_top1=jnp.asarray(batch["is_top1"][c]),
    )


def ours_dpo(tokens, cfg):
    """Jitted loss, metrics and gradient w.r.t. the policy per-token log-probs, stacked [chosen; rejected]."""
    cfg = dict(cfg)

    def loss_fn(policy_c, policy_r, tokens):
        t = tokens._replace(chosen_token_logps=policy_c, rejected_token_logps=policy_r)
        terms = dpo_loss_terms_from_token_logps(t, **cfg)
        return terms.loss, terms.metrics

    fn = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))
    (loss, metrics), (g_c, g_r) = fn(tokens.chosen_token_logps, tokens.rejected_token_logps, tokens)
    return float(loss), {k: float(v) for k, v in metrics.items()}, np.concatenate([g_c, g_r], 0)


def assert_matches(batch, cfg, precompute_ref=False, explicit_lengths=True):
    trl_loss, trl_metrics, trl_grad = trl_dpo(batch, cfg, precompute_ref)
    loss, metrics, grad = ours_dpo(our_tokens(batch, precompute_ref, explicit_lengths), cfg)
    assert np.isfinite(trl_loss)
    np.testing.assert_allclose(loss, trl_loss, **TOL)
    assert set(metrics) == set(trl_metrics), (sorted(metrics), sorted(trl_metrics))
    for k in trl_metrics:
        np.testing.assert_allclose(metrics[k], trl_metrics[k], err_msg=k, **TOL)
    np.testing.assert_allclose(grad, trl_grad, **TOL)
    assert np.abs(trl_grad).sum() > 0  # the comparison is not vacuous


# ------------------------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------------------------

_SMOOTHING = {"exo_pair": 1e-3, "robust": 0.1}
SINGLE = [dict(loss_type=t, label_smoothing=_SMOOTHING.get(t, 0.0)) for t in LOSS_TYPES]

F_DIV_LOSSES = ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"]
F_DIVS = [
    dict(f_divergence_type="forward_kl"),
    dict(f_divergence_type="js_divergence"),
    dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.5),
    dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0),  # limit case -> reverse KL
]
F_DIV_CASES = [
    dict(loss_type=t, label_smoothing=_SMOOTHING.get(t, 0.0), **f) for t in F_DIV_LOSSES for f in F_DIVS[:2]
] + [dict(loss_type=["sigmoid", "ipo", "hinge"], **f) for f in F_DIVS[2:]]

OPTION_CASES = [
    dict(loss_type="sigmoid", beta=0.5),
    dict(loss_type="ipo", beta=0.7),
    dict(loss_type="hinge", beta=2.0),
    dict(loss_type="sppo_hard", beta=0.3),
    dict(loss_type="discopop", discopop_tau=0.3, beta=0.3),
    dict(loss_type="aot", label_smoothing=0.2),
    dict(loss_type="aot_unpaired", label_smoothing=0.2),
    dict(loss_type="robust", label_smoothing=0.3),
    dict(loss_type="exo_pair", label_smoothing=0.2),
    # LD-DPO
    dict(loss_type="sigmoid", ld_alpha=0.5),
    dict(loss_type="sigmoid", ld_alpha=0.0),
    dict(loss_type=["ipo", "sft"], ld_alpha=0.3),
    # WPO
    dict(loss_type="sigmoid", use_weighting=True),
    dict(loss_type="ipo", use_weighting=True),
    dict(loss_type=["bco_pair", "apo_zero", "apo_down", "nca_pair"], use_weighting=True, ld_alpha=0.5),
    # several losses at once (MPO: sigmoid + bco_pair + sft)
    dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    dict(loss_type=["sigmoid", "aot", "sigmoid_norm", "sppo_hard"]),
    dict(loss_type=["robust", "exo_pair"], loss_weights=[0.5, 2.0], label_smoothing=0.1),
]


def _id(cfg):
    return "-".join(f"{k}={v}" for k, v in cfg.items()).replace(" ", "")


@pytest.fixture(scope="module")
def batch():
    return make_batch(0)


@pytest.mark.parametrize("cfg", SINGLE + F_DIV_CASES + OPTION_CASES, ids=_id)
def test_matches_trl(batch, cfg):
    assert_matches(batch, cfg)


@pytest.mark.parametrize(
    "cfg",
    [dict(loss_type="sigmoid"), dict(loss_type="sigmoid", ld_alpha=0.5), dict(loss_type="ipo", use_weighting=True)],
    ids=_id,
)
def test_matches_trl_precomputed_reference(batch, cfg):
    assert_matches(batch, cfg, precompute_ref=True)


@pytest.mark.parametrize("cfg", [dict(loss_type="ipo"), dict(loss_type="sigmoid_norm")], ids=_id)
def test_default_lengths_match_trl_when_prompts_are_nonempty(cfg):
    assert_matches(make_batch(1, empty_prompt_row=False), cfg, explicit_lengths=False)


def test_sft_with_wpo_weighting(batch):
    """TRL 1.16 crashes here (in-place multiply of the expanded SFT loss); we apply the weights as for any loss."""
    with pytest.raises(RuntimeError, match="more than one element"):
        trl_dpo(batch, dict(loss_type="sft", use_weighting=True))
    tokens = our_tokens(batch)
    weighted, _ = dpo_loss_from_token_logps(tokens, loss_type="sft", use_weighting=True)
    plain, _ = dpo_loss_from_token_logps(tokens, loss_type="sft")
    # the pair weights, checked against TRL by the sigmoid/ipo/bco_pair use_weighting cases above
    w = wpo_weights(tokens.chosen_token_logps, tokens.chosen_log_sum_sq_probs, tokens.chosen_mask) * wpo_weights(
        tokens.rejected_token_logps, tokens.rejected_log_sum_sq_probs, tokens.rejected_mask
    )
    np.testing.assert_allclose(weighted, plain * jnp.mean(w), rtol=1e-6)
    np.testing.assert_allclose(plain, trl_dpo(batch, dict(loss_type="sft"))[0], **TOL)


def test_other_seed_all_losses_weighted(batch):
    cfg = dict(loss_type=[t for t in LOSS_TYPES if t not in ("aot", "aot_unpaired")], label_smoothing=0.01)
    cfg["loss_weights"] = [0.1 * (k + 1) for k in range(len(cfg["loss_type"]))]
    assert_matches(make_batch(7), cfg)


# ------------------------------------------------------------------------------------------------------------------
# Accepted values and errors
# ------------------------------------------------------------------------------------------------------------------


def test_loss_types_are_trls(batch):
    with pytest.raises(ValueError) as trl_err:
        trl_dpo(batch, dict(loss_type="bogus"))
    trl_types = re.findall(r"'(\w+)'", str(trl_err.value).split("Should be one of")[1])
    assert sorted(trl_types) == sorted(LOSS_TYPES)
    with pytest.raises(ValueError, match="Accepted loss types.*sigmoid_norm"):
        dpo_loss_terms_from_token_logps(our_tokens(batch), loss_type="bogus")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss_type="bco_pair", f_divergence_type="forward_kl"), "only supported for the loss types"),
        (dict(loss_type="sigmoid", f_divergence_type="chi2"), "Unknown f_divergence_type"),
        (dict(loss_type="exo_pair"), "label_smoothing"),
        (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "same length"),
        (dict(loss_type=[]), "empty"),
    ],
)
def test_config_errors(batch, kwargs, match):
    with pytest.raises(ValueError, match=match):
        dpo_loss_terms_from_token_logps(our_tokens(batch), **kwargs)


def test_weighting_with_sorting_losses_is_rejected(batch):
    with pytest.raises(ValueError, match="aot"):
        dpo_loss_terms_from_token_logps(our_tokens(batch), loss_type="aot", use_weighting=True)


def test_missing_inputs_are_named():
    x = jnp.zeros(B)
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss_terms(DPOInputs(x, x, x, x), loss_type="ipo")
    with pytest.raises(ValueError, match="chosen_nll"):
        dpo_loss_terms(DPOInputs(x, x, x, x), loss_type="sft")
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        dpo_loss_terms(DPOInputs(x, x, x, jnp.zeros(B + 1)))


# ------------------------------------------------------------------------------------------------------------------
# Sequence-level API, accumulation, online-DPO use
# ------------------------------------------------------------------------------------------------------------------


def test_sequence_api_matches_token_api(batch):
    tokens = our_tokens(batch)
    cm, rm = tokens.chosen_mask, tokens.rejected_mask
    inputs = DPOInputs(
        chosen_logps=(tokens.chosen_token_logps * cm).sum(-1),
        rejected_logps=(tokens.rejected_token_logps * rm).sum(-1),
        ref_chosen_logps=(tokens.ref_chosen_token_logps * cm).sum(-1),
        ref_rejected_logps=(tokens.ref_rejected_token_logps * rm).sum(-1),
        chosen_lengths=tokens.chosen_lengths,
        rejected_lengths=tokens.rejected_lengths,
    )
    cfg = dict(loss_type=["sigmoid", "ipo"], beta=0.2)
    loss, metrics = dpo_loss(inputs, **cfg)
    ref_loss, ref_metrics = dpo_loss_from_token_logps(tokens, **cfg)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for k, v in metrics.items():
        np.testing.assert_allclose(v, ref_metrics[k], rtol=1e-6)
    trl_loss, trl_metrics, _ = trl_dpo(batch, cfg)
    np.testing.assert_allclose(loss, trl_loss, **TOL)


def test_micro_batches_accumulate_exactly():
    rng = np.random.RandomState(3)
    vec = lambda loc: jnp.asarray(rng.normal(loc, 2.0, 8), jnp.float32)  # noqa: E731
    inputs = DPOInputs(vec(-10), vec(-12), vec(-11), vec(-11), jnp.arange(1.0, 9.0), jnp.arange(8.0, 0.0, -1.0))
    cfg = dict(loss_type=["sigmoid", "ipo", "bco_pair"], loss_weights=[1.0, 0.5, 0.2])
    full = dpo_loss_terms(inputs, **cfg)
    halves = [dpo_loss_terms(jax.tree.map(lambda x, s=s: x[s], inputs), **cfg) for s in (slice(0, 3), slice(3, 8))]
    assert isinstance(full, LossTerms) and float(full.denominator) == 8.0
    accumulated = sum(h.numerator for h in halves) / sum(h.denominator for h in halves)
    np.testing.assert_allclose(accumulated, full.loss, rtol=1e-6)


def test_jit_with_static_config_and_bf16_inputs():
    x = jnp.asarray([-3.0, -5.0], jnp.bfloat16)
    inputs = DPOInputs(x, x - 1, x + 0.5, x, jnp.ones(2), jnp.ones(2))
    f = jax.jit(functools.partial(dpo_loss, loss_type="ipo", beta=0.1))
    loss, metrics = f(inputs)
    assert loss.dtype == jnp.float32 and metrics["rewards/margins"].dtype == jnp.float32
    # unit lengths: online DPO's un-normalized IPO, ((Δc - Δr) - 1/(2β))², Δc - Δr = -0.5 - (-1) = 0.5 here
    np.testing.assert_allclose(loss, (0.5 - 5.0) ** 2, rtol=1e-6)
    # beta as a traced argument (a beta schedule) compiles once and gives the static-beta result
    g = jax.jit(lambda inputs, beta: dpo_loss(inputs, loss_type=["sigmoid", "ipo"], beta=beta)[0])
    for beta in (0.1, 0.3):
        static = dpo_loss(inputs, loss_type=["sigmoid", "ipo"], beta=beta)[0]
        np.testing.assert_allclose(g(inputs, jnp.float32(beta)), static, rtol=1e-6)


@pytest.mark.parametrize("loss_type", [["sigmoid"], ["ipo", "sft"], ["aot"], ["bco_pair"]])
def test_example_mask_drops_padding_pairs(loss_type):
    """A fixed-shape batch padded with dummy pairs (example_mask 0) gives the unpadded batch's loss and metrics."""
    rng = np.random.default_rng(5)
    real = DPOInputs(*[jnp.asarray(rng.normal(size=6).astype(np.float32) - 5) for _ in range(4)],
                     chosen_lengths=jnp.full(6, 3.0), rejected_lengths=jnp.full(6, 4.0),
                     chosen_nll=jnp.asarray(rng.random(6).astype(np.float32)), chosen_token_counts=jnp.full(6, 3.0))
    padded = DPOInputs(*[jnp.concatenate([x, jnp.zeros(2)]) if x is not None else None for x in real])
    mask = jnp.array([1, 1, 1, 1, 1, 1, 0, 0])
    ref = dpo_loss_terms(real, beta=0.2, loss_type=loss_type)
    got = dpo_loss_terms(padded, beta=0.2, loss_type=loss_type, example_mask=mask)
    np.testing.assert_allclose(float(got.loss), float(ref.loss), rtol=1e-6)
    assert float(got.denominator) == 6.0
    for k, v in ref.metrics.items():
        np.testing.assert_allclose(float(got.metrics[k]), float(v), rtol=1e-6, atol=1e-7, err_msg=k)


def _pad_pairs(tokens: DPOTokenInputs, n_pad: int) -> DPOTokenInputs:
    """Append ``n_pad`` padding pairs that carry tokens (copies of the first pairs): only example_mask removes them."""
    return DPOTokenInputs(
        *[None if x is None else jnp.concatenate([x, x[:n_pad]], 0) for x in tokens]
    )


@pytest.mark.parametrize(
    "cfg",
    [dict(loss_type="sft"), dict(loss_type=["sigmoid", "sft"], loss_weights=[0.8, 1.0]), dict(loss_type="ipo")],
    ids=_id,
)
def test_example_mask_padding_pairs_with_tokens_match_trl(batch, cfg):
    """Padding pairs that carry tokens (a fixed-shape batch filled with repeats) are left out of every term,
    the ``sft`` NLL and its token count included: the padded batch's loss and metrics equal TRL's on the real one."""
    trl_loss, trl_metrics, _ = trl_dpo(batch, cfg)
    padded = _pad_pairs(our_tokens(batch), 3)
    mask = jnp.array([1] * B + [0] * 3)
    terms = jax.jit(lambda t, m: dpo_loss_terms_from_token_logps(t, example_mask=m, **cfg))(padded, mask)
    np.testing.assert_allclose(float(terms.loss), trl_loss, **TOL)
    assert float(terms.denominator) == B
    for k in trl_metrics:
        np.testing.assert_allclose(float(terms.metrics[k]), trl_metrics[k], err_msg=k, **TOL)
    # without the mask, the padding pairs do change the sft term (the comparison is not vacuous)
    unmasked = dpo_loss_terms_from_token_logps(padded, **cfg)
    if "sft" in str(cfg["loss_type"]):
        assert abs(float(unmasked.loss) - trl_loss) > 1e-3
