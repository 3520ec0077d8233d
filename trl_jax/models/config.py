"""Model configuration: an HF ``config.json`` (via ``transformers.AutoConfig``) -> :class:`ModelConfig`.

One decoder covers the Llama family (Llama, Mistral, Qwen2, Qwen3), Gemma 2, Gemma 3 (text), Phi-3 and the
mixtures of experts Qwen3-MoE and Mixtral.
``ModelConfig`` holds the architecture (read from the HF config: the shared fields, then one small function per
family in :data:`_FAMILY_TRAITS`) and the JAX knobs (compute ``dtype``, ``param_dtype``, ``scan_layers``,
``remat_policy``, ``attention_impl``, ``moe_impl``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

# model_type -> (causal-LM class name, sequence-classification class name)
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "LlamaForSequenceClassification"),
    "mistral": ("MistralForCausalLM", "MistralForSequenceClassification"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3ForSequenceClassification"),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2ForSequenceClassification"),
    "gemma3_text": ("Gemma3ForCausalLM", "Gemma3TextForSequenceClassification"),
    "phi3": ("Phi3ForCausalLM", "Phi3ForSequenceClassification"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeForSequenceClassification"),
    "mixtral": ("MixtralForCausalLM", "MixtralForSequenceClassification"),
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "longrope")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")  # see trl_jax.models.attention.attend
MOE_IMPLS = ("auto", "dense", "ragged")  # expert dispatch, see trl_jax.models.moe.resolve_moe_impl
NO_WINDOW = 2**30  # a sliding window this wide is no window


# transformers' (torch) ``attn_implementation`` names -> the JAX kernel choice that plays their part
TORCH_ATTN_IMPLEMENTATIONS = {
    "eager": "xla",
    "sdpa": "xla",
    "flex_attention": "xla",
    "flash_attention_2": "auto",
    "flash_attention_3": "auto",
    "kernels-community/flash-attn": "auto",
    "kernels-community/vllm-flash-attn3": "auto",
}


def resolve_attn_implementation(value) -> str:
    """TRL/transformers' ``attn_implementation`` -> :attr:`ModelConfig.attention_impl`.

    ``None`` -> ``"auto"``; ``auto``/``xla``/``cudnn``/``splash`` as they are; transformers' torch names map
    (``eager``/``sdpa`` -> ``xla``, ``flash_attention_2``/``_3`` -> ``auto``) with one warning line; anything else
    is a ``ValueError`` naming the choices.
    """
    if value is None:
        return "auto"
    name = str(value).strip()
    if name in ATTENTION_IMPLS:
        return name
    if name in TORCH_ATTN_IMPLEMENTATIONS:
        impl = TORCH_ATTN_IMPLEMENTATIONS[name]
        import logging

        logging.getLogger("trl_jax").warning(
            "attn_implementation=%r is a transformers (torch) kernel; trl_jax uses attn_implementation=%r "
            "(choices: %s).", name, impl, ", ".join(ATTENTION_IMPLS))
        return impl
    raise ValueError(
        f"attn_implementation {value!r} is unknown; choose one of {', '.join(ATTENTION_IMPLS)} (auto: splash on "
        f"TPU, cuDNN on GPU, XLA on CPU), or a transformers name that maps to one: "
        f"{', '.join(sorted(TORCH_ATTN_IMPLEMENTATIONS))}."
    )


def _dtype(x):
    return jnp.dtype(x) if x is not None else None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture + runtime options of the decoder. Build with :func:`config_from_hf`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2: True; Llama/Qwen3: attention_bias)
    o_bias: bool = False  # bias on o_proj (Llama/Qwen3 attention_bias)
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over head_dim on q and k before RoPE
    norm_unit_offset: bool = False  # Gemma: RMSNorm scales by (1 + w), multiplied in fp32 before the cast back
    embedding_multiplier: float | None = None  # Gemma: embeddings times sqrt(hidden_size) (in the compute dtype)
    sandwich_norms: bool = False  # Gemma 2/3: norms on the attention and MLP outputs, and a pre-MLP norm
    query_pre_attn_scalar: float | None = None  # Gemma: attention scale = query_pre_attn_scalar**-0.5
    attn_logit_softcapping: float | None = None  # Gemma 2: scores = cap * tanh(scores / cap) before the mask
    final_logit_softcapping: float | None = None  # Gemma 2/3: logits = cap * tanh(logits / cap)
    num_experts: int = 0  # mixture of experts (Qwen3-MoE, Mixtral); 0 = dense MLP everywhere
    num_experts_per_tok: int = 0  # top-k
    moe_intermediate_size: int | None = None  # each expert's MLP width
    norm_topk_prob: bool = True  # renormalize the top-k routing probabilities (Mixtral always; Qwen3-MoE per config)
    router_aux_loss_coef: float = 0.0  # transformers' load-balancing loss weight (see trl_jax.models.moe)
    # Qwen3-MoE: layers i with (i + 1) % decoder_sparse_step == 0 and i not in mlp_only_layers have experts, the
    # others a dense MLP of intermediate_size (transformers' Qwen3MoeDecoderLayer rule); see is_sparse_layer
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    max_position_embeddings: int = 2048
    rope_type: str = "default"
    rope_theta: float = 10000.0
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    partial_rotary_factor: float = 1.0
    rope_short_factor: tuple[float, ...] | None = None  # longrope (Phi-3): per-frequency divisors, short inputs
    rope_long_factor: tuple[float, ...] | None = None  # longrope: beyond rope_original_max_position_embeddings
    rope_attention_factor: float = 1.0  # longrope: cos/sin multiplier
    rope_local_theta: float | None = None  # Gemma 3: sliding-window layers use default RoPE with this base
    sliding_windows: tuple[int | None, ...] | None = None  # per layer; None = full attention everywhere
    pad_token_id: int | None = None
    num_labels: int | None = None  # set for *ForSequenceClassification heads
    has_lm_head: bool = True  # False for *ForSequenceClassification checkpoints (untied: no lm_head.weight)
    # runtime (JAX) options
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = True
    remat_policy: str = "none"
    attention_impl: str = "auto"
    moe_impl: str = "auto"  # expert dispatch: "dense", "ragged" (grouped matmuls), "auto" (trl_jax.models.moe)
    lora: Any = None  # trl_jax.models.lora.LoraSpec: LoRA adapters on the projections it targets
    quantization: str | None = None  # "nf4" / "fp4": projection kernels held in 4 bits (QLoRA's frozen base);
    # "int8": held in 8 bits, bitsandbytes' LLM.int8 matmul with outlier columns above llm_int8_threshold
    llm_int8_threshold: float = 6.0

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})."
            )
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_type {self.rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}.")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r} is unknown; choose one of {REMAT_POLICIES}.")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl {self.attention_impl!r} is unknown; choose one of {ATTENTION_IMPLS}.")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_experts "
                             f"({self.num_experts}).")
        if self.moe_impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl {self.moe_impl!r} is unknown; choose one of {MOE_IMPLS}.")
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}.")
        if self.mixed_layers and self.scan_layers:
            raise ValueError(
                "This mixture-of-experts model mixes expert and dense-MLP layers (decoder_sparse_step > 1 or "
                "mlp_only_layers); scanned layers share one parameter layout: set `scan_layers: false`.")
        if self.lora is not None and self.scan_layers and not self.lora.uniform:
            raise ValueError(
                "These LoRA targets differ between layers (layers_to_transform, or a target_modules regex naming "
                "layers); scanned layers share one layout: set `scan_layers: false`.")
        if self.sliding_windows is not None and len(self.sliding_windows) != self.num_hidden_layers:
            raise ValueError("sliding_windows must give one entry (int or None) per layer.")

    @property
    def attention_scale(self) -> float:
        """Multiplier of ``q . k``: ``query_pre_attn_scalar**-0.5`` (Gemma) or ``head_dim**-0.5``."""
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def is_sparse_layer(self, layer: int | None) -> bool:
        """Whether layer ``layer`` has experts (``None``: scanned layers, all of one kind)."""
        if not self.num_experts:
            return False
        if layer is None:
            return not self.mixed_layers and self.is_sparse_layer(0)
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0

    @property
    def sparse_layers(self) -> tuple[int, ...]:
        """Indices of the layers with experts (their router logits are what the load-balancing loss sees)."""
        return tuple(i for i in range(self.num_hidden_layers) if self.is_sparse_layer(i))

    @property
    def mixed_layers(self) -> bool:
        """Expert layers and dense-MLP layers in one model (Qwen3-MoE's decoder_sparse_step / mlp_only_layers)."""
        return 0 < len(self.sparse_layers) < self.num_hidden_layers if self.num_experts else False

    @property
    def has_sliding_window(self) -> bool:
        return self.sliding_windows is not None and any(w is not None for w in self.sliding_windows)

    def window_array(self) -> tuple[int, ...]:
        """Per-layer window widths, ``NO_WINDOW`` where a layer attends to everything."""
        ws = self.sliding_windows or (None,) * self.num_hidden_layers
        return tuple(NO_WINDOW if w is None else int(w) for w in ws)

    def replace(self, **kw) -> "ModelConfig":
        if "dtype" in kw:
            kw["dtype"] = _dtype(kw["dtype"])
        if "param_dtype" in kw:
            kw["param_dtype"] = _dtype(kw["param_dtype"])
        return dataclasses.replace(self, **kw)


def _unsupported(model_type) -> ValueError:
    supported = ", ".join(f"{k} ({v[0]}, {v[1]})" for k, v in SUPPORTED_ARCHITECTURES.items())
    return ValueError(
        f"Unsupported architecture: model_type={model_type!r}. trl_jax.models supports: {supported}. "
        "Use one of these checkpoints, or wrap your own Flax model with trl_jax.models.FlaxModelAdapter."
    )


def _rope_parameters(c) -> dict:
    """The checkpoint's (global) RoPE parameters: transformers >=5 ``rope_parameters`` (standardized from the legacy
    ``rope_scaling``); per-layer-type dicts (Gemma 3) give their ``full_attention`` entry."""
    rp = dict(getattr(c, "rope_parameters", None) or {})
    legacy = getattr(c, "rope_scaling", None)
    if not rp and isinstance(legacy, dict):
        rp = dict(legacy)
    if isinstance(rp.get("full_attention"), dict):
        rp = dict(rp["full_attention"])
    return rp


def _layer_windows(c, *, every_layer: bool):
    """Per-layer sliding windows: ``sliding_window`` on every layer (Mistral, Phi-3) or on the layers that
    ``layer_types`` marks ``sliding_attention`` (Qwen2/3, Gemma). ``None`` when no layer has one."""
    sw = getattr(c, "sliding_window", None)
    if sw is None:
        return None
    if every_layer:
        return (int(sw),) * c.num_hidden_layers
    lt = getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers
    windows = tuple(int(sw) if t == "sliding_attention" else None for t in lt)
    return None if all(w is None for w in windows) else windows


def _llama(c) -> dict:
    bias = bool(getattr(c, "attention_bias", False))
    return dict(qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(c, "mlp_bias", False)))


