"""trl_jax.losses.sft against TRL 1.16's own ``SFTTrainer.compute_loss``.

TRL side: ``SFTTrainer.compute_loss`` runs on a stand-in trainer object with a tiny torch "model" whose backbone
returns fixed hidden states (a parameter) and whose LM head is the identity, patched with TRL's own
``add_fused_lm_head`` exactly as ``SFTTrainer.__init__`` does. So the logits are known arrays and the gradient of
TRL's loss w.r.t. the hidden-state parameter is the gradient w.r.t. the logits. trl_jax side: the same logits,
``jax.nn.log_softmax`` for the per-token inputs, ``sft_loss``, ``jax.grad``.
"""

from __future__ import annotations

import types
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import PretrainedConfig
from trl.trainer.sft_trainer import SFTTrainer
from trl.trainer.utils import add_fused_lm_head

from trl_jax.losses.sft import SFT_LOSS_TYPES, num_tokens_in_batch, sft_loss, shift_labels
from trl_jax.ops.logprobs import fused_log_probs

B, T, V = 4, 9, 13
RTOL, ATOL = 1e-5, 1e-6


class _Backbone(torch.nn.Module):
    def __init__(self, hidden: np.ndarray):
        super().__init__()
        self.hidden = torch.nn.Parameter(torch.tensor(hidden, dtype=torch.float32))

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        assert input_ids.shape == self.hidden.shape[:2]
        return types.SimpleNamespace(last_hidden_state=self.hidden)


class _StandInLM(torch.nn.Module):
    """Causal LM whose logits are a fixed ``[B, T, V]`` parameter (identity LM head)."""

    is_gradient_checkpointing = False

    def __init__(self, logits: np.ndarray, lm_head_weight: np.ndarray | None = None):
        """``logits [B, T, V]`` with an identity head; or hidden states ``[B, T, D]`` and a ``[V, D]`` head."""
        super().__init__()
        self.config = PretrainedConfig()
        self.base_model = _Backbone(logits)
        identity = lm_head_weight is None
        weight = np.eye(logits.shape[-1], dtype=np.float32) if identity else lm_head_weight
        self.lm_head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.tensor(weight))
        self.lm_head.weight.requires_grad_(not identity)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, *args, **kwargs):  # replaced by add_fused_lm_head
        raise NotImplementedError


