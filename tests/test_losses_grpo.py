"""trl_jax.losses.grpo against TRL 1.16's own GRPOTrainer code on identical inputs.

TRL is driven, not re-typed: ``GRPOTrainer._compute_loss`` runs on a ``GRPOTrainer.__new__`` stand-in whose
``_get_per_token_logps_and_entropies`` returns fixed tensors (requires_grad), and
``GRPOTrainer._generate_and_score_completions`` runs on a stand-in whose ``_generate`` returns fixed completions
and whose reward functions return fixed rewards (None -> NaN), so TRL's own reward -> advantage code computes the
reference advantages and metrics.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from trl import GRPOConfig, GRPOTrainer

from trl_jax.losses.grpo import (
    LOSS_TYPES,
    grpo_advantages,
    grpo_loss,
    grpo_loss_and_metrics,
    high_entropy_mask,
    mask_truncated_completions,
    resolve_scale_rewards,
    truncated_completions,
    update_entropy_coef,
    vllm_importance_sampling_ratio,
)

ATOL = 1e-5
RTOL = 1e-5


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------


def make_batch(seed=0, b=6, t=7, empty_row=True):
    rng = np.random.default_rng(seed)
    logps = -rng.uniform(0.05, 3.0, (b, t)).astype(np.float32)
    old = (logps + rng.normal(0, 0.35, (b, t))).astype(np.float32)
    ref = (logps + rng.normal(0, 0.35, (b, t))).astype(np.float32)
    sampling = (old + rng.normal(0, 0.2, (b, t))).astype(np.float32)
    lengths = rng.integers(1, t + 1, b)
    if empty_row:
        lengths[2] = 0  # a fully masked completion: contributes nothing, never NaN
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int64)
    advantages = rng.normal(0, 1, b).astype(np.float32)
    advantages[1] = 0.0
    entropies = rng.uniform(0.0, 3.0, (b, t)).astype(np.float32)
    tool_mask = (rng.uniform(size=(b, t)) > 0.25).astype(np.int64)
    return dict(
        logps=logps, old=old, ref=ref, sampling=sampling, mask=mask, advantages=advantages, entropies=entropies,
        tool_mask=tool_mask,
    )


# ----------------------------------------------------------------------------------------------------------------
# TRL drivers
# ----------------------------------------------------------------------------------------------------------------


class _FakeAccelerator:
    """Single-process accelerator with a configurable ``num_processes`` (for the dapo normalizer)."""

    def __init__(self, num_processes=1):
        self.num_processes = num_processes
        self.sync_gradients = True
        self.is_main_process = True
        self.process_index = 0
        self.device = torch.device("cpu")

    def gather(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x

    def gather_for_metrics(self, x):
        return x


DEFAULTS = dict(
    loss_type="dapo", epsilon=0.2, epsilon_high=None, delta=None, beta=0.0, importance_sampling_level="token",
    use_bias_correction_kl=False, sapo_temperature_neg=1.05, sapo_temperature_pos=1.0, vespo_k_pos=2.0,
    vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0, top_entropy_quantile=1.0, entropy_coef=0.0,
    off_policy_mask_threshold=None, max_completion_length=7, num_processes=1, gradient_accumulation_steps=1,
    steps_per_generation=None, training=True, router_aux_loss_coef=0.0,
)


def trl_compute_loss(batch, cfg, *, use_old=True, use_sampling=False, is_ratio=None, use_tool_mask=False,
                     num_items=None, per_token_adv=False, aux_loss=None):
    """Run TRL's ``GRPOTrainer._compute_loss`` on a stand-in; return loss, d/dlogps, d/dentropies, metrics."""
    c = {**DEFAULTS, **cfg}
    tr = GRPOTrainer.__new__(GRPOTrainer)
    tr.loss_type = c["loss_type"]
    tr.epsilon_low = c["epsilon"]
    tr.epsilon_high = c["epsilon_high"] if c["epsilon_high"] is not None else c["epsilon"]
    tr.beta = c["beta"]
    tr.importance_sampling_level = c["importance_sampling_level"]
    tr.top_entropy_quantile = c["top_entropy_quantile"]
    tr.off_policy_mask_threshold = c["off_policy_mask_threshold"]
    tr.max_completion_length = c["max_completion_length"]
    tr.use_vllm = is_ratio is not None
    tr.vllm_importance_sampling_correction = is_ratio is not None
    tr.entropy_coef = c["entropy_coef"]
    tr.use_adaptive_entropy = False
    tr._entropy_bonus_enabled = c["entropy_coef"] != 0.0
    tr._last_world_entropy = float("inf")
    tr._entropy_window_stats = None
    tr.aux_loss_enabled = aux_loss is not None
    tr.router_aux_loss_coef = c["router_aux_loss_coef"]
    tr.current_gradient_accumulation_steps = c["gradient_accumulation_steps"]
    tr.accelerator = _FakeAccelerator(c["num_processes"])
    tr.model = SimpleNamespace(training=c["training"])
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    spg = c["steps_per_generation"] or c["gradient_accumulation_steps"]
    tr.args = SimpleNamespace(
        delta=c["delta"], use_bias_correction_kl=c["use_bias_correction_kl"],
        sapo_temperature_neg=c["sapo_temperature_neg"], sapo_temperature_pos=c["sapo_temperature_pos"],
        vespo_k_pos=c["vespo_k_pos"], vespo_lambda_pos=c["vespo_lambda_pos"], vespo_k_neg=c["vespo_k_neg"],
        vespo_lambda_neg=c["vespo_lambda_neg"], steps_per_generation=spg, entropy_target=0.2,
    )
    logps = torch.tensor(batch["logps"], requires_grad=True)
    ents = torch.tensor(batch["entropies"], requires_grad=True)
    aux = None if aux_loss is None else torch.tensor(aux_loss)
    tr._get_per_token_logps_and_entropies = lambda *a, **k: (logps, ents, aux)
    b, t = batch["logps"].shape
    adv = batch["advantages"]
    if per_token_adv:
        adv = adv[:, None] * np.linspace(0.5, 1.5, t, dtype=np.float32)[None, :]
    mask = torch.tensor(batch["mask"])
    inputs = {
        "prompt_ids": torch.zeros(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
        "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask,
        "advantages": torch.tensor(adv),
    }
    if use_old:
        inputs["old_per_token_logps"] = torch.tensor(batch["old"])
    if c["beta"] != 0.0:
        inputs["ref_per_token_logps"] = torch.tensor(batch["ref"])
    if use_sampling:
        inputs["sampling_per_token_logps"] = torch.tensor(batch["sampling"])
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = torch.tensor(np.asarray(is_ratio))
    if use_tool_mask:
        inputs["tool_mask"] = torch.tensor(batch["tool_mask"])
    if num_items is not None:
        inputs["num_items_in_batch"] = torch.tensor(float(num_items))
    elif c["loss_type"] in ("dapo", "cispo", "vespo"):
        m = batch["mask"] * (batch["tool_mask"] if use_tool_mask else 1)
        inputs["num_items_in_batch"] = torch.tensor(float(m.sum()))
    loss = tr._compute_loss(None, inputs)
    loss.backward()
    mode = "train" if c["training"] else "eval"
    metrics = {k: v[0] for k, v in tr._metrics[mode].items()}
    g_ent = None if ents.grad is None else ents.grad.numpy()
    return loss.item(), logps.grad.numpy(), g_ent, metrics, adv


def ours_loss(batch, cfg, *, use_old=True, use_sampling=False, is_ratio=None, use_tool_mask=False, num_items=None,
              adv=None, aux_loss=None):
    c = {**DEFAULTS, **cfg}
    kwargs = {k: v for k, v in c.items()}
    if kwargs["loss_type"] in ("dapo", "cispo", "vespo") and num_items is None:
        m = batch["mask"] * (batch["tool_mask"] if use_tool_mask else 1)
        num_items = float(m.sum())

    def f(logps, ents):
        terms = grpo_loss(
            logps,
            jnp.asarray(batch["old"]) if use_old else None,
            jnp.asarray(batch["ref"]) if c["beta"] != 0.0 else None,
            jnp.asarray(batch["advantages"] if adv is None else adv),
            jnp.asarray(batch["mask"]),
            tool_mask=jnp.asarray(batch["tool_mask"]) if use_tool_mask else None,
            entropies=ents,
            sampling_per_token_logps=jnp.asarray(batch["sampling"]) if use_sampling else None,
            importance_sampling_ratio=None if is_ratio is None else jnp.asarray(is_ratio),
            num_items_in_batch=num_items,
            aux_loss=aux_loss,
            **kwargs,
        )
        return terms.loss, terms

    (loss, terms), (g_logp, g_ent) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
        jnp.asarray(batch["logps"]), jnp.asarray(batch["entropies"])
    )
    return float(loss), np.asarray(g_logp), np.asarray(g_ent), {k: float(v) for k, v in terms.metrics.items()}, terms


