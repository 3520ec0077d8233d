"""Schedules, optimizers and the weight-decay mask against transformers / torch on identical inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Trainer, get_scheduler

from trl_jax.train import decay_mask, make_optimizer, make_schedule, optimizer_from_args
from trl_jax.train.optim import param_path

N = 20

CASES = [
    ("linear", 4, None),
    ("linear", 0, None),
    ("cosine", 5, None),
    ("cosine", 3, {"num_cycles": 1.5}),
    ("cosine_with_restarts", 2, {"num_cycles": 3}),
    ("polynomial", 4, {"lr_end": 1e-5, "power": 2.0}),
    ("polynomial", 0, None),
    ("constant", 0, None),
    ("constant_with_warmup", 6, None),
    ("inverse_sqrt", 5, None),
    ("inverse_sqrt", 0, {"timescale": 7}),
    ("cosine_with_min_lr", 3, {"min_lr_rate": 0.1}),
    ("cosine_with_min_lr", 3, {"min_lr": 1e-4}),
    ("cosine_warmup_with_min_lr", 4, {"min_lr_rate": 0.05}),
    ("cosine_warmup_with_min_lr", 4, {"min_lr_rate": 0.05, "warmup_lr_rate": 0.2}),
    ("warmup_stable_decay", 3, {"num_decay_steps": 6}),
    ("warmup_stable_decay", 4, {"num_decay_steps": 5, "warmup_type": "cosine", "decay_type": "1-sqrt", "min_lr_ratio": 0.1}),
    ("warmup_stable_decay", 2, {"num_decay_steps": 8, "num_stable_steps": 4, "warmup_type": "1-sqrt", "decay_type": "linear"}),
]


def _torch_lrs(name, warmup, kwargs, lr=1e-3, steps=N + 3):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sch = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=N, scheduler_specific_kwargs=kwargs)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])  # the lr the next optimizer.step() uses
        opt.step()
        sch.step()
    return np.asarray(out)


@pytest.mark.filterwarnings("ignore:Both num_training_steps and num_stable_steps")
@pytest.mark.parametrize("name,warmup,kwargs", CASES)
def test_schedule_matches_transformers(name, warmup, kwargs):
    expected = _torch_lrs(name, warmup, dict(kwargs) if kwargs else None)
    sched = make_schedule(name, 1e-3, N, warmup, lr_scheduler_kwargs=kwargs)
    got = np.asarray(jax.vmap(sched)(jnp.arange(len(expected))))
    # fp32 vs Python float64: ~1e-7 of the peak lr absolute (cosine near its zero), 2e-6 relative
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=2e-7 * 1e-3)


def test_warmup_ratio_and_training_args(tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path), learning_rate=3e-4, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=0.15, max_steps=N, weight_decay=0.05,
        adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6, report_to=[],
    )
    w = args.get_warmup_steps(N)
    assert w == 3
    tx, sched = optimizer_from_args(args)
    expected = _torch_lrs("cosine_with_min_lr", w, {"min_lr_rate": 0.1}, lr=3e-4)
    np.testing.assert_allclose(np.asarray(jax.vmap(sched)(jnp.arange(len(expected)))), expected, rtol=2e-6)
    assert make_schedule("linear", 1.0, 10, warmup_ratio=0.25)(3) == pytest.approx(1.0)  # ceil(2.5) = 3


def test_bad_schedule_names_and_kwargs():
    with pytest.raises(ValueError, match="supported"):
        make_schedule("nope", 1e-3, 10)
    with pytest.raises(ValueError, match="num_training_steps"):
        make_schedule("linear", 1e-3, None)
    with pytest.raises(ValueError, match="not accepted"):
        make_schedule("linear", 1e-3, 10, lr_scheduler_kwargs={"num_cycles": 2})
    with pytest.raises(ValueError, match="metrics"):
        make_schedule("reduce_lr_on_plateau", 1e-3, 10)
    with pytest.raises(ValueError, match="not supported"):
        make_optimizer(1e-3, optim="galore_adamw")


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, attention_bias=True, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def _tree_from_named(named):
    tree = {}
    for name, arr in named:
        node = tree
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = arr
    return tree


def test_decay_mask_matches_trainer_get_decay_parameter_names():
    model = _tiny_llama()
    expected = set(Trainer.get_decay_parameter_names(None, model))
    tree = _tree_from_named((n, np.zeros(1)) for n, _ in model.named_parameters())
    mask = decay_mask(tree)
    got = {param_path(p) for p, m in jax.tree_util.tree_leaves_with_path(mask) if m}
    assert got == expected
    assert any("bias" in n for n, _ in model.named_parameters()) and not any("bias" in n for n in got)
    assert any("norm" in n for n, _ in model.named_parameters()) and not any("norm" in n for n in got)


def test_adamw_matches_torch_adamw():
    """Three AdamW steps with transformers' decay groups: same params as torch.optim.AdamW (fp32)."""
    model = _tiny_llama()
    decay = set(Trainer.get_decay_parameter_names(None, model))
    named = [(n, p) for n, p in model.named_parameters()]
    rng = np.random.default_rng(0)
    grads = [[rng.standard_normal(p.shape).astype(np.float32) for _, p in named] for _ in range(3)]
    lr, wd = 1e-2, 0.1
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": wd},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    topt = torch.optim.AdamW(groups, lr=lr, betas=(0.8, 0.95), eps=1e-6)
    params = _tree_from_named((n, jnp.asarray(p.detach().numpy())) for n, p in named)
    tx = make_optimizer(lr, optim="adamw_torch_fused", weight_decay=wd, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6)
    state = tx.init(params)
    for g in grads:
        for (_, p), gi in zip(named, g):
            p.grad = torch.tensor(gi)
        topt.step()
        gt = _tree_from_named((n, jnp.asarray(gi)) for (n, _), gi in zip(named, g))
        upd, state = tx.update(gt, state, params)
        params = jax.tree.map(lambda a, b: a + b, params, upd)
    flat = {param_path(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    for n, p in named:
        np.testing.assert_allclose(flat[n], p.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=n)


def test_sgd_matches_torch_sgd():
    rng = np.random.default_rng(1)
    w0 = rng.standard_normal((4, 3)).astype(np.float32)
    gs = [rng.standard_normal((4, 3)).astype(np.float32) for _ in range(3)]
    p = torch.nn.Parameter(torch.tensor(w0))
    topt = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01)
    tx = make_optimizer(0.1, optim="sgd", weight_decay=0.01, optim_args="momentum=0.9")
    params = {"w": jnp.asarray(w0)}
    st = tx.init(params)
    for g in gs:
        p.grad = torch.tensor(g)
        topt.step()
        u, st = tx.update({"w": jnp.asarray(g)}, st, params)
        params = jax.tree.map(lambda a, b: a + b, params, u)
    np.testing.assert_allclose(np.asarray(params["w"]), p.detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optim", ["adafactor", "lion_32bit", "adagrad"])
def test_other_optimizers_step(optim):
    params = {"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.ones((4,))}}
    tx = make_optimizer(1e-2, optim=optim, weight_decay=0.1)
    st = tx.init(params)
    u, st = tx.update(jax.tree.map(jnp.ones_like, params), st, params)
    new = jax.tree.map(lambda a, b: a + b, params, u)
    assert float(new["dense"]["kernel"][0, 0]) < 1.0 and np.isfinite(np.asarray(new["dense"]["kernel"])).all()
