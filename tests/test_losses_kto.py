"""trl_jax.losses.kto against TRL 1.16's own ``KTOTrainer._compute_loss``.

TRL side: batches built by TRL's ``DataCollatorForUnpairedPreference`` (with KL completions rotated within the batch
as ``KTOTrainer._prepare_dataset`` does), and ``KTOTrainer._compute_loss`` run on a stand-in trainer object whose
policy and reference "models" return fixed logits: a backbone that returns a fixed hidden-state parameter for each
known ``input_ids`` (main and KL batch) and an identity LM head, patched with TRL's ``add_fused_lm_head`` exactly as
``KTOTrainer.__init__`` does. The gradient of TRL's loss w.r.t. those parameters is the gradient w.r.t. the logits.
trl_jax side: the same logits -> ``jax.nn.log_softmax`` -> masked sums -> ``kto_loss`` -> ``jax.grad``.
"""

from __future__ import annotations

import types
from collections import defaultdict
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from transformers import PretrainedConfig
from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference, KTOTrainer
from trl.trainer.utils import add_fused_lm_head

from trl_jax.losses.kto import KTO_LOSS_TYPES, kto_kl_reference_point, kto_loss
from trl_jax.losses.sft import shift_labels
from trl_jax.ops.masking import masked_sum

B, V = 6, 11
RTOL, ATOL = 1e-5, 1e-6


# ----------------------------------------------------------------------------------------------- TRL stand-ins


class _Backbone(torch.nn.Module):
    """Returns the fixed hidden states registered for the given ``input_ids``."""

    def __init__(self, entries):
        super().__init__()
        self.keys = [torch.as_tensor(ids) for ids, _ in entries]
        self.hiddens = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.tensor(h, dtype=torch.float32)) for _, h in entries]
        )

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        for key, hidden in zip(self.keys, self.hiddens):
            if key.shape == input_ids.shape and torch.equal(key, input_ids):
                return types.SimpleNamespace(last_hidden_state=hidden)
        raise KeyError("unknown input_ids")


class _StandInLM(torch.nn.Module):
    is_gradient_checkpointing = False

    def __init__(self, entries):
        super().__init__()
        self.config = PretrainedConfig()
        self.base_model = _Backbone(entries)
        self.lm_head = torch.nn.Linear(V, V, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.eye(V))
        self.lm_head.weight.requires_grad_(False)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, *args, **kwargs):  # replaced by add_fused_lm_head
        raise NotImplementedError


class _Gather:
    """``accelerator.gather_for_metrics`` of a single process; optionally the first call (the KL mean) also
    returns another process's value, to simulate a 2-process gather of the KL reference point."""

    def __init__(self, other_kl=None):
        self.calls, self.other_kl = [], other_kl

    def __call__(self, x):
        self.calls.append(x.detach().clone())
        if self.other_kl is not None and len(self.calls) == 1:
            return torch.stack([x.reshape(()), self.other_kl.reshape(())])
        return x


def _trl_kto(case, loss_type, beta, dw, uw, *, precompute=False, other_kl=None):
    policy = _StandInLM([(case["input_ids"], case["pol"]), (case["KL_input_ids"], case["pol_kl"])])
    ref = _StandInLM([(case["input_ids"], case["ref"]), (case["KL_input_ids"], case["ref_kl"])])
    add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits"))  # as KTOTrainer.__init__
    add_fused_lm_head(ref)
    policy.train()
    gather = _Gather(other_kl)
    stub = types.SimpleNamespace(
        model=policy,
        ref_model=ref,
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=gather),
        precompute_ref_logps=precompute,
        calculate_KL=loss_type != "apo_zero_unpaired",
        loss_type=loss_type,
        beta=beta,
        desirable_weight=dw,
        undesirable_weight=uw,
        aux_loss_enabled=False,
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    stub._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, stub)
    batch = {k: v.clone() for k, v in case["batch"].items()}
    if precompute:
        batch["ref_logps"] = torch.tensor(case["ref_logps"])
        batch["ref_KL_logps"] = torch.tensor(case["ref_KL_logps"])
    loss = KTOTrainer._compute_loss(stub, policy, batch, return_outputs=False)
    loss.backward()
    metrics = {k: v[-1] for k, v in stub._metrics["train"].items()}
    grads = [None if p.grad is None else p.grad.numpy() for p in policy.base_model.hiddens]
    return loss.item(), metrics, grads, gather.calls


# ----------------------------------------------------------------------------------------------- inputs


