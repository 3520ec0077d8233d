"""Built-in reward functions with TRL's reward-function signature, and name -> function resolution for configs.

A reward function is any Python callable ``f(prompts=..., completions=..., completion_ids=..., **columns)`` that
returns one float (or ``None`` = "not applicable", NaN in the reward table) per completion. ``completions`` are
strings for standard prompts and ``[{"role": "assistant", "content": text}]`` for conversational prompts, exactly
as TRL's ``GRPOTrainer`` passes them; the dataset's other columns arrive as keyword lists.

* :func:`accuracy_reward` -- exact match against the ``answer`` (or ``solution``) column. TRL's name, but plain
  string comparison (after stripping whitespace and any ``<think>...</think>`` block) instead of ``math_verify``.
* :func:`think_format_reward` -- TRL's regex: 1.0 when the completion is ``<think>...</think>answer``.
* :func:`get_soft_overlong_punishment` -- DAPO's soft length penalty on ``completion_ids`` (TRL's formula).

``resolve_reward_funcs(["accuracy_reward", "my_pkg.rewards.fn"])`` maps the names a YAML ``reward_funcs:`` list
holds (built-in names or dotted import paths, like TRL's ``GRPOScriptArguments``) to callables.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable

from trl_jax.data.decode import strip_reasoning

__all__ = [
    "REWARD_FUNCS",
    "accuracy_reward",
    "completion_text",
    "get_soft_overlong_punishment",
    "resolve_reward_funcs",
    "think_format_reward",
]


def completion_text(completion) -> str:
    """The text of one completion: a string, or the ``content`` of the first message of a conversational one."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[0], dict):
        return str(completion[0].get("content", ""))
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    raise TypeError(
        f"A completion must be a string or a list of one message dict with 'content'; got {type(completion).__name__}."
    )


def accuracy_reward(completions, answer=None, solution=None, **kwargs) -> list[float | None]:
    """1.0 when the completion equals the reference answer, else 0.0; ``None`` where there is no reference.

    The reference comes from the dataset's ``answer`` column, else ``solution`` (TRL's column name). Both sides are
    compared as strings after ``strip()``; a ``<think>...</think>`` block before the answer is ignored. No math
    normalisation (TRL's version uses ``math_verify``; this one is exact match).
    """
    gold = answer if answer is not None else solution
    if gold is None:
        raise ValueError(
            "accuracy_reward needs an `answer` or `solution` column in the dataset (the reference answer of each "
            f"prompt); got columns {sorted(kwargs)}."
        )
    out: list[float | None] = []
    for completion, ref in zip(completions, gold, strict=True):
        if ref is None:
            out.append(None)
            continue
        text = strip_reasoning(completion_text(completion)).strip()
        out.append(1.0 if text == str(ref).strip() else 0.0)
    return out


_THINK_PATTERN = re.compile(r"^<think>(?!.*<think>)(.*?)</think>.*$", re.DOTALL | re.MULTILINE)


def think_format_reward(completions, **kwargs) -> list[float]:
    """1.0 when the completion is ``<think>reasoning</think>answer`` with a single think block (TRL's regex)."""
    return [1.0 if _THINK_PATTERN.match(completion_text(c)) else 0.0 for c in completions]


class _SoftOverlongPunishment:
    """Callable class (picklable); ``__name__`` is TRL's, so the metric is ``rewards/soft_overlong_punishment_reward``."""

    __name__ = "soft_overlong_punishment_reward"

    def __init__(self, max_completion_len: int, soft_punish_cache: int):
        if soft_punish_cache <= 0 or max_completion_len <= soft_punish_cache:
            raise ValueError(
                f"need 0 < soft_punish_cache ({soft_punish_cache}) < max_completion_len ({max_completion_len})."
            )
        self.max_completion_len = int(max_completion_len)
        self.soft_punish_cache = int(soft_punish_cache)

    def __call__(self, completion_ids, **kwargs) -> list[float]:
        lmax, cache = self.max_completion_len, self.soft_punish_cache
        out = []
        for ids in completion_ids:
            n = len(ids)
            if n <= lmax - cache:
                out.append(0.0)
            elif n <= lmax:
                out.append((lmax - cache - n) / cache)
            else:
                out.append(-1.0)
        return out


def get_soft_overlong_punishment(max_completion_len: int, soft_punish_cache: int) -> Callable:
    """DAPO's soft overlong punishment: 0 up to ``L - cache`` tokens, then linearly down to -1 at ``L``, -1 beyond.

    ``L = max_completion_len``, ``cache = soft_punish_cache``: ``r = (L - cache - n) / cache`` for
    ``L - cache < n <= L``.
    """
    return _SoftOverlongPunishment(max_completion_len, soft_punish_cache)


REWARD_FUNCS: dict[str, Callable] = {
    "accuracy_reward": accuracy_reward,
    "think_format_reward": think_format_reward,
    # TRL's CLI registry entry uses these values.
    "get_soft_overlong_punishment": get_soft_overlong_punishment(max_completion_len=1280, soft_punish_cache=256),
}
"""Built-in names accepted in a YAML ``reward_funcs:`` list (TRL's ``reward_funcs_registry`` names)."""


def resolve_reward_funcs(names) -> list:
    """Built-in names and dotted import paths -> callables (TRL's ``GRPOScriptArguments.reward_funcs`` rules).

    Anything already callable is kept. ``"pkg.module.func"`` is imported (the current directory is on the path,
    as in TRL's script). Any other string is kept as-is: the trainer treats it as a reward-model path.
    """
    if names is None:
        return []
    if isinstance(names, (str, os.PathLike)) or callable(names):
        names = [names]
    out = []
    for name in names:
        if callable(name) or not isinstance(name, str):
            out.append(name)
        elif name in REWARD_FUNCS:
            out.append(REWARD_FUNCS[name])
        elif "." in name and "/" not in name and not os.path.exists(name) and re.fullmatch(r"[\w.]+", name):
            module_path, attr = name.rsplit(".", 1)
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            try:
                module = importlib.import_module(module_path)
                out.append(getattr(module, attr))
            except (ImportError, AttributeError) as e:
                raise ValueError(
                    f"Could not load reward function {name!r} ({e}). Expected one of {sorted(REWARD_FUNCS)} or a "
                    "valid dotted import path 'package.module.function'."
                ) from e
        else:
            out.append(name)  # a reward model: local directory or hub id
    return out
