"""make_train_step / make_pmap_train_step: same numbers on 1 device, every mesh layout and pmap; exact
gradient accumulation; no recompilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _multiprocess_worker import STEPS, init_params, make_batch, make_optimizer, run_steps, sft_loss

from trl_jax.losses.base import LossTerms
from trl_jax.parallel import make_mesh, shard_batch
from trl_jax.train import (
    TrainState,
    make_eval_step,
    make_pmap_train_step,
    make_train_step,
    unreplicate,
)

RTOL, ATOL = 2e-5, 2e-5


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


@pytest.fixture(scope="module")
def reference():
    losses, state, step = run_steps(None)
    return losses, _np(state.params), step


def test_reference_trains(reference):
    losses, _, step = reference
    assert len(losses) == STEPS and all(np.isfinite(losses))
    assert not np.allclose(reference[1]["lm_head"]["kernel"], init_params()["lm_head"]["kernel"])
    assert step.compile_count() == 1  # three steps of one shape: one executable


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_mesh_matches_single_device(reference, shape):
    ref_losses, ref_params, _ = reference
    mesh = make_mesh(shape)
    # (1, 2, 4): the state starts on one device and the step shards it from logical axes + rules
    losses, state, step = run_steps(mesh, step_logical=shape == (1, 2, 4))
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL, atol=ATOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL), _np(state.params), ref_params)
    assert step.compile_count() == 1
    # the state really is sharded as the rules say, and keeps its shardings across steps
    q = state.params["layers"]["q_proj"]["kernel"]
    spec = q.sharding.spec
    if shape[1] > 1:
        assert "fsdp" in jax.tree.leaves(tuple(spec))
    if shape[2] > 1:
        assert "tensor" in jax.tree.leaves(tuple(spec))
    mu = state.opt_state[0].mu["layers"]["q_proj"]["kernel"]
    assert mu.sharding.spec == spec


def test_pmap_matches_single_device(reference):
    """pmap over 4 devices, each accumulating 2 micro-batches of 1 row: same numbers as 1 device, k=1."""
    ref_losses, ref_params, _ = reference
    tx, sched = make_optimizer()
    step = make_pmap_train_step(
        sft_loss, tx, devices=jax.local_devices()[:4], gradient_accumulation_steps=2, max_grad_norm=1.0,
        learning_rate_fn=sched,
    )
    state = step.replicate(TrainState.create(init_params(), tx, jax.random.PRNGKey(0)))
    losses = []
    for i in range(STEPS):
        state, m = step(state, make_batch(i))
        losses.append(float(m["loss"]))
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL, atol=ATOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL), _np(unreplicate(state).params), ref_params)
    assert step.compile_count() == 1


def test_gradient_accumulation_unequal_tokens_equals_big_batch(reference):
    """k=4 micro-batches with very different counted-token totals == the k=1 step on the same batch."""
    ref_losses, ref_params, _ = reference
    lengths = [1, 1, 7, 7, 2, 7, 1, 3]  # micro-batches (2 rows each) hold 0+0, 6+6, 1+6, 0+2 counted tokens

    def batch_fn(i):
        return make_batch(i, lengths=lengths)

    big_losses, big_state, _ = run_steps(None, batch_fn=batch_fn)
    acc_losses, acc_state, step = run_steps(None, batch_fn=batch_fn, gradient_accumulation_steps=4)
    np.testing.assert_allclose(acc_losses, big_losses, rtol=RTOL, atol=ATOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL), _np(acc_state.params), _np(big_state.params))
    assert step.compile_count() == 1
    # and a naive mean of per-micro-batch losses would differ: the test can fail
    tx, _ = make_optimizer()
    p = init_params()
    b = batch_fn(0)
    per_micro = [float(sft_loss(p, {k: v[2 * j : 2 * j + 2] for k, v in b.items()}, None).loss) for j in range(4)]
    assert abs(np.mean(per_micro) - acc_losses[0]) > 1e-3


def test_accumulation_on_mesh(reference):
    """Accumulation with a sharded batch (micro-batches re-split over data*fsdp) matches too."""
    lengths = [1, 1, 7, 7, 2, 7, 1, 3, 4, 5, 6, 2, 1, 7, 3, 3]
    mesh = make_mesh((4, 2, 1))

    def host(i):
        return make_batch(i, batch_size=16, lengths=lengths)

    big_losses, big_state, _ = run_steps(None, steps=2, batch_fn=host)
    acc_losses, acc_state, _ = run_steps(
        mesh, steps=2, batch_fn=lambda i: shard_batch(host(i), mesh), gradient_accumulation_steps=2
    )
    np.testing.assert_allclose(acc_losses, big_losses, rtol=RTOL, atol=ATOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL), _np(acc_state.params), _np(big_state.params))


def test_metrics_grad_norm_clipping_and_recompilation():
    import torch

    from trl_jax.train import clip_by_global_norm_torch

    tx, sched = make_optimizer()
    p = init_params()
    b0 = make_batch(0)
    g = jax.jit(jax.grad(lambda q: sft_loss(q, b0, None).loss))(p)
    state = TrainState.create(p, tx)
    step = make_train_step(sft_loss, tx, max_grad_norm=0.5, learning_rate_fn=sched)
    lrs = []
    for i in range(3):
        state, m = step(state, make_batch(i))
        assert set(m) == {"loss", "grad_norm", "learning_rate", "mean_token_accuracy"}
        lrs.append(float(m["learning_rate"]))
        if i == 0:  # logged grad_norm is the pre-clip global norm of d(loss)/d(params); loss = num / den
            np.testing.assert_allclose(float(m["grad_norm"]), float(optax_norm(g)), rtol=1e-5)
            np.testing.assert_allclose(float(m["loss"]), float(sft_loss(p, b0, None).loss), rtol=1e-6)
    assert int(state.step) == 3
    np.testing.assert_allclose(lrs, [float(sched(i)) for i in range(3)])
    assert lrs[0] == 0.0  # warmup starts at 0 like transformers' LambdaLR
    assert step.compile_count() == 1
    state, _ = step(state, make_batch(3, batch_size=4))  # a new shape compiles once more
    state, _ = step(state, make_batch(4, batch_size=4))
    assert step.compile_count() == 2

    # the clipping formula against torch.nn.utils.clip_grad_norm_
    leaves = [np.asarray(x) for x in jax.tree.leaves(g)]
    tp = [torch.nn.Parameter(torch.zeros(x.shape)) for x in leaves]
    for t, x in zip(tp, leaves):
        t.grad = torch.tensor(x)
    tnorm = torch.nn.utils.clip_grad_norm_(tp, 0.1)
    clipped, norm = clip_by_global_norm_torch(g, 0.1)
    np.testing.assert_allclose(float(norm), float(tnorm), rtol=1e-5)
    for t, x in zip(tp, jax.tree.leaves(clipped)):
        np.testing.assert_allclose(np.asarray(x), t.grad.numpy(), rtol=1e-5, atol=1e-8)


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree)))


def test_eval_step_and_ref_params():
    tx, _ = make_optimizer()
    p = init_params()
    b = make_batch(0)
    ev = make_eval_step(sft_loss)
    m = ev(TrainState.create(p, tx), b)
    np.testing.assert_allclose(float(m["loss"]), float(sft_loss(p, b, None).loss), rtol=1e-6)
    assert float(m["denominator"]) == float(b["completion_mask"][:, 1:].sum())

    seen = {}

    def loss_with_ref(params, batch, rng, ref_params):
        t = sft_loss(params, batch, rng)
        r = sft_loss(ref_params, batch, rng)
        seen["ref"] = True
        return LossTerms(t.numerator - r.numerator, t.denominator, {"ref_loss": r.loss})

    import optax

    sgd = optax.sgd(0.1)
    st = TrainState.create(p, sgd, ref_params=p)
    step = make_train_step(loss_with_ref, sgd)
    st2, m = step(st, b)
    assert seen["ref"] and abs(float(m["loss"])) < 1e-5  # params == ref at step 0
    # ref params are frozen; params moved
    jax.tree.map(lambda a, c: np.testing.assert_array_equal(np.asarray(a), c), st2.ref_params, p)
    assert not np.allclose(np.asarray(st2.params["lm_head"]["kernel"]), p["lm_head"]["kernel"])


def test_mixed_precision_modes():
    from trl_jax.train import fp32_optimizer_state, cast_floating

    tx, _ = make_optimizer()
    p = init_params()
    b = make_batch(0)
    # fp32 master params, bf16 compute: params and moments stay fp32, loss close to the fp32 loss
    st = TrainState.create(p, tx)
    step = make_train_step(sft_loss, tx, compute_dtype=jnp.bfloat16)
    st, m = step(st, b)
    assert st.params["lm_head"]["kernel"].dtype == jnp.float32
    assert st.opt_state[0].mu["lm_head"]["kernel"].dtype == jnp.float32
    np.testing.assert_allclose(float(m["loss"]), float(sft_loss(p, b, None).loss), rtol=3e-2)
    # bf16 params, fp32 moments
    tx32 = fp32_optimizer_state(tx)
    st = TrainState.create(cast_floating(p, jnp.bfloat16), tx32)
    step = make_train_step(sft_loss, tx32)
    st, m = step(st, b)
    st, m = step(st, make_batch(1))
    assert st.params["lm_head"]["kernel"].dtype == jnp.bfloat16
    assert st.opt_state[0].mu["lm_head"]["kernel"].dtype == jnp.float32
    assert st.opt_state[0].nu["lm_head"]["kernel"].dtype == jnp.float32
    assert step.compile_count() == 1 and np.isfinite(float(m["loss"]))


def test_bad_inputs_raise_clear_errors():
    tx, _ = make_optimizer()
    st = TrainState.create(init_params(), tx)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        make_train_step(sft_loss, tx, gradient_accumulation_steps=3)(st, make_batch(0))
    with pytest.raises(TypeError, match="LossTerms"):
        make_train_step(lambda p, b, r: 1.0, tx)(st, make_batch(0))
    mesh = make_mesh((8, 1, 1))
    with pytest.raises(ValueError, match="multiple of"):
        shard_batch(make_batch(0, batch_size=4), mesh)