def _make_case(seed, labels=None, kl_sign=0.0, batch_size=B):
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(batch_size):
        examples.append(
            {
                "prompt_ids": rng.integers(0, V, size=rng.integers(1, 4)).tolist(),
                "completion_ids": rng.integers(0, V, size=rng.integers(1, 5)).tolist(),
                "label": bool(rng.integers(0, 2)) if labels is None else bool(labels[i]),
            }
        )
    # KTOTrainer._prepare_dataset: KL completions are the batch's completions rotated by one
    completions = [ex["completion_ids"] for ex in examples]
    for ex, kl_completion in zip(examples, [completions[-1]] + completions[:-1]):
        ex["KL_completion_ids"] = kl_completion
    batch = DataCollatorForUnpairedPreference(pad_token_id=0)(examples)

    case = {"batch": batch}
    for prefix in ("", "KL_"):
        ids = batch[f"{prefix}input_ids"].numpy()
        labels_ = np.where(batch[f"{prefix}completion_mask"].numpy() == 1, ids, -100)
        targets, loss_mask = shift_labels(jnp.asarray(labels_))
        case[f"{prefix}input_ids"] = batch[f"{prefix}input_ids"]
        case[f"{prefix}targets"], case[f"{prefix}loss_mask"] = np.asarray(targets), np.asarray(loss_mask)
    shape, kl_shape = batch["input_ids"].shape + (V,), batch["KL_input_ids"].shape + (V,)
    case["pol"] = rng.normal(size=shape).astype(np.float32)
    case["ref"] = rng.normal(size=shape).astype(np.float32)
    case["ref_kl"] = rng.normal(size=kl_shape).astype(np.float32)
    # policy KL logits = reference KL logits +- a bump on each target: sets the sign of the KL estimate
    bump = np.eye(V, dtype=np.float32)[case["KL_targets"]] * case["KL_loss_mask"][..., None]
    case["pol_kl"] = case["ref_kl"] + kl_sign * 1.5 * bump + 0.3 * rng.normal(size=kl_shape).astype(np.float32)
    case["label"] = batch["label"].numpy()
    case["ref_logps"] = np.asarray(_seq_logps(jnp.asarray(case["ref"]), case["targets"], case["loss_mask"]))
    case["ref_KL_logps"] = np.asarray(_seq_logps(jnp.asarray(case["ref_kl"]), case["KL_targets"], case["KL_loss_mask"]))
    return case


# ----------------------------------------------------------------------------------------------- trl_jax side


def _per_token(logits, targets):
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    logps = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
    return logps, -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1), jnp.mean(logits, axis=-1)


def _seq_logps(logits, targets, loss_mask):
    return masked_sum(_per_token(logits, jnp.asarray(targets))[0], loss_mask, axis=-1)


def _ours_kto(case, loss_type, beta, dw, uw, **kwargs):
    targets, mask = jnp.asarray(case["targets"]), jnp.asarray(case["loss_mask"])
    kl_targets, kl_mask = jnp.asarray(case["KL_targets"]), jnp.asarray(case["KL_loss_mask"])

    @jax.jit
    def value_and_grad(pol, pol_kl):
        def f(pol, pol_kl):
            logps, entropy, mean_logits = _per_token(pol, targets)
            policy_logps = masked_sum(logps, mask, axis=-1)
            policy_KL_logps = masked_sum(_per_token(pol_kl, kl_targets)[0], kl_mask, axis=-1)
            terms = kto_loss(
                policy_logps,
                jnp.asarray(case["ref_logps"]),
                jnp.asarray(case["label"]),
                policy_KL_logps,
                jnp.asarray(case["ref_KL_logps"]),
                beta=beta,
                loss_type=loss_type,
                desirable_weight=dw,
                undesirable_weight=uw,
                loss_mask=mask,
                per_token_entropy=entropy,
                per_token_mean_logits=mean_logits,
                **kwargs,
            )
            return terms.loss, terms

        return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(pol, pol_kl)

    (loss, terms), grads = value_and_grad(jnp.asarray(case["pol"]), jnp.asarray(case["pol_kl"]))
    metrics = {k: float(v) for k, v in terms.metrics.items()}
    return float(loss), metrics, [np.asarray(g) for g in grads], terms


