"""Two local processes x 4 CPU devices (jax.distributed on localhost, gloo collectives) train the same steps as
one process with 8 devices and reach the same parameters."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
from _multiprocess_worker import run_steps

from trl_jax.parallel import make_mesh

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    out = str(tmp_path / "mp.npz")
    port = _free_port()
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.join(HERE, "_multiprocess_worker.py"), str(i), "2", str(port), out],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]

    losses, state, _ = run_steps(make_mesh((2, 2, 2)))
    got = np.load(out)
    np.testing.assert_allclose(got["losses"], losses, rtol=2e-5, atol=2e-5)
    n = 0
    for path, x in jax.tree_util.tree_leaves_with_path(state.params):
        key = "/".join(str(getattr(k, "key", k)) for k in path)
        np.testing.assert_allclose(got[key], np.asarray(x), rtol=2e-5, atol=2e-5, err_msg=key)
        n += 1
    assert n == len(got.files) - 1