def _mistral(c) -> dict:
    return dict(sliding_windows=_layer_windows(c, every_layer=True))


def _qwen2(c) -> dict:
    return dict(qkv_bias=True, sliding_windows=_layer_windows(c, every_layer=False))


def _qwen3(c) -> dict:
    return dict(_llama(c), mlp_bias=False, qk_norm=True, sliding_windows=_layer_windows(c, every_layer=False))


def _gemma2(c) -> dict:
    bias = bool(getattr(c, "attention_bias", False))
    if getattr(c, "use_bidirectional_attention", False):
        raise ValueError("use_bidirectional_attention=True (Gemma encoder use) is not supported by trl_jax.models.")
    return dict(
        qkv_bias=bias, o_bias=bias, norm_unit_offset=True, embedding_multiplier=float(c.hidden_size) ** 0.5,
        sandwich_norms=True, hidden_act=c.hidden_activation, query_pre_attn_scalar=c.query_pre_attn_scalar,
        attn_logit_softcapping=getattr(c, "attn_logit_softcapping", None),
        final_logit_softcapping=getattr(c, "final_logit_softcapping", None),
        sliding_windows=_layer_windows(c, every_layer=False),
    )


def _gemma3_text(c) -> dict:
    local = dict((getattr(c, "rope_parameters", None) or {}).get("sliding_attention") or {})
    if local.get("rope_type", "default") != "default":
        raise ValueError(f"Gemma 3 sliding-layer rope_type {local.get('rope_type')!r} is not supported; "
                         "trl_jax.models supports 'default' there.")
    # transformers' Gemma 3 attention passes no softcap to its kernels: attn_logit_softcapping is not applied
    return dict(_gemma2(c), attn_logit_softcapping=None, qk_norm=True,
                rope_local_theta=float(local.get("rope_theta", getattr(c, "rope_local_base_freq", 10000.0))))