def _assert_matches(ours, theirs, check_grad=True):
    loss, metrics, grads = ours[:3]
    t_loss, t_metrics, t_grads = theirs[:3]
    np.testing.assert_allclose(loss, t_loss, rtol=RTOL, atol=ATOL)
    t_metrics = {k: v for k, v in t_metrics.items() if k != "num_tokens"}  # trainer-level running total
    assert set(t_metrics) <= set(metrics)
    for key, value in metrics.items():
        if key in t_metrics:
            np.testing.assert_allclose(value, t_metrics[key], rtol=RTOL, atol=ATOL, err_msg=key)
        else:  # TRL did not log it this step (zero count)
            assert np.isnan(value), key
    if check_grad:
        np.testing.assert_allclose(grads[0], t_grads[0], rtol=RTOL, atol=ATOL)
        # the KL term is detached: TRL computes it under no_grad, ours has zero gradient
        assert t_grads[1] is None and np.all(grads[1] == 0.0)


# ----------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    "loss_type,beta,dw,uw,kl_sign",
    [
        ("kto", 0.1, 1.0, 1.0, 1.0),
        ("kto", 0.5, 1.33, 0.75, 1.0),
        ("kto", 0.3, 1.0, 1.0, -1.0),  # negative KL estimate: clamped to 0
        ("apo_zero_unpaired", 0.1, 1.0, 1.0, 1.0),
        ("apo_zero_unpaired", 0.4, 0.7, 1.2, 1.0),
    ],
)
def test_kto_loss_metrics_grad_match_trl(loss_type, beta, dw, uw, kl_sign):
    case = _make_case(seed=int(beta * 10) + int(kl_sign > 0), labels=[1, 0, 1, 1, 0, 0], kl_sign=kl_sign)
    theirs = _trl_kto(case, loss_type, beta, dw, uw)
    ours = _ours_kto(case, loss_type, beta, dw, uw)
    _assert_matches(ours, theirs)
    if loss_type == "kto":
        assert (theirs[1]["kl"] > 0) == (kl_sign > 0)
    else:
        assert theirs[1]["kl"] == 0.0
    assert float(ours[3].denominator) == B


@pytest.mark.parametrize("labels", [[1] * B, [0] * B], ids=["all_desirable", "all_undesirable"])
def test_kto_one_sided_batch_matches_trl(labels):
    """Metrics of an absent side are not logged by TRL; ours are NaN ("not logged"); the loss is finite."""
    case = _make_case(seed=7, labels=labels, kl_sign=1.0)
    theirs = _trl_kto(case, "kto", 0.1, 1.0, 1.0)
    ours = _ours_kto(case, "kto", 0.1, 1.0, 1.0)
    _assert_matches(ours, theirs)
    assert np.isnan(ours[1]["rewards/margins"]) and np.isfinite(ours[0])


def test_kto_precomputed_reference_logps_match_trl():
    """precompute_ref_log_probs=True: TRL reads ref_logps / ref_KL_logps from the batch."""
    case = _make_case(seed=21, kl_sign=1.0)
    theirs = _trl_kto(case, "kto", 0.2, 1.0, 1.0, precompute=True)
    _assert_matches(_ours_kto(case, "kto", 0.2, 1.0, 1.0), theirs)