def assert_same(batch, cfg, **kw):
    trl_l, trl_g, trl_ge, trl_m, adv = trl_compute_loss(batch, cfg, **kw)
    kw.pop("per_token_adv", None)
    l, g, ge, m, terms = ours_loss(batch, cfg, adv=adv, **kw)
    assert np.isfinite(l) and np.all(np.isfinite(g))
    np.testing.assert_allclose(l, trl_l, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(g, trl_g, rtol=RTOL, atol=ATOL)
    if trl_ge is not None:
        np.testing.assert_allclose(ge, trl_ge, rtol=RTOL, atol=ATOL)
    else:
        np.testing.assert_array_equal(ge, 0.0)
    assert set(m) == set(trl_m), (sorted(m), sorted(trl_m))
    for k in trl_m:
        np.testing.assert_allclose(m[k], trl_m[k], rtol=RTOL, atol=ATOL, err_msg=k)
    return terms


# ----------------------------------------------------------------------------------------------------------------
# Loss: every loss type and option against TRL
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_types_match_trl(loss_type, level):
    cfg = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.04)
    if loss_type == "cispo":
        cfg["epsilon_high"] = 1.1  # some ratios above the cap
    assert_same(make_batch(1), cfg)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(loss_type="grpo", delta=1.3),
        dict(loss_type="grpo", delta=1.15, epsilon_high=0.3),  # delta below 1+eps_high: clip metrics see min(r, delta)
        dict(loss_type="dapo", epsilon=0.1, epsilon_high=0.28),
        dict(loss_type="dapo", importance_sampling_level="sequence", delta=1.1, epsilon=0.05),
        dict(loss_type="cispo"),  # default epsilon_high=0.2 caps the IS weight at 0.2
        dict(loss_type="bnpo", beta=0.1, use_bias_correction_kl=True),
        dict(loss_type="grpo", beta=0.1, use_bias_correction_kl=True, importance_sampling_level="sequence"),
        dict(loss_type="sapo", sapo_temperature_pos=0.7, sapo_temperature_neg=1.6),
        dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_pos=2.0, vespo_k_neg=2.5, vespo_lambda_neg=1.0),
        dict(loss_type="dr_grpo", max_completion_length=11),
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_options_match_trl(cfg):
    assert_same(make_batch(2), cfg)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "vespo"])