def _make_batch(seed: int, all_masked: bool = False):
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(0, V, size=(B, T))
    lengths = rng.integers(T // 2, T + 1, size=B)
    prompt = rng.integers(1, 4, size=B)
    pos = np.arange(T)[None, :]
    attention_mask = (pos < lengths[:, None]).astype(np.int64)
    labels = np.where((pos >= prompt[:, None]) & (attention_mask == 1), input_ids, -100)
    if all_masked:
        labels[:] = -100
    logits = rng.normal(size=(B, T, V)).astype(np.float32) * 2.0
    return input_ids, attention_mask, labels, logits


def _trl_sft(logits, input_ids, attention_mask, labels, loss_type, num_items_in_batch, lm_head_weight=None):
    model = _StandInLM(logits, lm_head_weight)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # what SFTTrainer.__init__ does
    model.train()
    stub = types.SimpleNamespace(
        model=model,
        aux_loss_enabled=False,
        accelerator=types.SimpleNamespace(parallelism_config=None, gather_for_metrics=lambda x: x, num_processes=1),
        compute_loss_func=None,
        label_smoother=None,
        args=types.SimpleNamespace(loss_type=loss_type, average_tokens_across_devices=True),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        get_tp_size=lambda: 1,
        current_gradient_accumulation_steps=1,
    )
    inputs = {
        "input_ids": torch.tensor(input_ids),
        "attention_mask": torch.tensor(attention_mask),
        "labels": torch.tensor(labels),
    }
    loss = SFTTrainer.compute_loss(stub, model, inputs, num_items_in_batch=num_items_in_batch)
    loss.backward()
    metrics = {k: v[-1] for k, v in stub._metrics["train"].items()}
    if lm_head_weight is not None:
        return loss.item(), metrics, (model.base_model.hidden.grad.numpy(), model.lm_head.weight.grad.numpy())
    return loss.item(), metrics, model.base_model.hidden.grad.numpy()


def _per_token_inputs(logits, targets):
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    logps = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    is_top1 = jnp.argmax(logits, axis=-1) == targets
    return logps, entropy, is_top1


def _ours_sft(logits, labels, loss_type, num_items_in_batch):
    targets, loss_mask = shift_labels(jnp.asarray(labels))

    @jax.jit
    def value_and_grad(logits):
        def f(logits):
            logps, entropy, is_top1 = _per_token_inputs(logits, targets)
            terms = sft_loss(
                logps,
                loss_mask,
                loss_type=loss_type,
                num_items_in_batch=num_items_in_batch,
                per_token_entropy=entropy,
                is_top1=is_top1,
            )
            return terms.loss, terms

        return jax.value_and_grad(f, has_aux=True)(logits)

    (loss, terms), grad = value_and_grad(jnp.asarray(logits))
    return float(loss), {k: float(v) for k, v in terms.metrics.items()}, np.asarray(grad), terms


def _assert_matches(ours, theirs):
    loss, metrics, grad = ours[:3]
    t_loss, t_metrics, t_grad = theirs
    np.testing.assert_allclose(loss, t_loss, rtol=RTOL, atol=ATOL)
    for key in ("entropy", "mean_token_accuracy"):
        np.testing.assert_allclose(metrics[key], t_metrics[key], rtol=RTOL, atol=ATOL, err_msg=key)
    np.testing.assert_allclose(grad, t_grad, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("loss_type", SFT_LOSS_TYPES)
@pytest.mark.parametrize("num_items_in_batch", [None, 37])
def test_sft_loss_metrics_grad_match_trl(loss_type, num_items_in_batch):
    seed = SFT_LOSS_TYPES.index(loss_type) * 2 + (num_items_in_batch is None)
    input_ids, attention_mask, labels, logits = _make_batch(seed=seed)
    theirs = _trl_sft(
        logits, input_ids, attention_mask, labels, loss_type,
        None if num_items_in_batch is None else torch.tensor(num_items_in_batch),
    )
    ours = _ours_sft(logits, labels, loss_type, num_items_in_batch)
    _assert_matches(ours, theirs)
    terms = ours[3]
    # numerator/denominator: denominator is the counted tokens, or the passed global count
    expected_den = (labels[:, 1:] != -100).sum() if num_items_in_batch is None else num_items_in_batch
    assert float(terms.denominator) == expected_den
    assert ours[2].any()  # gradient flows
    # TRL's num_tokens metric (running total, here after one step) is this batch's attention-mask count
    assert int(num_tokens_in_batch(attention_mask=jnp.asarray(attention_mask))) == theirs[1]["num_tokens"]


def test_sft_argmax_ties_follow_first_maximum():
    """mean_token_accuracy with tied logits: TRL counts a target as top-1 only if it is the first maximum."""
    input_ids, attention_mask, labels, logits = _make_batch(seed=3)
    logits = np.round(logits / 2.0).astype(np.float32)  # few distinct values -> many ties
    # make half the targets tied maxima at a non-first index and half the first index
    shifted_max = logits.max(-1)
    for b in range(B):
        for t in range(T - 1):
            if labels[b, t + 1] != -100:
                tied = np.flatnonzero(logits[b, t] == shifted_max[b, t])
                labels[b, t + 1] = tied[(b + t) % len(tied)] if len(tied) else labels[b, t + 1]
    theirs = _trl_sft(logits, input_ids, attention_mask, labels, "nll", None)
    ours = _ours_sft(logits, labels, "nll", None)
    _assert_matches(ours, theirs)
    assert 0.0 < theirs[1]["mean_token_accuracy"] < 1.0


def test_sft_all_masked_gives_zero_loss_no_nan():
    input_ids, attention_mask, labels, logits = _make_batch(seed=5, all_masked=True)
    for loss_type in SFT_LOSS_TYPES:
        theirs = _trl_sft(logits, input_ids, attention_mask, labels, loss_type, None)
        ours = _ours_sft(logits, labels, loss_type, None)
        _assert_matches(ours, theirs)
        loss, metrics, grad, terms = ours
        assert loss == 0.0 and float(terms.denominator) == 0.0
        assert metrics == {"entropy": 0.0, "mean_token_accuracy": 0.0}
        assert np.all(grad == 0.0)


def test_sft_accumulation_equals_global_num_items():
    """sum(numerators)/sum(denominators) over micro-batches == TRL's per-micro-batch losses with the global
    num_items_in_batch, summed (transformers' gradient-accumulation normalisation)."""
    batches = [_make_batch(seed=s) for s in (11, 12)]
    global_items = sum(int((labels[:, 1:] != -100).sum()) for _, _, labels, _ in batches)
    trl_total = sum(
        _trl_sft(logits, ids, am, labels, "nll", torch.tensor(global_items))[0] for ids, am, labels, logits in batches
    )
    num = den = 0.0
    for _, _, labels, logits in batches:
        terms = _ours_sft(logits, labels, "nll", None)[3]
        num, den = num + float(terms.numerator), den + float(terms.denominator)
    np.testing.assert_allclose(num / den, trl_total, rtol=RTOL)


def test_shift_labels_and_num_tokens():
    labels = jnp.array([[5, -100, 7, 8], [-100, -100, 2, -100]])
    targets, mask = shift_labels(labels)
    np.testing.assert_array_equal(targets, [[0, 7, 8, 0], [0, 2, 0, 0]])
    np.testing.assert_array_equal(mask, [[False, True, True, False], [False, True, False, False]])
    assert int(num_tokens_in_batch(attention_mask=jnp.array([[1, 1, 0], [1, 0, 0]]))) == 3
    assert int(num_tokens_in_batch(position_ids=jnp.zeros((1, 17), jnp.int32))) == 17
    with pytest.raises(ValueError, match="attention_mask"):
        num_tokens_in_batch()


def test_sft_loss_type_validation_and_alias():
    logps = -jnp.ones((2, 3))
    mask = jnp.ones((2, 3), bool)
    with pytest.raises(ValueError, match="nll"):
        sft_loss(logps, mask, loss_type="label_smoothing")
    with pytest.warns(FutureWarning):
        alias = sft_loss(logps, mask, loss_type="chunked_nll")
    assert float(alias.loss) == float(sft_loss(logps, mask).loss) == 1.0
    with pytest.raises(ValueError, match="shift_labels"):
        sft_loss(logps, mask[:, :2])


def test_sft_fed_by_fused_log_probs_matches_trl_fused_head():
    """The fused path: per-token log-probs and entropies straight from hidden states and the LM-head weight
    (trl_jax.ops.fused_log_probs, small token chunks) feed sft_loss; gradients w.r.t. hidden states and the head
    match TRL's fused LM head on a real (non-identity) ``[V, D]`` head."""
    dim = 5
    input_ids, attention_mask, labels, _ = _make_batch(seed=8)
    rng = np.random.default_rng(8)
    hidden = rng.normal(size=(B, T, dim)).astype(np.float32)
    weight = rng.normal(size=(V, dim)).astype(np.float32)
    t_loss, t_metrics, (t_grad_h, t_grad_w) = _trl_sft(
        hidden, input_ids, attention_mask, labels, "dft", None, lm_head_weight=weight
    )
    targets, loss_mask = shift_labels(jnp.asarray(labels))

    @jax.jit
    def value_and_grad(hidden, w):
        def f(hidden, w):
            logps, entropy = fused_log_probs(hidden, w, targets, chunk_size=8, return_entropy=True, mask=loss_mask)
            terms = sft_loss(logps, loss_mask, loss_type="dft", per_token_entropy=entropy)
            return terms.loss, terms

        return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(hidden, w)

    (loss, terms), (grad_h, grad_w) = value_and_grad(jnp.asarray(hidden), jnp.asarray(weight.T))
    np.testing.assert_allclose(float(loss), t_loss, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(float(terms.metrics["entropy"]), t_metrics["entropy"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(grad_h), t_grad_h, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(grad_w).T, t_grad_w, rtol=RTOL, atol=ATOL)
