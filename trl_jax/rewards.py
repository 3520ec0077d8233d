"""Built-in reward functions with TRL's reward-function signature, and name -> function resolution for configs.

A reward function is any Python callable ``f(prompts=..., completions=..., completion_ids=..., **columns)`` that
returns one float (or ``None`` = "not applicable", NaN in the reward table) per completion. ``completions`` are
strings for standard prompts and ``[{"role": "assistant", "content": text}]`` for conversational prompts, exactly
as TRL's ``GRPOTrainer`` passes them; the dataset's other columns arrive as keyword lists.

The ``trl.rewards`` functions, same names and results as TRL 1.16 on the same inputs:

* :func:`accuracy_reward` -- with ``math_verify`` installed (``pip install math-verify``), TRL's LaTeX-aware check
  (``\\boxed{\\frac{63}{400}}`` equals ``0.1575``; ``None`` where the gold answer does not parse). Without it,
  the documented fallback :func:`exact_match_reward`.
* :func:`reasoning_accuracy_reward` -- the same on the text after the reasoning delimiter (``</think>``); 0.0 when
  the reasoning is not closed.
* :func:`get_cosine_scaled_reward` -- correctness scaled by completion length on a cosine schedule.
* :func:`think_format_reward` -- TRL's regex: 1.0 when the completion is ``<think>...</think>answer``.
* :func:`get_soft_overlong_punishment` -- DAPO's soft length penalty on ``completion_ids`` (TRL's formula).
* :func:`get_repetition_penalty_reward` -- penalty for repeated token n-grams.

trl_jax's own, for plain-text answers such as the shipped digit/arithmetic tasks:

* :func:`exact_match_reward` -- 1.0 when the completion (reasoning block stripped) equals the ``answer`` string.
* :func:`digit_match_reward` -- graded: the fraction of answer characters the completion gets right, position by
  position (``"1234"`` vs ``"1243"`` -> 0.5); gives online DPO / GRPO a signal before answers are exactly right.

``resolve_reward_funcs(["accuracy_reward", "my_pkg.rewards.fn"])`` maps the names a YAML ``reward_funcs:`` list
holds (built-in names or dotted import paths, like TRL's ``GRPOScriptArguments``) to callables.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import os
import re
import sys
import threading
from collections.abc import Callable

from trl_jax.data.decode import strip_reasoning

__all__ = [
    "REWARD_FUNCS",
    "accuracy_reward",
    "completion_text",
    "digit_match_reward",
    "exact_match_reward",
    "get_cosine_scaled_reward",
    "get_repetition_penalty_reward",
    "get_soft_overlong_punishment",
    "is_math_verify_available",
    "reasoning_accuracy_reward",
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


def is_math_verify_available() -> bool:
    """Whether the ``math_verify`` package (``pip install math-verify``) can be imported."""
    return importlib.util.find_spec("math_verify") is not None


def _gold_column(answer, solution, kwargs, func_name, prefer="answer"):
    first, second = (answer, solution) if prefer == "answer" else (solution, answer)
    gold = second if first is None else first
    if gold is None:
        raise ValueError(
            f"{func_name} needs an `answer` or `solution` column in the dataset (the reference answer of each "
            f"prompt); got columns {sorted(kwargs)}."
        )
    return gold


def _score_answers(completions, gold, score) -> list[float | None]:
    """``score(text, ref)`` of each completion (reasoning block removed, stripped) against its stripped reference
    answer; ``None`` where there is no reference."""
    return [None if ref is None else score(strip_reasoning(completion_text(c)).strip(), str(ref).strip())
            for c, ref in zip(completions, gold, strict=True)]


def exact_match_reward(completions, answer=None, solution=None, **kwargs) -> list[float | None]:
    """1.0 when the completion equals the reference answer, else 0.0; ``None`` where there is no reference.

    The reference comes from the dataset's ``answer`` column, else ``solution`` (TRL's column name). Both sides are
    compared as strings after ``strip()``; a ``<think>...</think>`` block before the answer is ignored. For plain
    answers ("42", "0123") where TRL's ``math_verify`` check needs LaTeX (it scores a bare ``42`` as 0.0).
    """
    gold = _gold_column(answer, solution, kwargs, "exact_match_reward")
    return _score_answers(completions, gold, lambda text, ref: 1.0 if text == ref else 0.0)


def _math_verify_timeouts():
    """TRL's: math_verify times out with ``signal.alarm``, which works only in the main thread."""
    if threading.current_thread() is threading.main_thread():
        return 10, 5
    logging.getLogger("math_verify.parser").setLevel(logging.ERROR)
    logging.getLogger("math_verify.grader").setLevel(logging.ERROR)
    return None, None


