"""Matmul FLOPs of a jaxpr, counting each row of a ``ragged_dot`` once: what a grouped-matmul kernel does (XLA:CPU
lowers ``ragged_dot`` to a masked dense dot, which :mod:`trl_jax.utils.hlo_cost` then counts as dense)."""

from __future__ import annotations

import math

import jax


def jaxpr_matmul_flops(jaxpr) -> float:
    """Matmul FLOPs of a jaxpr: ``dot_general`` and ``ragged_dot_general`` (each row of the ragged dimension in one
    group), ``scan`` bodies times their length, other sub-jaxprs once."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in ("dot_general", "ragged_dot_general"):
            lhs, out = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
            groups = 1
            if name == "dot_general":
                (lc, _), _ = eqn.params["dimension_numbers"]
            else:
                dn = eqn.params["ragged_dot_dimension_numbers"]
                (lc, _), _ = dn.dot_dimension_numbers
                if set(dn.lhs_ragged_dimensions) & set(lc):  # weight gradient: output [G, ...], rows split by group
                    groups = eqn.invars[2].aval.shape[-1]
            total += 2.0 * math.prod(out) * math.prod(lhs[i] for i in lc) / groups
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    total += jaxpr_matmul_flops(inner) * (eqn.params["length"] if name == "scan" else 1)
    return total


__all__ = ["jaxpr_matmul_flops"]