def _phi3(c) -> dict:
    return dict(sliding_windows=_layer_windows(c, every_layer=True))


def _qwen3_moe(c) -> dict:
    # num_experts == 0: every layer a dense MLP of intermediate_size (transformers' rule), i.e. a Qwen3 model
    return dict(_qwen3(c), num_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
                moe_intermediate_size=c.moe_intermediate_size, norm_topk_prob=bool(c.norm_topk_prob),
                router_aux_loss_coef=float(c.router_aux_loss_coef),
                decoder_sparse_step=int(getattr(c, "decoder_sparse_step", 1) or 1),
                mlp_only_layers=tuple(int(i) for i in (getattr(c, "mlp_only_layers", None) or ())))


def _mixtral(c) -> dict:
    return dict(_mistral(c), num_experts=c.num_local_experts, num_experts_per_tok=c.num_experts_per_tok,
                moe_intermediate_size=c.intermediate_size, norm_topk_prob=True,
                router_aux_loss_coef=float(c.router_aux_loss_coef))


# model_type -> the ModelConfig fields its family sets beyond the shared ones (names from transformers' configs)
_FAMILY_TRAITS = {
    "llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3,
    "gemma2": _gemma2, "gemma3_text": _gemma3_text, "phi3": _phi3, "qwen3_moe": _qwen3_moe, "mixtral": _mixtral,
}


