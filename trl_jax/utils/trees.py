"""Nested-dict parameter trees split into two disjoint parts and put back together (trainable / frozen)."""

from __future__ import annotations

from collections.abc import Callable


def partition(tree, pred: Callable[[tuple[str, ...]], bool]):
    """``(selected, rest)``: two nested dicts holding the leaves of ``tree`` whose key path (a tuple of names)
    satisfies / fails ``pred`` (empty sub-dicts dropped). :func:`combine` puts them back together."""

    def walk(node, prefix):
        if not isinstance(node, dict):
            return (node, None) if pred(prefix) else (None, node)
        sel, rest = {}, {}
        for k, v in node.items():
            s, r = walk(v, prefix + (str(k),))
            if s is not None and (not isinstance(s, dict) or s):
                sel[k] = s
            if r is not None and (not isinstance(r, dict) or r):
                rest[k] = r
        return sel, rest

    return walk(tree, ())


def combine(a, b):
    """Deep union of two nested dicts with disjoint leaves (no array is copied)."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return b if a is None or (isinstance(a, dict) and not a) else a
    out = dict(a)
    for k, v in b.items():
        out[k] = combine(out[k], v) if k in out else v
    return out