def test_kto_kl_gathered_across_processes():
    """Two data-parallel processes: TRL's z_ref is the mean of the per-process means, clamped. Ours equals it on the
    global batch, with an already-reduced `kl` passed in, and inside shard_map with `axis_name`."""
    case_a, case_b = _make_case(seed=31, kl_sign=1.0), _make_case(seed=32, kl_sign=-0.5)
    kl_b = _trl_kto(case_b, "kto", 0.1, 1.0, 1.0)[3][0]  # process B's local (unclamped) KL mean, as TRL gathers it
    theirs_a = _trl_kto(case_a, "kto", 0.1, 1.0, 1.0, other_kl=kl_b)

    pol_kl = [_seq_logps(jnp.asarray(c["pol_kl"]), c["KL_targets"], c["KL_loss_mask"]) for c in (case_a, case_b)]
    ref_kl = [jnp.asarray(c["ref_KL_logps"]) for c in (case_a, case_b)]
    z_ref = kto_kl_reference_point(jnp.concatenate(pol_kl), jnp.concatenate(ref_kl))
    np.testing.assert_allclose(float(z_ref), theirs_a[1]["kl"], rtol=RTOL, atol=ATOL)

    # process A's loss with the reduced value passed in: loss, gradient and kl metric match TRL's process A
    ours_a = _ours_kto(case_a, "kto", 0.1, 1.0, 1.0, kl=z_ref)
    np.testing.assert_allclose(ours_a[0], theirs_a[0], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ours_a[2][0], theirs_a[2][0], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ours_a[1]["kl"], theirs_a[1]["kl"], rtol=RTOL, atol=ATOL)

    # shard_map over 2 devices, one "process" per shard, axis_name reduces the KL point and metrics
    policy_logps = jnp.concatenate(
        [_seq_logps(jnp.asarray(c["pol"]), c["targets"], c["loss_mask"]) for c in (case_a, case_b)]
    )
    ref_logps = jnp.concatenate([jnp.asarray(c["ref_logps"]) for c in (case_a, case_b)])
    label = jnp.concatenate([jnp.asarray(c["label"]) for c in (case_a, case_b)])
    mesh = Mesh(np.array(jax.devices()[:2]), ("dp",))

    @jax.jit
    @partial(jax.shard_map, mesh=mesh, in_specs=P("dp"), out_specs=P("dp"))
    def sharded(pl, rl, lab, pkl, rkl):
        terms = kto_loss(pl, rl, lab, pkl, rkl, beta=0.1, axis_name="dp")
        return terms.loss[None], {k: v[None] for k, v in terms.metrics.items()}

    args = (policy_logps, ref_logps, label, jnp.concatenate(pol_kl), jnp.concatenate(ref_kl))
    args = [jax.device_put(a, NamedSharding(mesh, P("dp"))) for a in args]
    losses, metrics = sharded(*args)
    np.testing.assert_allclose(float(losses[0]), theirs_a[0], rtol=RTOL, atol=ATOL)
    global_terms = kto_loss(*args, beta=0.1)
    for key, value in global_terms.metrics.items():  # psum-reduced metrics == metrics of the global batch
        np.testing.assert_allclose(np.asarray(metrics[key]), float(value), rtol=RTOL, atol=ATOL, err_msg=key)


def test_kto_example_mask_padding_rows_are_ignored():
    """A bucket padded with junk rows (example_mask False) gives TRL's result on the unpadded batch."""
    case = _make_case(seed=41, labels=[1, 0, 0, 1, 1, 0], kl_sign=1.0)
    theirs = _trl_kto(case, "kto", 0.1, 1.0, 1.0)
    pad = 3
    padded = dict(case)
    for key in ("targets", "loss_mask", "KL_targets", "KL_loss_mask", "pol", "pol_kl"):
        junk = case[key][:pad] * 3 if case[key].dtype == np.float32 else case[key][:pad]
        padded[key] = np.concatenate([case[key], junk])
    for key in ("ref_logps", "ref_KL_logps"):
        padded[key] = np.concatenate([case[key], np.full(pad, -50.0, np.float32)])
    padded["label"] = np.concatenate([case["label"], [True, False, True]])
    example_mask = jnp.arange(B + pad) < B
    ours = _ours_kto(padded, "kto", 0.1, 1.0, 1.0, example_mask=example_mask)
    loss, metrics, grads = ours[:3]
    _assert_matches((loss, metrics, [grads[0][:B], grads[1][:B]]), theirs)
    assert np.all(grads[0][B:] == 0.0) and float(ours[3].denominator) == B


def test_kto_all_masked_batch_gives_zero_loss_no_nan():
    case = _make_case(seed=51, kl_sign=1.0)
    for loss_type in KTO_LOSS_TYPES:
        loss, metrics, grads, terms = _ours_kto(case, loss_type, 0.1, 1.0, 1.0, example_mask=jnp.zeros(B, bool))
        assert loss == 0.0 and float(terms.denominator) == 0.0
        assert all(np.all(g == 0.0) for g in grads)
        assert metrics["kl"] == 0.0 and metrics["entropy"] == 0.0
        assert all(np.isnan(metrics[k]) for k in metrics if k.split("/")[0] in ("rewards", "logps", "logits"))


def test_kto_validation_errors():
    x = jnp.zeros(4)
    label = jnp.array([True, False, True, False])
    with pytest.raises(ValueError, match="apo_zero_unpaired"):
        kto_loss(x, x, label, x, x, loss_type="sigmoid")
    with pytest.raises(ValueError, match="KL"):
        kto_loss(x, x, label)
    with pytest.raises(ValueError, match="label"):
        kto_loss(x, x, label[:3], x, x)
    with pytest.raises(ValueError, match="loss_mask"):
        kto_loss(x, x, label, x, x, per_token_entropy=jnp.zeros((4, 3)))
    # apo_zero_unpaired needs no KL inputs; a passed `kl` is clamped at 0 and detached
    assert float(kto_loss(x, x, label, loss_type="apo_zero_unpaired").loss) == 0.5
    assert float(kto_loss(x, x, label, kl=-3.0).metrics["kl"]) == 0.0
