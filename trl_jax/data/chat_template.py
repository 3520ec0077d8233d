"""Chat templates from the tokenizer: TRL's `apply_chat_template` semantics and tokenization of one example."""

from __future__ import annotations

import json
import re
from typing import Any

from .formats import is_conversational

__all__ = [
    "apply_chat_template",
    "maybe_apply_chat_template",
    "has_generation_markers",
    "tokenize_input",
    "common_prefix_length",
]

_SUPPORTED_KEY_SETS = (
    {"messages"},
    {"prompt"},
    {"prompt", "completion"},
    {"prompt", "chosen", "rejected"},
    {"chosen", "rejected"},
    {"prompt", "completion", "label"},
)
_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_markers(template: str | None) -> bool:
    """True when a chat template has `{% generation %}` blocks (needed for `assistant_only_loss`)."""
    return bool(template) and _GENERATION_RE.search(template) is not None


def _shared_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return a[:n]


def common_prefix_length(ids: list[int], other_ids: list[int]) -> int:
    """Number of leading tokens the two id lists share."""
    n = 0
    for x, y in zip(ids, other_ids, strict=False):
        if x != y:
            break
        n += 1
    return n


def apply_chat_template(example: dict[str, Any], tokenizer, tools: list | None = None,
                        **template_kwargs) -> dict[str, Any]:
    """Render a conversational example to strings exactly as `trl.apply_chat_template` does.

    Accepted key sets: `{messages}`, `{prompt}`, `{prompt, completion}`, `{prompt, chosen, rejected}`,
    `{chosen, rejected}`, `{prompt, completion, label}`. `messages` becomes `text`. The prompt is rendered with the
    generation prompt (last role user/tool) or as a continued final message (last role assistant), then cut to its
    longest common prefix with each rendered prompt+answer; answers are the rendered prompt+answer minus that
    prefix. A per-row `chat_template_kwargs` dict is passed to the template.
    """
    tools = tools or None
    keys = {k for k in example if k in ("prompt", "chosen", "rejected", "completion", "messages", "label")}
    if keys not in _SUPPORTED_KEY_SETS:
        raise KeyError(
            f"Invalid keys in the example: {keys}. Expected one of "
            + ", ".join(str(sorted(s)) for s in _SUPPORTED_KEY_SETS)
        )
    kwargs = {**example.get("chat_template_kwargs", {}), **template_kwargs}

    def render(messages, **extra):
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, **extra, **kwargs)

    out: dict[str, Any] = {}
    if "messages" in example:
        out["text"] = render(example["messages"])
    if "prompt" in example:
        last_role = example["prompt"][-1]["role"]
        if last_role in ("user", "tool"):
            prompt = render(example["prompt"], add_generation_prompt=True, continue_final_message=False)
        elif last_role == "assistant":
            prompt = render(example["prompt"], add_generation_prompt=False, continue_final_message=True)
        else:
            raise ValueError(f"Invalid role in the last message: {last_role}")
        full = {}
        for key in ("chosen", "rejected", "completion"):
            if key in example:
                full[key] = render(example["prompt"] + example[key])
                prompt = _shared_prefix(prompt, full[key])
        out["prompt"] = prompt
        for key, text in full.items():
            out[key] = text[len(prompt):]
    else:
        for key in ("chosen", "rejected"):
            if key in example:
                out[key] = render(example[key])
    if "label" in example:
        out["label"] = example["label"]
    # Keep TRL's key order: text, prompt, chosen, rejected, completion, label.
    order = ("text", "prompt", "chosen", "rejected", "completion", "label")
    return {k: out[k] for k in order if k in out}


def maybe_apply_chat_template(example: dict[str, Any], tokenizer, tools: list | None = None,
                              **template_kwargs) -> dict[str, Any]:
    """`apply_chat_template` for conversational examples; others are returned unchanged."""
    if is_conversational(example):
        return apply_chat_template(example, tokenizer, tools, **template_kwargs)
    return example


def tokenize_input(tokenizer, value: str | list, **chat_template_kwargs) -> dict[str, list]:
    """Tokenize a string with `tokenizer(text=...)` or a message list with `apply_chat_template(tokenize=True)`.

    Extra keyword arguments (`chat_template`, `tools`, `add_generation_prompt`, `return_assistant_tokens_mask`, ...)
    go to `apply_chat_template`; for strings only `chat_template` is accepted (and unused).
    """
    if isinstance(value, list):
        result = tokenizer.apply_chat_template(value, tokenize=True, return_dict=True, **chat_template_kwargs)
    else:
        result = tokenizer(text=value)
    return {k: list(v) for k, v in result.items()}


def row_tools(example: dict[str, Any]) -> list | None:
    """The row's `tools` column, decoded when stored as a JSON string (as TRL does)."""
    tools = example.get("tools")
    return json.loads(tools) if isinstance(tools, str) else tools