def test_top_entropy_quantile_and_entropy_bonus_match_trl(loss_type):
    batch = make_batch(3)
    assert_same(batch, dict(loss_type=loss_type, top_entropy_quantile=0.3))
    # entropy bonus: gradient also flows into the entropies, restricted to the high-entropy tokens
    assert_same(batch, dict(loss_type=loss_type, top_entropy_quantile=0.45, entropy_coef=0.03, beta=0.02))


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "luspo"])
def test_entropy_bonus_match_trl(loss_type):
    assert_same(make_batch(4), dict(loss_type=loss_type, entropy_coef=0.05, gradient_accumulation_steps=3))


@pytest.mark.parametrize("use_sampling", [False, True])
@pytest.mark.parametrize("loss_type", ["grpo", "vespo"])
def test_off_policy_mask_match_trl(loss_type, use_sampling):
    batch = make_batch(5)
    terms = assert_same(batch, dict(loss_type=loss_type, off_policy_mask_threshold=0.05), use_sampling=use_sampling)
    assert np.isfinite(float(terms.loss))


_IS_MODES = ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


@pytest.mark.parametrize(
    "loss_type,mode",
    # TRL rejects vespo with a sequence-level vLLM IS mode at construction, so that pair is not tested.
    [(lt, m) for lt in ("dapo", "grpo") for m in _IS_MODES] + [("vespo", "token_truncate"), ("vespo", "token_mask")],
)
def test_vllm_importance_sampling_ratio_in_loss_match_trl(loss_type, mode):
    batch = make_batch(6)
    ratio, _ = vllm_importance_sampling_ratio(
        batch["old"], batch["sampling"], batch["mask"], mode=mode, clip_min=0.8, clip_max=1.3
    )
    assert_same(batch, dict(loss_type=loss_type), is_ratio=np.asarray(ratio))