def _math_verify_scores(contents, gold, log_extra=None) -> list[float | None]:
    """TRL 1.16's ``accuracy_reward`` loop: gold parsed freely, the answer as LaTeX (boxed first), ``verify``."""
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig, parse, verify

    parsing_timeout, verify_timeout = _math_verify_timeouts()
    rewards: list[float | None] = []
    gold_strs, answer_strs = [], []
    for content, sol in zip(contents, gold, strict=True):
        if content is None:  # reasoning not closed: TRL's reasoning_accuracy_reward gives 0.0
            rewards.append(0.0)
            gold_strs.append("[incomplete reasoning]")
            answer_strs.append("[incomplete reasoning]")
            continue
        gold_parsed = [] if sol is None else parse(str(sol), parsing_timeout=parsing_timeout)
        if len(gold_parsed) != 0:
            answer_parsed = parse(
                content,
                extraction_config=[
                    LatexExtractionConfig(
                        normalization_config=NormalizationConfig(units=True),
                        boxed_match_priority=0,
                        try_extract_without_anchor=False,
                    )
                ],
                extraction_mode="first_match",
                parsing_timeout=parsing_timeout,
            )
            rewards.append(float(verify(gold_parsed, answer_parsed, timeout_seconds=verify_timeout)))
            gold_strs.append(str(gold_parsed))
            answer_strs.append(str(answer_parsed) if answer_parsed else "[unparseable]")
        else:
            rewards.append(None)
            gold_strs.append("[unparseable]")
            answer_strs.append("[skipped]")
    if log_extra is not None:
        log_extra("solution", list(gold))
        log_extra("gold_parsed", gold_strs)
        log_extra("answer_parsed", answer_strs)
    return rewards


def accuracy_reward(completions, solution=None, log_extra=None, answer=None, **kwargs) -> list[float | None]:
    r"""TRL's ``accuracy_reward``: 1.0 when the completion's answer is mathematically equal to the reference.

    With ``math_verify`` installed this is TRL 1.16's rule exactly: the reference is parsed by ``math_verify``
    (``None`` -- skip the example -- when it does not parse), the completion as LaTeX with ``\boxed{}`` tried first
    (a bare ``42`` outside ``$...$`` / ``\boxed{}`` does not count), and the two compared with ``verify``
    (``\boxed{\frac{63}{400}}`` equals ``0.1575``). ``log_extra`` (TRL's trainer hook) receives the solution and
    both parses. Without ``math_verify`` it falls back to :func:`exact_match_reward` (string equality after
    stripping whitespace and any ``<think>`` block).

    The reference comes from the ``solution`` column (TRL's name; TRL's positional order), else ``answer``.
    Completions may be strings or TRL's ``[{"role": "assistant", "content": ...}]``.
    """
    gold = _gold_column(answer, solution, kwargs, "accuracy_reward", prefer="solution")
    if not is_math_verify_available():
        return exact_match_reward(completions, answer=gold)
    return _math_verify_scores([completion_text(c) for c in completions], list(gold), log_extra)


def reasoning_accuracy_reward(completions, solution=None, reasoning_delimiters=None, log_extra=None, answer=None,
                              **kwargs) -> list[float | None]:
    """TRL's ``reasoning_accuracy_reward``: :func:`accuracy_reward` on the text after the reasoning.

    The answer is what follows the last occurrence of the first delimiter of ``reasoning_delimiters`` (default
    ``["</think>"]``) found in the completion; a completion without any delimiter gets 0.0 (incomplete reasoning
    is penalised, not skipped). Without ``math_verify``, the answer part is compared by exact match.
    """
    gold = _gold_column(answer, solution, kwargs, "reasoning_accuracy_reward", prefer="solution")
    if reasoning_delimiters is None:
        reasoning_delimiters = ["</think>"]
    contents: list[str | None] = []
    for completion in completions:
        content = completion_text(completion)
        for delim in reasoning_delimiters:
            if delim in content:
                contents.append(content.split(delim)[-1])
                break
        else:
            contents.append(None)
    if is_math_verify_available():
        return _math_verify_scores(contents, list(gold), log_extra)
    out: list[float | None] = []
    for content, ref in zip(contents, gold, strict=True):
        if content is None:
            out.append(0.0)
        elif ref is None:
            out.append(None)
        else:
            out.append(1.0 if content.strip() == str(ref).strip() else 0.0)
    return out


class _CosineScaledReward:
    """Callable class (picklable); ``__name__`` is TRL's."""

    __name__ = "cosine_scaled_reward"

    def __init__(self, max_len, min_value_wrong, max_value_wrong, min_value_correct, max_value_correct):
        if max_len <= 0:
            raise ValueError(f"get_cosine_scaled_reward: max_len must be positive (tokens), got {max_len}.")
        self.max_len = max_len
        self.min_value_wrong = min_value_wrong
        self.max_value_wrong = max_value_wrong
        self.min_value_correct = min_value_correct
        self.max_value_correct = max_value_correct

    def __call__(self, completions, solution=None, completion_ids=None, answer=None, **kwargs):
        if completion_ids is None:
            raise ValueError("cosine_scaled_reward needs `completion_ids` (the trainers pass them; pass the token ids "
                             "of each completion when calling it directly).")
        gold = _gold_column(answer, solution, kwargs, "cosine_scaled_reward", prefer="solution")
        is_correct = accuracy_reward(completions, solution=gold, **kwargs)
        rewards: list[float | None] = []
        for correct, ids in zip(is_correct, completion_ids, strict=True):
            if correct is None:
                rewards.append(None)
                continue
            cosine = math.cos(min(len(ids) / self.max_len, 1.0) * math.pi)
            if correct:
                lo, hi = self.min_value_correct, self.max_value_correct
            else:
                lo, hi = self.max_value_wrong, self.min_value_wrong
            rewards.append(float(lo + 0.5 * (hi - lo) * (1.0 + cosine)))
        return rewards


