"""Helpers over compiled HLO text for the generation tests: the decode loops of a sampling program, the sub-program
of one loop body (costed with ``trl_jax.utils.hlo_cost``), and the instructions that run inside it."""

from __future__ import annotations

import re

from trl_jax.utils.hlo_cost import _op, _shapes, hlo_cost, parse

_CALLEE_KEYS = ("body", "condition", "calls", "to_apply", "branch_computations", "called_computations")


def reachable(comps: dict, root: str) -> list[str]:
    """``root`` and every computation it calls, transitively (fusions, nested loops, reductions)."""
    out, todo = [], [root]
    while todo:
        n = todo.pop()
        if n in out or n not in comps:
            continue
        out.append(n)
        for instr in comps[n]:
            for key in _CALLEE_KEYS:
                for m in re.finditer(key + r"=\{?([^}\s]*(?:, %[\w.\-]+)*)\}?", instr):
                    todo += [c.strip().lstrip("%") for c in m.group(1).split(",") if c.strip()]
    return out


def body_program(comps: dict, body: str) -> str:
    """HLO text of a loop body as its own module (the body as ENTRY), for ``hlo_cost``: cost of one iteration."""
    lines = []
    for n in reachable(comps, body):
        lines.append(("ENTRY %" if n == body else "%") + n + " {")
        lines += comps[n]
        lines.append("}")
    return "\n".join(lines)


def decode_loops(text: str, layers: int, kv_heads: int, head_dim: int) -> tuple[dict, dict[int, str]]:
    """``(computations, {cache slots S: body name})`` of the while loops (no known trip count) carrying a KV cache
    ``[L, B, S, K, Hd]`` (per device: ``B`` and ``K`` may be shards): the decode segments of a sampling program."""
    comps, _ = parse(text)
    loops = {}
    for instrs in comps.values():
        for instr in instrs:
            out, op, _ = _op(instr)
            if op != "while" or '"known_trip_count"' in instr:
                continue
            body = re.search(r"body=%?([\w.\-]+)", instr).group(1)
            for _, dims in _shapes(out):
                if len(dims) == 5 and dims[0] == layers and kv_heads % dims[3] == 0 and dims[4] == head_dim:
                    loops[dims[2]] = body
    return comps, loops


def instructions(comps: dict, body: str):
    """``(computation, op, output shapes, instruction text)`` of everything that runs inside ``body``."""
    for n in reachable(comps, body):
        for instr in comps[n]:
            out, op, _ = _op(instr)
            if op is not None:
                yield n, op, _shapes(out), instr


def root_op(comps: dict, name: str) -> str | None:
    for instr in comps.get(name, []):
        if instr.startswith("ROOT"):
            return _op(instr)[1]
    return None


def body_cost(comps: dict, body: str) -> dict:
    return hlo_cost(body_program(comps, body))
