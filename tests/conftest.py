"""Shared fixtures."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def trl_jax_cache(tmp_path_factory):
    """A fresh ``TRL_JAX_CACHE`` (where built-in models are materialised) for one test module."""
    old = os.environ.get("TRL_JAX_CACHE")
    path = str(tmp_path_factory.mktemp("trl_jax_cache"))
    os.environ["TRL_JAX_CACHE"] = path
    yield path
    if old is None:
        os.environ.pop("TRL_JAX_CACHE", None)
    else:
        os.environ["TRL_JAX_CACHE"] = old