def _longrope(rp: dict, c) -> dict:
    """LongRoPE (Phi-3): short/long factors and the cos/sin multiplier transformers derives when none is given."""
    import math

    orig = int(rp.get("original_max_position_embeddings", getattr(c, "original_max_position_embeddings", None)
                      or c.max_position_embeddings))
    factor = rp.get("factor") or c.max_position_embeddings / orig
    attn = rp.get("attention_factor")
    if attn is None:
        attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    return dict(rope_short_factor=tuple(float(x) for x in rp["short_factor"]),
                rope_long_factor=tuple(float(x) for x in rp["long_factor"]),
                rope_attention_factor=float(attn), rope_original_max_position_embeddings=orig)


def config_from_hf(hf_config, **runtime) -> ModelConfig:
    """Build a :class:`ModelConfig` from a ``transformers.PretrainedConfig`` (no torch needed).

    ``runtime`` sets the JAX options: ``dtype``, ``param_dtype``, ``scan_layers``, ``remat_policy``,
    ``attention_impl``, ``moe_impl``. Raises ``ValueError`` naming the supported architectures for anything else.
    A model whose layers mix experts and dense MLPs (Qwen3-MoE ``decoder_sparse_step`` / ``mlp_only_layers``)
    gets unrolled layers (``scan_layers=False``, one log line) where scanned ones were asked for.
    """
    mt = getattr(hf_config, "model_type", None)
    if mt not in SUPPORTED_ARCHITECTURES:
        raise _unsupported(mt)
    c = hf_config
    n_heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_heads
    rp = _rope_parameters(c)
    rope_type = rp.get("rope_type", rp.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_type {rope_type!r} (from the checkpoint's rope_parameters) is not supported by trl_jax.models; "
            f"supported: {SUPPORTED_ROPE_TYPES}."
        )
    rope_theta = rp.get("rope_theta", getattr(c, "rope_theta", 10000.0))
    num_labels = None
    archs = getattr(c, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        num_labels = c.num_labels
    fields = dict(
        model_type=mt,
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=getattr(c, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim,
        rms_norm_eps=c.rms_norm_eps,
        hidden_act=getattr(c, "hidden_act", "silu"),
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        max_position_embeddings=c.max_position_embeddings,
        rope_type=rope_type,
        rope_theta=float(rope_theta),
        rope_factor=float(rp.get("factor", 1.0) or 1.0),
        rope_low_freq_factor=float(rp.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rp.get("high_freq_factor", 4.0)),
        rope_original_max_position_embeddings=int(
            rp.get("original_max_position_embeddings", c.max_position_embeddings)
        ),
        partial_rotary_factor=float(rp.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0))),
        pad_token_id=getattr(c, "pad_token_id", None),
        num_labels=num_labels,
        has_lm_head=num_labels is None,
    )
    if rope_type == "longrope":
        fields.update(_longrope(rp, c))
    fields.update(_FAMILY_TRAITS[mt](c))
    probe = ModelConfig(**{**fields, "scan_layers": False})
    if probe.mixed_layers and runtime.get("scan_layers", True):
        import logging

        logging.getLogger("trl_jax").warning(
            "%s: layers %s have experts, the others a dense MLP; scanned layers share one layout, so this model "
            "runs with unrolled layers (scan_layers=False).", mt, list(probe.sparse_layers))
        runtime = {**runtime, "scan_layers": False}
        fields["scan_layers"] = False
    cfg = ModelConfig(**fields)
    return cfg.replace(**runtime) if runtime else cfg


def load_hf_config(path_or_id: str, **kw):
    """``transformers.AutoConfig.from_pretrained`` (reads config.json; no torch)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path_or_id, **kw)