def get_cosine_scaled_reward(max_len: int, min_value_wrong: float = -1.0, max_value_wrong: float = -0.5,
                             min_value_correct: float = 0.5, max_value_correct: float = 1.0) -> Callable:
    """TRL's cosine length-scaled correctness reward ("Demystifying Long Chain-of-Thought Reasoning", App. C.1).

    Correctness is :func:`accuracy_reward`'s; with ``p = min(len(completion_ids) / max_len, 1)``, a correct
    completion gets ``lo + (hi - lo)(1 + cos(pi p)) / 2`` with ``(lo, hi) = (min_value_correct,
    max_value_correct)`` (shorter is better), a wrong one the same with ``(lo, hi) = (max_value_wrong,
    min_value_wrong)`` (shorter is penalised more); ``None`` where the reference does not parse.
    """
    return _CosineScaledReward(max_len, min_value_wrong, max_value_wrong, min_value_correct, max_value_correct)


class _RepetitionPenalty:
    """Callable class (picklable); ``__name__`` is TRL's."""

    __name__ = "repetition_penalty_reward"

    def __init__(self, ngram_size: int, max_penalty: float):
        if ngram_size < 1:
            raise ValueError(f"get_repetition_penalty_reward: ngram_size must be >= 1, got {ngram_size}.")
        self.ngram_size = int(ngram_size)
        self.max_penalty = max_penalty

    def __call__(self, completion_ids, **kwargs) -> list[float]:
        rewards = []
        for ids in completion_ids:
            ids = list(ids)
            if len(ids) < self.ngram_size:
                rewards.append(0.0)
                continue
            ngrams = list(zip(*[ids[i:] for i in range(self.ngram_size)], strict=False))
            scaling = 1 - len(set(ngrams)) / len(ngrams)
            rewards.append(scaling * self.max_penalty if scaling else 0.0)
        return rewards


def get_repetition_penalty_reward(ngram_size: int = 3, max_penalty: float = -1.0) -> Callable:
    """TRL's repeated-n-gram penalty on ``completion_ids``: ``(1 - #unique / #total n-grams) * max_penalty``.

    0.0 for completions shorter than ``ngram_size`` tokens or without repeats; ``max_penalty`` must be <= 0.
    """
    if max_penalty > 0:
        raise ValueError(f"max_penalty {max_penalty} should not be positive")
    return _RepetitionPenalty(ngram_size, max_penalty)


def digit_match_reward(completions, answer=None, solution=None, **kwargs) -> list[float | None]:
    """Graded correctness for plain-text answers: the fraction of positions where completion and answer agree.

    ``score = #{i : c[i] == a[i]} / max(len(c), len(a))`` on the stripped texts (reasoning block removed), so an
    exact answer scores 1.0, ``"1243"`` for ``"1234"`` 0.5, a right answer with extra characters less than 1, an
    empty completion 0.0; ``None`` where there is no reference. Meant for the shipped digit/arithmetic tasks
    (``builtin:arithmetic_prompts``), where an exact-match reward gives most pairs of samples a tie.
    """
    gold = _gold_column(answer, solution, kwargs, "digit_match_reward")

    def score(text, ref):
        width = max(len(text), len(ref))
        return sum(a == b for a, b in zip(text, ref)) / width if width else 1.0

    return _score_answers(completions, gold, score)


_THINK_PATTERN = re.compile(r"^<think>(?!.*<think>)(.*?)</think>.*$", re.DOTALL | re.MULTILINE)


def think_format_reward(completions, **kwargs) -> list[float]:
    """1.0 when the completion is ``<think>reasoning</think>answer`` with a single think block (TRL's regex)."""
    return [1.0 if _THINK_PATTERN.match(completion_text(c)) else 0.0 for c in completions]


class _SoftOverlongPunishment:
    """Callable class (picklable); ``__name__`` is TRL's, so the metric is ``rewards/soft_overlong_punishment_reward``."""

    __name__ = "soft_overlong_punishment_reward"

    def __init__(self, max_completion_len: int, soft_punish_cache: int):
        if soft_punish_cache < 0 or max_completion_len < soft_punish_cache:
            raise ValueError(
                f"get_soft_overlong_punishment needs 0 <= soft_punish_cache ({soft_punish_cache}) <= "
                f"max_completion_len ({max_completion_len})."
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
            elif n <= lmax:  # never reached with cache == 0
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
    "reasoning_accuracy_reward": reasoning_accuracy_reward,
    "think_format_reward": think_format_reward,
    # TRL's CLI registry entry uses these values.
    "get_soft_overlong_punishment": get_soft_overlong_punishment(max_completion_len=1280, soft_punish_cache=256),
    "exact_match_reward": exact_match_reward,
    "digit_match_reward": digit_match_reward,
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
