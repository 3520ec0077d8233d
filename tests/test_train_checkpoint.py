"""Orbax checkpoints of the TrainState: resume gives identical numbers, restore onto another mesh, keep-last-N,
incomplete saves ignored with a warning."""

import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from _multiprocess_worker import LOGICAL, init_params, make_batch, make_optimizer, sft_loss

from trl_jax.parallel import make_mesh, shard_batch
from trl_jax.train import Checkpointer, TrainState, make_train_step, restore_or_init


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _fresh(mesh):
    tx, sched = make_optimizer()
    state = TrainState.create(init_params(), tx, jax.random.PRNGKey(0), mesh=mesh, logical_axes=LOGICAL)
    step = make_train_step(sft_loss, tx, mesh=mesh, max_grad_norm=1.0, learning_rate_fn=sched)
    return state, step


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    ckdir = tmp_path_factory.mktemp("ckpt") / "run"
    mesh_a = make_mesh((2, 2, 2))
    state, step = _fresh(mesh_a)
    losses = []
    with Checkpointer(ckdir, max_to_keep=2) as ck:
        for i in range(10):
            state, m = step(state, shard_batch(make_batch(i), mesh_a))
            losses.append(float(m["loss"]))
            if int(state.step) in (3, 5, 8):
                ck.save(int(state.step), state)  # async: returns while the save runs
    full_params = _np(state.params)
    steps_kept = Checkpointer(ckdir).all_steps()

    # "kill" and restart: a fresh process state on a *different* mesh, restore step 5, continue to 10
    mesh_b = make_mesh((1, 2, 4))
    target, step_b = _fresh(mesh_b)
    restored_step, state_b = Checkpointer(ckdir).restore(target, step=5)
    res_losses = []
    for i in range(restored_step, 10):
        state_b, m = step_b(state_b, shard_batch(make_batch(i), mesh_b))
        res_losses.append(float(m["loss"]))
    return dict(
        ckdir=ckdir, losses=losses, full_params=full_params, steps_kept=steps_kept, restored_step=restored_step,
        res_losses=res_losses, state_b=state_b, target=target, mesh_b=mesh_b,
    )


def test_keep_last_n(resumed):
    assert resumed["steps_kept"] == [5, 8]


def test_resume_identical(resumed):
    assert resumed["restored_step"] == 5
    assert int(resumed["state_b"].step) == 10
    np.testing.assert_allclose(resumed["res_losses"], resumed["losses"][5:], rtol=2e-5, atol=2e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5),
        _np(resumed["state_b"].params),
        resumed["full_params"],
    )
    # restored onto mesh B's layout, not A's
    q = resumed["state_b"].params["layers"]["q_proj"]["kernel"]
    assert q.sharding.mesh.shape == resumed["mesh_b"].shape
    assert "tensor" in jax.tree.leaves(tuple(q.sharding.spec))


def test_incomplete_checkpoints_are_ignored_with_warning(resumed, tmp_path):
    src = resumed["ckdir"]
    d = tmp_path / "run"
    shutil.copytree(src, d)
    # (1) a save killed before commit: orbax's temporary directory, half written
    shutil.copytree(d / "8", d / "9.orbax-checkpoint-tmp-1234567")
    for root, _, files in os.walk(d / "9.orbax-checkpoint-tmp-1234567"):
        for f in files[::2]:
            os.remove(os.path.join(root, f))
    # (2) a step directory whose data is gone (cut short / damaged after the rename)
    shutil.copytree(d / "8", d / "12")
    for root, _, files in os.walk(d / "12"):
        for f in files:
            if not f.startswith("_CHECKPOINT_METADATA"):
                os.remove(os.path.join(root, f))
    ck = Checkpointer(d)
    assert 9 not in ck.all_steps()
    with pytest.warns(UserWarning) as rec:
        step, state = ck.restore(resumed["target"])
    msgs = " ".join(str(w.message) for w in rec)
    assert "9.orbax-checkpoint-tmp" in msgs and "incomplete" in msgs
    assert "step 12" in msgs
    assert step == 8 and int(state.step) == 8


def test_restore_or_init_empty_dir(tmp_path, resumed):
    step, state = restore_or_init(Checkpointer(tmp_path / "empty"), resumed["target"])
    assert step == 0 and state is resumed["target"]
    with pytest.raises(FileNotFoundError):
        Checkpointer(tmp_path / "empty2").restore(resumed["target"])


KILL_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import jax, jax.numpy as jnp
    from trl_jax.train import Checkpointer
    ck = Checkpointer(sys.argv[1], async_save=True)
    ck.save(1, {"w": jnp.ones((4,)), "big": jnp.zeros((4,))})
    ck.wait()                                  # step 1 committed
    big = jnp.full((4096, 4096), 2.0)          # 64 MiB: the background write takes a while
    ck.save(2, {"w": jnp.full((4,), 2.0), "big": big})
    os._exit(0)                                # killed mid-save: no wait, no close
    """
)


def test_save_killed_midway_never_loads(tmp_path):
    """A process killed right after starting an async save: step 2 is never listed or restored; the newest
    committed step (1) is."""
    d = tmp_path / "killed"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    r = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(d)], env=env, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = Checkpointer(d)
    assert ck.all_steps() == [1]
    target = {"w": jax.numpy.zeros((4,)), "big": jax.numpy.zeros((4,))}
    if ck.incomplete_saves():
        with pytest.warns(UserWarning, match="incomplete"):
            step, state = ck.restore(target)
    else:
        step, state = ck.restore(target)
    assert step == 1
    np.testing.assert_array_equal(np.asarray(state["w"]), np.ones(4))
