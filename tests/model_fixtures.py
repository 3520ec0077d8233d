"""Tiny random transformers (PyTorch) models of every supported architecture, saved with ``save_pretrained``."""

from __future__ import annotations

import numpy as np
import torch
import transformers

VOCAB = 97
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    pad_token_id=0,
)

# name -> (config class name, extra config kwargs)
ARCHS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "llama_bias": ("LlamaConfig", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    "llama_linear": ("LlamaConfig", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0})),
    # max_position_embeddings below the test length, so the dynamic NTK base actually grows
    "llama_dynamic": ("LlamaConfig", dict(max_position_embeddings=8,
                                          rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})),
    "llama3": ("LlamaConfig", dict(rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "rope_theta": 10000.0})),
    "mistral": ("MistralConfig", dict(sliding_window=4, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=16, tie_word_embeddings=True)),
}

# Gemma 2, Gemma 3 (text), Phi-3: tests/test_models_architectures.py. Windows (4) shorter than the test sequences;
# soft-caps small enough to bite on random weights; Gemma 3 with a linear-scaled global RoPE and its own local base.
_LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 8,
             "short_factor": [1.0, 1.3, 1.7, 2.2], "long_factor": [2.0, 3.1, 4.5, 6.0]}
NEW_ARCHS: dict[str, tuple[str, dict]] = {
    "gemma2": ("Gemma2Config", dict(head_dim=16, num_hidden_layers=3, query_pre_attn_scalar=24, sliding_window=4,
                                    attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                                    hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)),
    "gemma3_text": ("Gemma3TextConfig", dict(
        head_dim=16, num_hidden_layers=3, query_pre_attn_scalar=12, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], final_logit_softcapping=4.0,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
        tie_word_embeddings=True)),
    # hidden 64 / 4 heads: head_dim 16, half of it rotated (4 longrope factors); original context 8 < test length
    "phi3": ("Phi3Config", dict(hidden_size=64, max_position_embeddings=32, sliding_window=5,
                                rope_parameters=dict(_LONGROPE, partial_rotary_factor=0.5),
                                tie_word_embeddings=False, pad_token_id=0)),
    # mixtures of experts: 4 experts, top 2 (Qwen3-MoE without renormalization, Mixtral always renormalizes)
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                         norm_topk_prob=False, tie_word_embeddings=False)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=5,
                                      tie_word_embeddings=True)),
}


def make_config(name: str, **overrides):
    cls_name, extra = {**ARCHS, **NEW_ARCHS}[name]
    kw = {**BASE, **extra, **overrides}
    return getattr(transformers, cls_name)(**kw)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (HF init zeroes biases and sets norms to 1, which would hide mapping bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.15
            p.copy_((1.0 + noise) if n.endswith("norm.weight") else noise)
    return model.eval()


def make_torch_model(name: str, kind: str = "causal", seed: int = 0, **overrides):
    config = make_config(name, **overrides)
    auto = {"causal": transformers.AutoModelForCausalLM,
            "seqcls": transformers.AutoModelForSequenceClassification}[kind]
    torch.manual_seed(seed)
    model = auto.from_config(config, attn_implementation="eager")
    return randomize_(model, seed)


def save_torch_model(model, path, **kw) -> str:
    model.save_pretrained(str(path), **kw)
    return str(path)


def torch_logits(model, input_ids, attention_mask=None, position_ids=None) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(np.asarray(input_ids), dtype=torch.long),
            attention_mask=None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask)),
            position_ids=None if position_ids is None else torch.as_tensor(np.asarray(position_ids), dtype=torch.long),
        )
    return out.logits.float().numpy()


def padded_batch(seed: int = 0, T: int = 12):
    """Rows: full, right-padded (7 tokens), left-padded (5 tokens). Returns ids, mask, positions (np int32)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(3, T)).astype(np.int32)
    mask = np.ones((3, T), np.int32)
    mask[1, 7:] = 0
    mask[2, : T - 5] = 0
    ids[mask == 0] = 0
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return ids, mask, pos


def packed_batch(seed: int = 1, T: int = 12):
    """Packed rows (padding-free): [5, 4, 3], [7, 5], [9 + 3 padding]. Returns ids, positions, segment_ids, docs."""
    rng = np.random.default_rng(seed)
    layouts = [[5, 4, 3], [7, 5], [9]]
    ids = np.zeros((3, T), np.int32)
    pos = np.zeros((3, T), np.int32)
    seg = np.zeros((3, T), np.int32)
    docs = []  # (row, start, length, tokens)
    for r, lens in enumerate(layouts):
        start = 0
        for s, n in enumerate(lens):
            toks = rng.integers(1, VOCAB, size=n).astype(np.int32)
            ids[r, start : start + n] = toks
            pos[r, start : start + n] = np.arange(n)
            seg[r, start : start + n] = s + 1
            docs.append((r, start, n, toks))
            start += n
    return ids, pos, seg, docs