@pytest.mark.parametrize(
    "cfg,kw",
    [
        (dict(loss_type="dapo", gradient_accumulation_steps=2, steps_per_generation=4, num_processes=2),
         dict(num_items=61)),
        (dict(loss_type="cispo", epsilon_high=5.0, gradient_accumulation_steps=4, steps_per_generation=2),
         dict(num_items=17)),
        (dict(loss_type="dapo", training=False, gradient_accumulation_steps=4, steps_per_generation=2),
         dict(num_items=33)),
        (dict(loss_type="grpo", training=False, gradient_accumulation_steps=4), {}),
        (dict(loss_type="dr_grpo", gradient_accumulation_steps=2, beta=0.05), dict(use_tool_mask=True)),
        (dict(loss_type="bnpo", gradient_accumulation_steps=2), dict(use_old=False)),
        (dict(loss_type="dapo"), dict(use_old=False, use_tool_mask=True)),
        (dict(loss_type="grpo", importance_sampling_level="sequence"), dict(per_token_adv=True)),
        (dict(loss_type="dapo"), dict(per_token_adv=True)),
        (dict(loss_type="bnpo", router_aux_loss_coef=0.01, gradient_accumulation_steps=2), dict(aux_loss=0.7)),
    ],
)
def test_normalizers_masks_and_inputs_match_trl(cfg, kw):
    assert_same(make_batch(7), cfg, **kw)


def test_loss_is_jittable_and_matches_eager():
    batch = make_batch(8)
    kwargs = dict(loss_type="grpo", beta=0.04, top_entropy_quantile=0.5, entropy_coef=0.01)

    def f(logps, old, ref, adv, mask, ents):
        return grpo_loss_and_metrics(logps, old, ref, adv, mask, entropies=ents, **kwargs)

    args = [jnp.asarray(batch[k]) for k in ("logps", "old", "ref", "advantages", "mask", "entropies")]
    jl, jm = jax.jit(f)(*args)
    el, em = f(*args)
    np.testing.assert_allclose(jl, el, rtol=1e-6, atol=1e-6)
    for k in em:
        np.testing.assert_allclose(jm[k], em[k], rtol=1e-6, atol=1e-6)
    # a traced entropy coefficient (adaptive control) compiles once and is applied
    g = jax.jit(lambda c: grpo_loss(*args[:5], entropies=args[5], loss_type="grpo", entropy_coef=c).loss)
    assert float(g(0.5)) < float(g(0.0))


