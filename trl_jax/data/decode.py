"""Turn generated token ids into the text that reward functions score.

Reasoning-block policy (markers configurable, default ``<think>`` / ``</think>``):

* no marker at all                  -> the decoded text, unchanged;
* a complete block ``<think>..</think>answer`` -> ``answer`` (text after the *last* closing marker, stripped of
  surrounding whitespace);
* only a closing marker (the chat template opened the block inside the prompt) -> what follows it, stripped;
* an opened block that is never closed (a generation truncated mid-thought), including a new block opened after
  the last closing marker -> ``""``: there is no answer to score.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_THINK_START = "<think>"
DEFAULT_THINK_END = "</think>"


def strip_reasoning(text: str, think_start: str | None = DEFAULT_THINK_START, think_end: str | None = DEFAULT_THINK_END) -> str:
    """Apply the reasoning-block policy above to one decoded string. ``None`` markers disable the policy."""
    if not think_start or not think_end:
        return text
    close = text.rfind(think_end)
    if close >= 0:
        answer = text[close + len(think_end):]
        return "" if think_start in answer else answer.strip()
    if think_start in text:
        return ""
    return text


def _marker_ids(tokenizer, markers: Sequence[str]) -> set[int]:
    ids = set()
    vocab = tokenizer.get_vocab()
    for m in markers:
        if m and m in vocab:
            ids.add(vocab[m])
    return ids


def decode_and_strip_padding(
    input_ids,
    tokenizer,
    *,
    mask=None,
    think_start: str | None = DEFAULT_THINK_START,
    think_end: str | None = DEFAULT_THINK_END,
) -> list[str]:
    """Decode ``input_ids [B, T]`` to ``B`` strings for reward functions.

    Padding (``tokenizer.pad_token_id``, and positions where ``mask [B, T]`` is 0 when given) and special tokens
    are removed — except the reasoning markers themselves when the tokenizer registers them as special tokens, so
    the policy in this module's docstring can see them — then the reasoning-block policy is applied.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {ids.shape}")
    keep = np.ones_like(ids, dtype=bool) if mask is None else np.asarray(mask).astype(bool)
    if keep.shape != ids.shape:
        raise ValueError(f"mask shape {keep.shape} must equal input_ids shape {ids.shape}")
    markers = _marker_ids(tokenizer, [think_start or "", think_end or ""])
    drop = set(tokenizer.all_special_ids) - markers
    if tokenizer.pad_token_id is not None:
        drop.add(tokenizer.pad_token_id)
    drop_arr = np.array(sorted(drop), dtype=ids.dtype)
    keep &= ~np.isin(ids, drop_arr)
    texts = []
    for row, row_keep in zip(ids, keep, strict=True):
        text = tokenizer.decode(row[row_keep].tolist(), skip_special_tokens=False)
        texts.append(strip_reasoning(text, think_start, think_end))
    return texts
