"""Built-in offline assets: a character-level ChatML tokenizer and tiny random-init models for the quickstarts.

Nothing is downloaded. ``builtin:<name>`` model ids (accepted wherever a model path is) are materialised once into
``$TRL_JAX_CACHE`` (default ``~/.cache/trl_jax``) as ordinary HF directories — ``config.json``,
``model.safetensors``, tokenizer files — written by trl_jax's own ``save_pretrained``, then loaded through the same
``from_pretrained`` path as any checkpoint. The weights are random (seeded): the quickstarts train from scratch on
the shipped arithmetic data, so the loss falls quickly on a laptop CPU.
"""

from __future__ import annotations

import os
import string
import tempfile

CHATML_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\nTools: ' + (tools | tojson) + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
REASONING_TOKENS = ["<think>", "</think>"]

BUILTIN_MODELS = {
    # name: (architecture config kwargs, seed)
    "tiny-qwen3": dict(
        model_type="qwen3", hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
    "small-qwen3": dict(
        model_type="qwen3", hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
}
BUILTIN_PREFIX = "builtin:"


def build_char_tokenizer():
    """A ``PreTrainedTokenizerFast``: one token per printable ASCII character plus ChatML and reasoning markers.

    ``<|im_end|>`` is EOS, ``<|endoftext|>`` is padding; the chat template marks assistant turns with
    ``{% generation %}`` so ``assistant_only_loss`` works.
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + REASONING_TOKENS + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.add_tokens(REASONING_TOKENS)
    fast.chat_template = CHATML_TEMPLATE
    return fast


def cache_dir() -> str:
    return os.environ.get("TRL_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "trl_jax"))


def is_builtin(model_id) -> bool:
    return isinstance(model_id, str) and model_id.startswith(BUILTIN_PREFIX)


def builtin_model_dir(model_id: str, seed: int = 0) -> str:
    """Materialise ``builtin:<name>`` (once; atomic rename) and return its HF directory."""
    name = model_id[len(BUILTIN_PREFIX):] if is_builtin(model_id) else model_id
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {model_id!r}; available: "
                         f"{', '.join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)}")
    target = os.path.join(cache_dir(), f"{name}-seed{seed}")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    import jax
    from transformers import AutoConfig

    from trl_jax.models import CausalLM, config_from_hf, save_pretrained

    tokenizer = build_char_tokenizer()
    kwargs = dict(BUILTIN_MODELS[name])
    model_type = kwargs.pop("model_type")
    hf_config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, architectures=["Qwen3ForCausalLM"], **kwargs,
    )
    model = CausalLM(config_from_hf(hf_config), hf_config=hf_config)
    params = model.init_params(jax.random.PRNGKey(seed))
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir())
    save_pretrained(model, params, tmp, tokenizer=tokenizer)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race; use its copy
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(model_id):
    """``builtin:<name>`` -> its materialised directory; anything else is checked (:func:`check_model_path`) and
    returned unchanged."""
    if is_builtin(model_id):
        return builtin_model_dir(model_id)
    check_model_path(model_id)
    return model_id


def _model_path_error_class():
    from trl_jax.configs import UsageError

    class ModelPathError(UsageError):
        """A model path / hub id that names no loadable model."""

    return ModelPathError


ModelPathError = _model_path_error_class()


def _expected() -> str:
    return ("expected a local Hugging Face model directory (config.json + *.safetensors, e.g. the output_dir of an "
            "earlier trl-jax run), a PEFT adapter directory (adapter_config.json), a Hugging Face Hub id such as 'Qwen/Qwen3-0.6B', or a built-in model ("
            + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS) + ")")


def check_model_path(model_id, what: str = "model_name_or_path") -> None:
    """Refuse, with a :class:`ModelPathError` that names the path and what was expected, a model id that is an
    existing file or a directory without ``config.json``, that looks like a filesystem path but does not exist, or
    that is not a valid hub id. A valid hub id is left to the hub download (:func:`model_path_error`)."""
    if is_builtin(model_id):
        return
    text = os.fspath(model_id)
    path = os.path.expanduser(text)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(
                os.path.join(path, "adapter_config.json")):  # a PEFT adapter directory names its base model
            raise ModelPathError(f"{what} {text!r} is a directory without config.json; {_expected()}.")
        return
    if os.path.exists(path):
        raise ModelPathError(f"{what} {text!r} is a file, not a model directory; {_expected()}.")
    looks_like_path = (text.startswith(("/", ".", "~")) or text.endswith(("/", os.sep)) or text.count("/") > 1
                       or (os.sep != "/" and os.sep in text))
    if looks_like_path:
        raise ModelPathError(f"{what} {text!r} does not exist (no such directory, relative to {os.getcwd()}); "
                             f"{_expected()}.")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError as e:
        raise ModelPathError(f"{what} {text!r} is neither an existing local directory nor a valid hub id "
                             f"({str(e).splitlines()[0]}); {_expected()}.") from None


def model_path_error(model_id: str, exc: BaseException, what: str = "model_name_or_path") -> Exception:
    """The error for a hub id whose download failed (not cached offline, unknown, gated, unreachable)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, LocalEntryNotFoundError) or constants.HF_HUB_OFFLINE:
        why = ("it is not in the local Hugging Face cache and the hub is offline (HF_HUB_OFFLINE=1; unset it to "
               "download)")
    elif isinstance(exc, GatedRepoError):
        why = "the hub repository is gated: accept its terms on the hub and log in (`hf auth login`)"
    elif isinstance(exc, RevisionNotFoundError):
        why = "the hub repository has no such revision"
    elif isinstance(exc, RepositoryNotFoundError):
        why = "the hub has no such repository (or it is private: log in with `hf auth login`)"
    else:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        why = f"the hub could not be reached ({type(exc).__name__}: {first})"
    return ModelPathError(f"{what} {model_id!r}: no local directory of that name (relative to {os.getcwd()}), and "
                          f"{why}; {_expected()}.")