def test_numerator_denominator_accumulate_like_trl():
    """Two micro-batches: sum(loss_k) == TRL's accumulated loss for dapo (global token normalizer)."""
    b1, b2 = make_batch(9), make_batch(10)
    n_items = float(b1["mask"].sum() + b2["mask"].sum())
    cfg = dict(loss_type="dapo", gradient_accumulation_steps=2)
    total_trl = sum(trl_compute_loss(b, cfg, num_items=n_items)[0] for b in (b1, b2))
    terms = [ours_loss(b, cfg, num_items=n_items)[4] for b in (b1, b2)]
    np.testing.assert_allclose(sum(float(t.loss) for t in terms), total_trl, rtol=RTOL, atol=ATOL)
    assert float(terms[0].denominator) == pytest.approx(n_items)


# ----------------------------------------------------------------------------------------------------------------
# Loss properties
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_empty_rows_contribute_nothing_and_never_nan(loss_type):
    batch = make_batch(11)
    mask = batch["mask"].copy()
    mask[0] = 0
    kw = dict(loss_type=loss_type, beta=0.04, max_completion_length=7, num_items_in_batch=float(mask.sum()))

    def loss_of(logps, m):
        return grpo_loss(logps, batch["old"], batch["ref"], batch["advantages"], m, entropies=batch["entropies"],
                         **kw).loss

    logps = jnp.asarray(batch["logps"])
    g = jax.grad(loss_of)(logps, mask)
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[0] == 0.0)
    # changing the masked row's log-probs does not change the loss
    moved = logps.at[0].add(5.0)
    np.testing.assert_allclose(loss_of(moved, mask), loss_of(logps, mask), rtol=1e-6, atol=1e-7)
    # an all-masked batch gives a finite loss (0) and finite metrics
    zero = np.zeros_like(mask)
    terms = grpo_loss(logps, batch["old"], batch["ref"], batch["advantages"], zero, entropies=batch["entropies"],
                      **{**kw, "num_items_in_batch": 0.0})
    assert float(terms.loss) == 0.0
    for k, v in terms.metrics.items():
        if k not in ("clip_ratio/low_min", "clip_ratio/high_max"):  # TRL: NaN when no sequence has a token
            assert np.isfinite(float(v)), k


def test_truncated_flag_masks_rows():
    batch = make_batch(12)
    truncated = np.array([True, False, False, True, False, False])
    a = grpo_loss(batch["logps"], batch["old"], None, batch["advantages"], batch["mask"], truncated=truncated,
                  loss_type="bnpo")
    b = grpo_loss(batch["logps"], batch["old"], None, batch["advantages"],
                  mask_truncated_completions(batch["mask"], truncated), loss_type="bnpo")
    np.testing.assert_allclose(a.loss, b.loss)
    assert float(a.denominator) == float(batch["mask"][~truncated].sum())


def test_high_entropy_mask_matches_trl():
    batch = make_batch(13)
    tr = GRPOTrainer.__new__(GRPOTrainer)
    tr.accelerator = _FakeAccelerator()
    for q in (0.0, 0.2, 0.5, 0.77, 1.0):
        ref = tr.get_high_entropy_mask(torch.tensor(batch["entropies"]), torch.tensor(batch["mask"]), q).numpy()
        ours = np.asarray(high_entropy_mask(batch["entropies"], batch["mask"], q))
        np.testing.assert_array_equal(ours, ref)
    empty = np.zeros_like(batch["mask"])
    assert not np.asarray(high_entropy_mask(batch["entropies"], empty, 0.5)).any()


def test_errors_name_the_problem():
    batch = make_batch(14)
    args = (batch["logps"], None, None, batch["advantages"], batch["mask"])
    with pytest.raises(ValueError, match="Unknown loss type"):
        grpo_loss(*args, loss_type="gspo")
    with pytest.raises(ValueError, match="ref_per_token_logps"):
        grpo_loss(*args, beta=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(*args, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="entropies"):
        grpo_loss(*args, top_entropy_quantile=0.2)
    with pytest.raises(ValueError, match="importance sampling level"):
        grpo_loss(*args, importance_sampling_level="seq")
    with pytest.raises(ValueError, match="multiple of num_generations"):
        grpo_advantages(np.zeros((5, 1), np.float32), num_generations=2)
    with pytest.raises(ValueError, match="scale_rewards"):
        grpo_advantages(np.zeros((4, 1), np.float32), num_generations=2, scale_rewards="groups")


def test_update_entropy_coef():
    assert float(update_entropy_coef(0.1, 0.1, entropy_coef_delta=0.05)) == pytest.approx(0.15)
    assert float(update_entropy_coef(0.1, 0.5, entropy_coef_delta=0.05)) == pytest.approx(0.05)
    assert float(update_entropy_coef(0.99, 0.1, entropy_coef_delta=0.05)) == pytest.approx(1.0)
    assert float(update_entropy_coef(0.01, 0.5, entropy_coef_delta=0.05)) == pytest.approx(0.0)


# ----------------------------------------------------------------------------------------------------------------
# Advantages / rewards / generation-side helpers: TRL's _generate_and_score_completions on a stand-in
# ----------------------------------------------------------------------------------------------------------------

EOS, PAD = 5, 0


def trl_generate_and_score(rewards_per_func, *, num_generations, scale_rewards="group",
                           multi_objective_aggregation="sum_then_normalize", reward_weights=None,
                           completion_ids_list=None, mask_truncated=False, vllm=None):
    """Drive TRL's ``_generate_and_score_completions``: fixed completions, reward functions returning fixed values."""
    rewards_per_func = np.asarray(rewards_per_func, np.float32)
    n, f = rewards_per_func.shape
    names = [f"fn{i}" for i in range(f)]
    tr = GRPOTrainer.__new__(GRPOTrainer)
    tr.accelerator = Accelerator(cpu=True)  # fresh: building a GRPOConfig resets accelerate's global state
    tr.model = SimpleNamespace(training=True, is_gradient_checkpointing=False)
    tr.environment_factories, tr.tools, tr.environments = None, None, None
    tr._tokenizer = SimpleNamespace(pad_token_id=PAD)
    tr.eos_token_ids = [EOS]
    tr.pad_to_multiple_of = None
    tr.mask_truncated_completions = mask_truncated
    tr.args = SimpleNamespace(per_device_train_batch_size=n, gradient_checkpointing_kwargs=None,
                              steps_per_generation=1, gradient_accumulation_steps=1, report_to=[])
    tr.num_iterations = 1
    tr.use_vllm = vllm is not None
    tr.vllm_importance_sampling_correction = vllm is not None
    if vllm is not None:
        tr.vllm_importance_sampling_mode = vllm["mode"]
        tr.vllm_importance_sampling_clip_min = vllm["clip_min"]
        tr.vllm_importance_sampling_clip_max = vllm["clip_max"]
        old = torch.tensor(vllm["old"])
        tr._get_per_token_logps_and_entropies = lambda *a, **k: (old, None, None)
    tr.beta = 0.0
    tr.state = SimpleNamespace(global_step=0)
    tr.num_generations = tr.num_generations_eval = num_generations
    tr.multi_objective_aggregation = multi_objective_aggregation
    tr.scale_rewards = scale_rewards
    tr.reward_weights = torch.ones(f) if reward_weights is None else torch.tensor(reward_weights, dtype=torch.float32)
    tr.reward_func_names = names
    tr.reward_processing_classes = [None] * f
    tr.log_multimodal = False
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    tr._logs = {"images": deque(), "prompt": deque(), "completion": deque(), "rewards": defaultdict(deque),
                "advantages": deque(), "extra": defaultdict(deque)}
    tr._pending_extra_logs = defaultdict(list)
    tr._pending_metrics = defaultdict(list)

    def make_fn(col):
        def fn(prompts, completions, completion_ids, **kwargs):
            return [None if math.isnan(v) else float(v) for v in col]

        return fn

    tr.reward_funcs = [make_fn(rewards_per_func[:, i]) for i in range(f)]
    if completion_ids_list is None:
        completion_ids_list = [[7, 8, EOS]] * n
    sampling = None if vllm is None else [list(map(float, row[: len(c)])) for row, c in
                                          zip(vllm["sampling"], completion_ids_list)]
    tr._generate = lambda prompts: (
        [[1, 2]] * n, completion_ids_list, None, ["c"] * n, sampling, {}, None, None,
    )
    out = tr._generate_and_score_completions([{"prompt": "p"} for _ in range(n)])
    metrics = {k: v[0] for k, v in tr._metrics["train"].items() if v}
    return out, metrics


def assert_adv_same(rewards, **kw):
    out, trl_m = trl_generate_and_score(rewards, **kw)
    kw.pop("completion_ids_list", None)
    adv, m = grpo_advantages(
        np.asarray(rewards, np.float32), kw.get("reward_weights"), num_generations=kw["num_generations"],
        scale_rewards=kw.get("scale_rewards", "group"),
        multi_objective_aggregation=kw.get("multi_objective_aggregation", "sum_then_normalize"),
        reward_func_names=[f"fn{i}" for i in range(np.asarray(rewards).shape[1])],
    )
    assert np.all(np.isfinite(np.asarray(adv)))
    np.testing.assert_allclose(np.asarray(adv), out["advantages"].numpy(), rtol=RTOL, atol=ATOL)
    assert set(m) == set(trl_m), (sorted(m), sorted(trl_m))
    for k in trl_m:
        np.testing.assert_allclose(float(m[k]), trl_m[k], rtol=RTOL, atol=ATOL, err_msg=k, equal_nan=True)
    return np.asarray(adv), m


def make_rewards(seed=0, groups=5, g=4, f=3):
    rng = np.random.default_rng(seed)
    r = rng.normal(0, 1, (groups * g, f)).astype(np.float32)
    r[rng.uniform(size=r.shape) < 0.2] = np.nan  # None rewards ("not applicable")
    r[5] = np.nan  # an unscorable completion
    r[8:12] = np.array([0.5, 1.0, np.nan], np.float32)[:f]  # a group with equal rewards
    r[12:16, 0] = 2.0  # one function constant in a group (matters for normalize_then_sum)
    r[16:20] = np.array([1.0, 1.0002, 1.0, 1.0], np.float32)[:, None]  # tiny but nonzero std: not "zero std"
    return r


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_match_trl(scale, aggregation):
    r = make_rewards(1)
    adv, m = assert_adv_same(r, num_generations=4, scale_rewards=scale, multi_objective_aggregation=aggregation,
                             reward_weights=[1.0, 0.5, 2.0])
    assert adv[5] == 0.0  # unscorable
    if aggregation == "sum_then_normalize":
        np.testing.assert_array_equal(adv[8:12], 0.0)  # equal rewards in a group -> exactly 0


@pytest.mark.parametrize("flag", [True, False])
def test_scale_rewards_bool_maps_like_grpo_config(flag, tmp_path):
    mapped = GRPOConfig(output_dir=str(tmp_path), scale_rewards=flag, report_to="none", use_cpu=True, bf16=False).scale_rewards
    assert resolve_scale_rewards(flag) == mapped
    r = make_rewards(2, f=1)
    out, trl_m = trl_generate_and_score(r, num_generations=4, scale_rewards=mapped)
    adv, m = grpo_advantages(r, num_generations=4, scale_rewards=flag, reward_func_names=["fn0"])
    np.testing.assert_allclose(np.asarray(adv), out["advantages"].numpy(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("g", [2, 8])
def test_advantages_group_sizes_match_trl(g):
    rng = np.random.default_rng(3)
    r = rng.integers(0, 3, (16, 2)).astype(np.float32)  # ties and zero-std groups are common
    r[0, 1] = np.nan
    assert_adv_same(r, num_generations=g)
    assert_adv_same(r, num_generations=g, multi_objective_aggregation="normalize_then_sum")


def test_advantages_properties():
    r = np.array([[1.0], [1.0], [1.0], [1.0], [0.0], [np.nan], [1.0], [np.nan]], np.float32)
    adv, m = grpo_advantages(r, num_generations=4)
    np.testing.assert_array_equal(np.asarray(adv)[:4], 0.0)  # all-equal group
    assert np.asarray(adv)[5] == 0.0 and np.asarray(adv)[7] == 0.0  # None rewards -> 0, never NaN
    # the None rewards are ignored by the baseline: group 2 is {0, 1} -> +-1/(std+1e-4)
    std = np.std([0.0, 1.0], ddof=1)
    np.testing.assert_allclose(np.asarray(adv)[[4, 6]], [-0.5 / (std + 1e-4), 0.5 / (std + 1e-4)], rtol=1e-6)
    assert float(m["frac_reward_zero_std"]) == 0.5
    jitted = jax.jit(lambda x: grpo_advantages(x, num_generations=4))(r)
    np.testing.assert_allclose(np.asarray(jitted[0]), np.asarray(adv), rtol=1e-6)


def test_mask_truncated_completions_matches_trl():
    ids_list = [[7, 8, EOS], [7, 8, 9, 9], [7], [EOS], [3, 4, 6, 9], [2, PAD]]
    r = np.arange(6, dtype=np.float32)[:, None]
    out, _ = trl_generate_and_score(r, num_generations=2, completion_ids_list=ids_list, mask_truncated=True)
    t = max(map(len, ids_list))
    ids = np.array([c + [PAD] * (t - len(c)) for c in ids_list])
    mask = (np.arange(t)[None, :] < np.array([len(c) for c in ids_list])[:, None]).astype(np.int64)
    trunc = truncated_completions(ids, mask, EOS, PAD)
    ours = np.asarray(mask_truncated_completions(mask, trunc))
    np.testing.assert_array_equal(ours, out["completion_mask"].numpy())
    assert ours.sum() == int(out["num_items_in_batch"])


@pytest.mark.parametrize("mode,clip_min,clip_max", [
    ("token_truncate", 0.8, 1.2), ("token_mask", None, 1.2), ("sequence_truncate", None, 1.5),
    ("sequence_mask", 0.7, 1.4),
])
def test_vllm_importance_sampling_ratio_matches_trl(mode, clip_min, clip_max):
    batch = make_batch(15, empty_row=False)
    batch["mask"][0] = 1  # the padded width equals T
    b, t = batch["mask"].shape
    lengths = batch["mask"].sum(1)
    ids_list = [[7] * int(n - 1) + [EOS] for n in lengths]
    sampling = batch["sampling"].copy()
    sampling[0, 0] = np.nan  # a token vLLM could not score
    vllm = dict(mode=mode, clip_min=clip_min, clip_max=clip_max, old=batch["old"], sampling=sampling)
    out, trl_m = trl_generate_and_score(np.zeros((b, 1), np.float32), num_generations=2, completion_ids_list=ids_list,
                                        vllm=vllm)
    ratio, m = vllm_importance_sampling_ratio(batch["old"], out["sampling_per_token_logps"].numpy(),
                                              batch["mask"], mode=mode, clip_min=clip_min, clip_max=clip_max)
    np.testing.assert_allclose(np.asarray(ratio), out["importance_sampling_ratio"].numpy(), rtol=RTOL, atol=ATOL)
    for k in m:
        np.testing.assert_allclose(float(m[k]), trl_m[k], rtol=RTOL, atol=ATOL, err_msg=k)
