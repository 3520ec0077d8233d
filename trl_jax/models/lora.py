"""LoRA (and rsLoRA / DoRA) adapters on the decoder's linear layers, with PEFT's semantics and names.

A targeted projection ``y = x W (+ b)`` becomes (PEFT ``lora.Linear``)::

    y = x W (+ b) + scaling * (dropout(x) A) B            scaling = lora_alpha / r   (rsLoRA: lora_alpha / sqrt(r))

and with DoRA (PEFT ``DoraLinearLayer``; the norm is a constant for the gradient, DoRA paper section 4.3)::

    s = m / stop_gradient(||W + scaling * A B||_in)       one norm per output feature
    y = x W (+ b) + (s - 1) * dropout(x) W + s * scaling * (dropout(x) A) B

Adapters live next to the frozen kernel in the parameter tree (``q_proj/{kernel, lora_a, lora_b,
lora_magnitude}``); a projection applies them whenever its params hold them, so the same module with the adapters
removed from the tree is the base model (the reference of DPO/KTO/GRPO, TRL's ``disable_adapter()``).

Shapes (``[L]`` leading when layers are scanned): ``lora_a [*in, r]`` (logical axes: the kernel's input axes,
``lora_rank``), ``lora_b [r, *out]`` (``lora_rank``, the kernel's output axes), ``lora_magnitude [*out]``.

Fused projections (Phi-3: the checkpoint's ``qkv_proj`` / ``gate_up_proj``, held split as q/k/v and gate/up
kernels): PEFT puts ONE adapter on the fused module, ``lora_A [r, in]``, ``lora_B [out_q + out_k + out_v, r]``,
one DoRA magnitude per fused output row and one dropout mask on its input. trl_jax holds the same adapter as one
shared A in a node named after the fused module (``self_attn/qkv_proj/lora_a [D, r]``, created by
:class:`SharedLoraA` in the parent ``Attention`` / ``MLP``) and B (and the magnitude) split by output rows into the
parts (``q_proj/lora_b [r, N, Hd]``, ...). Every part computes ``dropout(x) A B_part`` from the same A and the
same dropped-out ``x``, so the outputs concatenate to PEFT's fused output and A's gradient is the sum over the
parts, as PEFT's; DoRA's norm is per output row, so splitting rows leaves it unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from trl_jax.utils.trees import combine, partition

ADAPTER_LEAVES = ("lora_a", "lora_b", "lora_magnitude")
# our projection names, in HF module order (the keys PEFT matches against)
ATTENTION_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
# fused PEFT module (Phi-3's HF name) -> our split projections, in the fused module's row order
FUSED_GROUPS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
FUSED_OF = {part: fused for fused, parts in FUSED_GROUPS.items() for part in parts}
# the HF linear modules of a model with fused projections, in HF module order (PEFT's target names)
FUSED_ATTENTION_PROJ = ("o_proj", "qkv_proj")
FUSED_MLP_PROJ = ("gate_up_proj", "down_proj")
SUPPORTED_INIT = (True, "gaussian", False)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The fields of ``peft.LoraConfig`` trl_jax reads (a ``peft.LoraConfig`` works just as well where one is
    taken). ``target_modules``: a list of module-name suffixes, a regex (one string, full match on the module
    name, e.g. ``r".*\\.(q|v)_proj"``) or ``"all-linear"``; ``None`` = ``q_proj, v_proj`` (PEFT's Llama default)."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Any = None
    modules_to_save: Any = None
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: Any = True
    layers_to_transform: Any = None
    layers_pattern: Any = None
    exclude_modules: Any = None
    task_type: str | None = "CAUSAL_LM"
    target_parameters: Any = None
    ensure_weight_tying: bool = False


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """A resolved adapter layout for one model (hashable: it is part of the model config).

    ``targets[i]``: the projection names adapted in layer ``i``; ``modules_to_save``: top-level or per-layer module
    names trained in full (``lm_head``, ``embed_tokens``, ``score``, ``norm``, ...); ``bias``: PEFT's ``none`` /
    ``all`` / ``lora_only`` (which biases train)."""

    r: int
    lora_alpha: float
    targets: tuple[tuple[str, ...], ...]
    lora_dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: Any = True
    modules_to_save: tuple[str, ...] = ()
    bias: str = "none"
    task_type: str | None = "CAUSAL_LM"
    target_modules: Any = None  # as given (saved in adapter_config.json)
    layers_to_transform: tuple[int, ...] | None = None
    # PEFT: a tied LM head stays tied to the *original* embedding when embed_tokens is in modules_to_save, unless
    # ensure_weight_tying (then the trained copy feeds both)
    ensure_weight_tying: bool = False
    # the model fuses q/k/v and gate/up (Phi-3): targets name the fused modules (``qkv_proj``, ``gate_up_proj``),
    # each one adapter with a shared A (see the module docstring)
    fused: bool = False

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def uniform(self) -> bool:
        return all(t == self.targets[0] for t in self.targets)

    def adapts(self, name: str | None, layer: int | None) -> bool:
        """Whether projection ``name`` of layer ``layer`` (``None``: scanned layers, all alike) gets adapters (a
        part of a targeted fused module does: its B and magnitude; the fused name: the shared A)."""
        if name is None:
            return False
        if layer is None:  # scanned layers (ModelConfig refuses non-uniform targets there)
            if not self.uniform:
                return False
            layer = 0
        t = self.targets[layer]
        return name in t or (self.fused and FUSED_OF.get(name) in t)

    @property
    def num_adapted(self) -> int:
        return sum(len(t) for t in self.targets)


# ------------------------------------------------------------------------------------------ resolving a config
def layer_projections(fused: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The ``(attention, MLP)`` linear modules of a layer, PEFT's names (fused: Phi-3's ``qkv_proj`` ...)."""
    return (FUSED_ATTENTION_PROJ, FUSED_MLP_PROJ) if fused else (ATTENTION_PROJ, MLP_PROJ)


def hf_linear_modules(num_layers: int, *, lm_head: bool, score: bool, fused: bool = False,
                      sparse_layer=lambda i: False) -> list[tuple[str, int | None, str]]:
    """``(HF module name, layer, projection name)`` of every linear layer of the decoder, in HF order (``fused``:
    the checkpoint's fused ``qkv_proj`` / ``gate_up_proj`` in place of their parts). Layers where
    ``sparse_layer(i)`` (mixture of experts) have no linear MLP: transformers stores the experts as 3-D parameters
    and the router as a parameter, which PEFT's LoRA (and bitsandbytes) do not wrap."""
    attn, mlp = layer_projections(fused)
    out = []
    for i in range(num_layers):
        out += [(f"model.layers.{i}.self_attn.{p}", i, p) for p in attn]
        if not sparse_layer(i):
            out += [(f"model.layers.{i}.mlp.{p}", i, p) for p in mlp]
    if lm_head:
        out.append(("lm_head", None, "lm_head"))
    if score:
        out.append(("score", None, "score"))
    return out


def is_fused_model(model_cfg) -> bool:
    """Whether the model's checkpoint fuses q/k/v and gate/up (Phi-3; trl_jax.models.hf_io.FUSED_PROJECTIONS)."""
    from trl_jax.models.hf_io import FUSED_PROJECTIONS

    return model_cfg.model_type in FUSED_PROJECTIONS


def _get(cfg, name, default=None):
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def _as_tuple(v):
    if v is None:
        return None
    if isinstance(v, str):
        return v
    return tuple(v)


def _layer_of(key: str, layers_pattern) -> int | None:
    """PEFT's layer index of a module key (first numbered segment, or after one of ``layers_pattern``)."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        return int(m.group("idx")) if m else None
    for pat in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
        m = re.match(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\.", key)
        if m:
            return int(m.group("idx"))
    return None


def _matches(target_modules, key: str, layers_to_transform, layers_pattern) -> bool:
    """``peft.tuners.tuners_utils.check_target_module_exists`` for one key (exclusions handled by the caller)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, key) is not None
    if key in target_modules:
        return True
    found = any(key.endswith(f".{t}") for t in target_modules)
    if found and layers_to_transform is not None and layers_to_transform != []:
        idx = _layer_of(key, layers_pattern)
        wanted = [layers_to_transform] if isinstance(layers_to_transform, int) else list(layers_to_transform)
        return idx is not None and idx in wanted
    return found


def resolve_lora(peft_config, model_cfg) -> LoraSpec:
    """The adapter layout ``peft_config`` (``peft.LoraConfig`` or :class:`LoraConfig`) gives on ``model_cfg``.

    Follows PEFT's rules: ``all-linear`` = every linear layer but the output head (``lm_head``; ``score`` for
    ``SEQ_CLS``), list entries match a module name exactly or as a dotted suffix, one string is a full-match
    regex, ``layers_to_transform`` / ``layers_pattern`` select layers, ``modules_to_save`` and ``exclude_modules``
    are never adapted. Raises ``ValueError`` naming the option for what trl_jax does not implement."""
    if not isinstance(peft_config, dict) and not hasattr(peft_config, "r"):
        raise TypeError(f"peft_config must be a peft.LoraConfig (or trl_jax.models.lora.LoraConfig, or a dict of its "
                        f"fields); got {type(peft_config).__name__}.")
    r = int(_get(peft_config, "r", 8))
    if r < 1:
        raise ValueError(f"LoRA rank r must be >= 1, got {r}.")
    init = _get(peft_config, "init_lora_weights", True)
    if init not in SUPPORTED_INIT:
        raise ValueError(f"init_lora_weights={init!r} is not supported by trl_jax; use True (PEFT's default), "
                         "'gaussian' or False.")
    bias = _get(peft_config, "bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"bias={bias!r}: choose 'none', 'all' or 'lora_only'.")
    if _get(peft_config, "target_parameters"):
        raise ValueError("target_parameters (LoRA on nn.Parameter, e.g. MoE experts) is not supported: use "
                         "target_modules.")
    for name in ("use_qalora", "lora_bias", "alora_invocation_tokens", "use_bdlora"):
        if _get(peft_config, name):
            raise ValueError(f"{name} is not supported by trl_jax's LoRA; leave it unset.")
    for name in ("rank_pattern", "alpha_pattern"):
        if _get(peft_config, name):
            raise ValueError(f"{name} (per-module ranks) is not supported by trl_jax's LoRA; leave it empty.")
    peft_type = _get(peft_config, "peft_type")
    if peft_type is not None and str(getattr(peft_type, "value", peft_type)).upper() != "LORA":
        raise ValueError(f"peft_type {peft_type!r}: trl_jax implements LoRA (and rsLoRA, DoRA) only.")
    task = _get(peft_config, "task_type", None)
    task = str(getattr(task, "value", task)) if task is not None else None
    seq_cls = task == "SEQ_CLS" or bool(model_cfg.num_labels)
    has_lm_head = model_cfg.has_lm_head and not model_cfg.tie_word_embeddings and not model_cfg.num_labels
    fused = is_fused_model(model_cfg)
    modules = hf_linear_modules(model_cfg.num_hidden_layers, lm_head=has_lm_head, score=bool(model_cfg.num_labels),
                                fused=fused, sparse_layer=model_cfg.is_sparse_layer)
    attn_proj, mlp_proj = layer_projections(fused)
    layer_names = ", ".join(dict.fromkeys(p for _, i, p in modules if i is not None))  # a MoE layer: attention only
    target = _as_tuple(_get(peft_config, "target_modules"))
    if target is None and fused:
        raise ValueError(f"target_modules must be given for {model_cfg.model_type} (PEFT has no default for it): its "
                         f"linear layers are {layer_names}, e.g. target_modules=['qkv_proj', 'o_proj'] or "
                         "'all-linear'.")
    if target is None:
        target = ("q_proj", "v_proj")
    if fused and not isinstance(target, str):
        split = [t for t in target if re.search(r"(^|\.)(q|k|v|gate|up)_proj$", t)]
        if split:
            raise ValueError(
                f"target_modules {list(split)}: {model_cfg.model_type} has no such module -- its checkpoint fuses "
                "q/k/v into 'qkv_proj' and gate/up into 'gate_up_proj' (its linear layers are "
                f"{layer_names}). Target 'qkv_proj' / 'gate_up_proj' (one adapter per fused module, as PEFT) "
                "or 'all-linear'.")
    to_save = list(_as_tuple(_get(peft_config, "modules_to_save")) or ())
    if seq_cls and "score" not in to_save:
        to_save.append("score")  # PEFT's SEQ_CLS task: the classification head is trained in full
    excl = _as_tuple(_get(peft_config, "exclude_modules"))
    layers_to_transform = _get(peft_config, "layers_to_transform")
    layers_pattern = _get(peft_config, "layers_pattern")
    all_linear = isinstance(target, str) and target.lower() == "all-linear"
    if all_linear and any(model_cfg.is_sparse_layer(i) for i in range(model_cfg.num_hidden_layers)):
        raise ValueError(
            f"target_modules='all-linear' on a mixture-of-experts model ({model_cfg.model_type}): PEFT then also adapts "
            "the experts and the router, which transformers stores as parameters (PEFT's target_parameters), and "
            "trl_jax's LoRA does not implement that. Name the linear layers instead, e.g. "
            "target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj'].")
    chosen: dict[int | None, list[str]] = {}
    for key, layer, proj in modules:
        if all_linear:
            hit = proj not in ("lm_head", "score")
        else:
            hit = _matches(target, key, layers_to_transform, layers_pattern)
        if excl and (re.fullmatch(excl, key) if isinstance(excl, str) else
                     (key in excl or any(key.endswith(f".{e}") for e in excl))):
            hit = False
        if any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key) for m in to_save):
            hit = False
        if hit:
            chosen.setdefault(layer, []).append(proj)
    head = chosen.pop(None, None)
    if head:
        raise ValueError(f"LoRA on {head} is not supported (the LM head runs inside the fused log-prob kernel); "
                         f"list it in modules_to_save to train it in full.")
    if not chosen:
        hint = (" One string is a regular expression over full module names (PEFT's rule), e.g. r'.*\\.q_proj'; "
                "a list of names matches by suffix." if isinstance(target, str) else "")
        raise ValueError(f"target_modules={target!r} matches no linear layer of this {model_cfg.model_type} model; its "
                         f"layers are {layer_names} (or 'all-linear').{hint}")
    order = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj") if fused else ATTENTION_PROJ + MLP_PROJ
    targets = tuple(tuple(p for p in order if p in chosen.get(i, ()))
                    for i in range(model_cfg.num_hidden_layers))
    known = {"lm_head", "embed_tokens", "score", "norm", "v_head"}
    for m in to_save:
        if m not in known:
            raise ValueError(f"modules_to_save entry {m!r} is not supported; choose from {sorted(known)}.")
    ltt = layers_to_transform
    return LoraSpec(
        r=r, lora_alpha=float(_get(peft_config, "lora_alpha", 8)), targets=targets,
        lora_dropout=float(_get(peft_config, "lora_dropout", 0.0) or 0.0),
        use_rslora=bool(_get(peft_config, "use_rslora", False)), use_dora=bool(_get(peft_config, "use_dora", False)),
        init_lora_weights=init, modules_to_save=tuple(to_save), bias=bias,
        task_type="SEQ_CLS" if seq_cls else (task or "CAUSAL_LM"),
        target_modules=target if isinstance(target, str) else tuple(target),
        layers_to_transform=None if ltt is None else ((ltt,) if isinstance(ltt, int) else tuple(ltt)),
        ensure_weight_tying=bool(_get(peft_config, "ensure_weight_tying", False)), fused=fused,
    )


def get_peft_config(model_args) -> LoraConfig | None:
    """TRL's ``get_peft_config``: the LoRA config of a ``ModelConfig`` (``use_peft`` and the ``lora_*`` fields;
    ``None`` without ``use_peft``)."""
    if not model_args.use_peft:
        return None
    return LoraConfig(task_type=model_args.lora_task_type, r=model_args.lora_r,
                      target_modules=model_args.lora_target_modules, target_parameters=model_args.lora_target_parameters,
                      lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout, bias="none",
                      use_rslora=model_args.use_rslora, use_dora=model_args.use_dora,
                      modules_to_save=model_args.lora_modules_to_save)


def apply_model_args(args, model_args):
    """TRL's scripts: ``peft_config`` from ``use_peft`` + ``lora_*`` (``None`` without), and ``load_in_4bit`` /
    ``load_in_8bit`` as ``model_init_kwargs["quantization_config"]`` on the trainer config ``args`` (as
    ``get_quantization_config``)."""
    qc = None
    if model_args.load_in_4bit:
        qc = {"load_in_4bit": True, "bnb_4bit_quant_type": model_args.bnb_4bit_quant_type}
    elif getattr(model_args, "load_in_8bit", False):
        qc = {"load_in_8bit": True}  # BitsAndBytesConfig's llm_int8_threshold default (6.0)
    if qc is not None:
        kwargs = dict(args.model_init_kwargs) if isinstance(args.model_init_kwargs, dict) else {}
        kwargs["quantization_config"] = qc
        args.model_init_kwargs = kwargs
    return get_peft_config(model_args)


# ------------------------------------------------------------------------------------------ dropout randomness
_DROPOUT_RNG: contextvars.ContextVar = contextvars.ContextVar("trl_jax_lora_dropout_rng", default=None)


@contextlib.contextmanager
def dropout_rng(rng):
    """Within the block, forward passes (``CausalLM.hidden_states``) draw LoRA dropout masks from ``rng``
    (train steps enter it; evaluation, sampling and reference passes run without, i.e. deterministically)."""
    token = _DROPOUT_RNG.set(rng)
    try:
        yield
    finally:
        _DROPOUT_RNG.reset(token)


def current_dropout_rng():
    return _DROPOUT_RNG.get()


# ------------------------------------------------------------------------------------------ the layer
def lora_a_init(key, shape, dtype, init=True):
    """``[*in, r]``: PEFT's default is torch's kaiming-uniform(a=sqrt(5)) on ``[r, in]``, i.e. U(+-1/sqrt(in));
    ``'gaussian'``: N(0, 1/r)."""
    fan_in = int(np.prod(shape[:-1]))
    if init == "gaussian":
        return (jax.random.normal(key, shape, jnp.float32) / shape[-1]).astype(dtype)
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def lora_b_init(key, shape, dtype, init=True):
    """``[r, *out]``: zeros (the adapted model starts as the base); ``init_lora_weights=False``: torch Linear's
    default U(+-1/sqrt(r))."""
    if init is False:
        bound = 1.0 / math.sqrt(shape[0])
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)
    return jnp.zeros(shape, dtype)


def delta_weight(lora_a, lora_b, scaling):
    """``scaling * A B`` with the kernel's layout ``[*in, *out]``."""
    return scaling * jnp.tensordot(lora_a, lora_b, axes=1)


def dora_weight_norm(kernel, lora_a, lora_b, scaling, n_in: int):
    """``||W + scaling * A B||`` over the ``n_in`` input axes: ``[*out]`` (PEFT ``get_weight_norm``)."""
    w = kernel + delta_weight(lora_a, lora_b, scaling).astype(kernel.dtype)
    return jnp.sqrt(jnp.sum(jnp.square(w), axis=tuple(range(n_in))))


class LoraDenseGeneral(nn.DenseGeneral):
    """``nn.DenseGeneral`` with optional LoRA/DoRA adapters (see the module docstring).

    ``lora``: the model's :class:`LoraSpec` (scaling, dropout, DoRA); ``lora_init``: create the adapters when the
    module is initialised (this projection is a target). At apply time the adapters are used whenever the params
    hold them. ``kernel_axes``: the kernel's logical axis names (the adapters take theirs from it)."""

    lora: Any = None
    lora_init: bool = False
    kernel_axes: tuple = ()
    quant: str | None = None  # "nf4" / "fp4": the frozen kernel in 4 bits; "int8": LLM.int8 (trl_jax.models.quant)
    int8_threshold: float = 6.0  # LLM.int8's outlier threshold (bitsandbytes' llm_int8_threshold)

    def _int8_base(self, inputs, axis, in_shape, features):
        """``(y, kernel)`` from the 8-bit ``kernel_int8`` / ``kernel_scb``: bitsandbytes' LLM.int8 matmul in the
        compute dtype (``int8_matmul``), and the dequantized kernel (``CB * SCB / 127``, for DoRA)."""
        from trl_jax.models.quant import current_int8_rows, dequantize_int8_kernel, int8_matmul

        n_in = len(axis)
        if axis != tuple(range(inputs.ndim - n_in, inputs.ndim)):
            raise ValueError("8-bit projections contract the trailing input axes")
        zeros = lambda dt: lambda k, s, d=None: jnp.zeros(s, dt)  # noqa: E731 - loaded, never initialised
        q = self.param("kernel_int8", nn.with_logical_partitioning(zeros(jnp.int8), self.kernel_axes),
                       in_shape + features)
        scb = self.param("kernel_scb", nn.with_logical_partitioning(zeros(jnp.float32), self.kernel_axes[n_in:]),
                         features)
        dtype = self.dtype or inputs.dtype
        bias = self.param("bias", self.bias_init, features, self.param_dtype) if self.use_bias else None
        rows = current_int8_rows()
        rows = rows if rows is not None and rows.shape == inputs.shape[:inputs.ndim - n_in] else None
        y = int8_matmul(inputs.astype(dtype), q, scb, bias, n_in=n_in, threshold=self.int8_threshold, rows=rows)
        return y, dequantize_int8_kernel(q, scb, dtype)

    def _quantized_base(self, inputs, axis, in_shape, features):
        """``(y, kernel)`` from the 4-bit ``kernel_q`` / ``kernel_absmax`` (dequantized in fp32, cast to the
        compute dtype, as bitsandbytes' ``matmul_4bit``)."""
        from trl_jax.models.quant import dequantize_kernel

        n_in = len(axis)
        names = (self.kernel_axes[0],) + self.kernel_axes[n_in:]
        IN = int(np.prod(in_shape))
        zeros = lambda dt: lambda k, s, d=None: jnp.zeros(s, dt)  # noqa: E731 - loaded, never initialised
        q = self.param("kernel_q", nn.with_logical_partitioning(zeros(jnp.uint8), names), (IN // 2,) + features)
        absmax = self.param("kernel_absmax", nn.with_logical_partitioning(zeros(jnp.float32), names),
                            (IN // 64,) + features)
        dtype = self.dtype or inputs.dtype
        kernel = dequantize_kernel(q, absmax, in_shape, self.quant or "nf4", dtype)
        y = jax.lax.dot_general(inputs.astype(dtype), kernel, ((axis, tuple(range(n_in))), ((), ())))
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, features, self.param_dtype).astype(dtype)
        return y, kernel

    @nn.compact
    def __call__(self, inputs, shared_a=None, lora_inputs=None):
        """``shared_a``: the shared A of the fused module this projection is a part of (:class:`SharedLoraA`;
        this projection then holds only B and the magnitude), ``lora_inputs``: the fused module's dropped-out
        input (one mask for all its parts; ``None``: no dropout)."""
        axis = self.axis if isinstance(self.axis, tuple) else (self.axis,)
        axis = tuple(a % inputs.ndim for a in axis)
        n_in = len(axis)
        features = self.features if isinstance(self.features, tuple) else (self.features,)
        in_shape = tuple(inputs.shape[a] for a in axis)
        if self.has_variable("params", "kernel_int8") or (self.is_initializing() and self.quant == "int8"):
            y, kernel = self._int8_base(inputs, axis, in_shape, features)
        elif self.has_variable("params", "kernel_q") or (self.is_initializing() and self.quant):
            y, kernel = self._quantized_base(inputs, axis, in_shape, features)
        else:
            y, kernel = super().__call__(inputs), None
        spec = self.lora
        if spec is None:
            return y
        shared = shared_a is not None
        if not shared and not (self.has_variable("params", "lora_a") or (self.is_initializing() and self.lora_init)):
            return y
        in_axes, out_axes = self.kernel_axes[:n_in], self.kernel_axes[n_in:]
        init = spec.init_lora_weights
        if shared:
            lora_a = shared_a
        else:
            lora_a = self.param("lora_a", nn.with_logical_partitioning(
                lambda k, s, d: lora_a_init(k, s, d, init), in_axes + ("lora_rank",)),
                in_shape + (spec.r,), self.param_dtype)
        lora_b = self.param("lora_b", nn.with_logical_partitioning(
            lambda k, s, d: lora_b_init(k, s, d, init), ("lora_rank",) + out_axes),
            (spec.r,) + features, self.param_dtype)
        if kernel is None:
            kernel = self.get_variable("params", "kernel")
            kernel = getattr(kernel, "unbox", lambda: kernel)()
        dora = spec.use_dora and (self.has_variable("params", "lora_magnitude") or self.is_initializing())
        if dora:
            magnitude = self.param("lora_magnitude", nn.with_logical_partitioning(
                lambda k, s, d: dora_weight_norm(kernel.astype(jnp.float32), lora_a.astype(jnp.float32),
                                                 lora_b.astype(jnp.float32), spec.scaling, n_in).astype(d),
                out_axes), features, self.param_dtype)
        dtype = self.dtype or inputs.dtype
        x = inputs.astype(dtype)
        dropped = False
        if shared:  # the fused module's input, dropped out once for all its parts (PEFT: one dropout per module)
            if lora_inputs is not None:
                x, dropped = lora_inputs.astype(dtype), True
        elif spec.lora_dropout > 0 and self.has_rng("dropout"):
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - spec.lora_dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - spec.lora_dropout), 0).astype(dtype)
            dropped = True
        contract = (axis, tuple(range(n_in)))
        a = jax.lax.dot_general(x, lora_a.astype(dtype), (contract, ((), ())))
        lora_out = jnp.tensordot(a, lora_b.astype(dtype), axes=1) * jnp.asarray(spec.scaling, dtype)
        if not dora:
            return y + lora_out
        k = kernel.astype(dtype)
        norm = jax.lax.stop_gradient(dora_weight_norm(k, lora_a.astype(dtype), lora_b.astype(dtype), spec.scaling,
                                                      n_in))
        scale = magnitude.astype(dtype) / norm
        if dropped:  # PEFT: the base term of DoRA sees the dropped-out input
            base = jax.lax.dot_general(x, k, (contract, ((), ())))
        elif self.use_bias:
            base = y - self.get_variable("params", "bias").astype(dtype)
        else:
            base = y
        return y + (scale - 1) * base + scale * lora_out


class SharedLoraA(nn.Module):
    """The shared LoRA A ``[D, r]`` of a fused PEFT module (Phi-3's ``qkv_proj`` / ``gate_up_proj``), named after
    it in the parent ``Attention`` / ``MLP``, and the module's dropout: ``(lora_a, dropped-out x)`` for the parts
    (:class:`LoraDenseGeneral`'s ``shared_a`` / ``lora_inputs``); ``(None, None)`` when the params hold no adapter
    here (the base model) and it is not being created."""

    lora: Any = None
    lora_init: bool = False
    in_axes: tuple = ("embed",)
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        spec = self.lora
        if spec is None or not (self.has_variable("params", "lora_a") or (self.is_initializing() and self.lora_init)):
            return None, None
        init = spec.init_lora_weights
        lora_a = self.param("lora_a", nn.with_logical_partitioning(
            lambda k, s, d: lora_a_init(k, s, d, init), tuple(self.in_axes) + ("lora_rank",)),
            (x.shape[-1], spec.r), self.param_dtype)
        dropped = None
        if spec.lora_dropout > 0 and self.has_rng("dropout"):
            dtype = self.dtype or x.dtype
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - spec.lora_dropout, x.shape)
            dropped = jnp.where(keep, x.astype(dtype) / (1.0 - spec.lora_dropout), 0).astype(dtype)
        return lora_a, dropped


# ------------------------------------------------------------------------------------------ parameter trees
def _key(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", k)))


def path_names(path) -> tuple[str, ...]:
    return tuple(_key(k) for k in path)


def is_adapter(names: tuple[str, ...]) -> bool:
    return bool(names) and names[-1] in ADAPTER_LEAVES


def trainable_names(params, spec: LoraSpec) -> frozenset:
    """Key paths (tuples of names) of the leaves a LoRA run trains: adapters, ``modules_to_save``, and the biases
    PEFT's ``bias`` option trains (``all``; ``lora_only``: those of adapted projections)."""
    out = set()
    for path, _ in jax.tree_util.tree_leaves_with_path(params):
        names = path_names(path)
        if names[-1] in ADAPTER_LEAVES or any(m in names[:-1] for m in spec.modules_to_save):
            out.add(names)
        elif names[-1] == "bias" and spec.bias == "all":
            out.add(names)
        elif names[-1] == "bias" and spec.bias == "lora_only" and _node(params, names[:-1]).get("lora_b") is not None:
            out.add(names)  # (every part of an adapted fused module: its bias is the fused module's)
    return frozenset(out)


def _node(tree, names):
    for n in names:
        tree = tree[n]
    return tree


def without_adapters(params):
    """The base model's params: ``params`` with every LoRA/DoRA leaf removed (no copy)."""
    return partition(params, is_adapter)[1]


def has_adapters(params) -> bool:
    return any(is_adapter(path_names(p)) for p, _ in jax.tree_util.tree_leaves_with_path(params))


def adapters_are_identity(params) -> jax.Array:
    """Scalar bool: the adapted model computes exactly the base model (every ``lora_b`` is zero and no DoRA)."""
    flags = []
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        name = path_names(path)[-1]
        if name == "lora_magnitude":
            return jnp.asarray(False)
        if name == "lora_b":
            flags.append(jnp.all(x == 0))
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def reference_params(params, saved_originals=None):
    """The reference model of a LoRA run (TRL: the policy with its adapters disabled): the base weights of
    ``params`` plus the original weights of the ``modules_to_save`` (``saved_originals``, a sub-tree), under
    ``stop_gradient``."""
    base = without_adapters(jax.lax.stop_gradient(params))
    if saved_originals:
        base = combine(partition(base, lambda names: _in_tree(saved_originals, names))[1],
                       jax.lax.stop_gradient(saved_originals))
    return base


def _in_tree(tree, names) -> bool:
    node = tree
    for n in names:
        if not isinstance(node, dict) or n not in node:
            return False
        node = node[n]
    return True


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def merge_adapters(params, spec: LoraSpec, dtype=None):
    """Params of the plain model equal to the adapted one: ``W + scaling * A B`` (DoRA: rescaled per output
    feature by ``m / ||W + scaling * A B||``), adapter leaves dropped. Leaves are computed in fp32 and stored in
    ``dtype`` (default: the kernel's dtype)."""

    def walk(node, shared_a=None):
        if not isinstance(node, dict):
            return node
        if "lora_b" in node:
            a = node.get("lora_a", shared_a)
            k = node["kernel"]
            stacked = a.ndim + node["lora_b"].ndim == k.ndim + 3  # a leading [L] on all three
            out = {n: v for n, v in node.items() if n not in ADAPTER_LEAVES}
            out["kernel"] = _merged_kernel(k, a, node["lora_b"], node.get("lora_magnitude"), spec,
                                           stacked).astype(dtype or k.dtype)
            return out
        # a fused module's shared A (``qkv_proj/lora_a``) merges into each of its parts, then goes
        shared = {part: node[f]["lora_a"] for f, parts in FUSED_GROUPS.items()
                  if isinstance(node.get(f), dict) and "lora_a" in node[f] for part in parts}
        out = {}
        for n, v in node.items():
            if n in FUSED_GROUPS and isinstance(v, dict) and set(v) <= set(ADAPTER_LEAVES):
                continue
            out[n] = walk(v, shared.get(n))
        return out

    return walk(params)


def shared_a_path(names: tuple) -> tuple | None:
    """The path of the shared A of the fused module projection ``names`` (``(..., "q_proj")``) is a part of:
    ``(..., "qkv_proj", "lora_a")`` (``None`` for a projection of no fused module)."""
    fused = FUSED_OF.get(names[-1])
    return None if fused is None else tuple(names[:-1]) + (fused, "lora_a")


def _merged_kernel(k, a, b, m, spec, stacked):
    def one(k, a, b, m):
        n_in = a.ndim - 1
        k32 = k.astype(jnp.float32)
        w = k32 + delta_weight(a.astype(jnp.float32), b.astype(jnp.float32), spec.scaling)
        if m is None:
            return w
        norm = jnp.sqrt(jnp.sum(jnp.square(w), axis=tuple(range(n_in))))
        return w * (m.astype(jnp.float32) / norm)

    if stacked:
        return jax.vmap(one)(k, a, b, m) if m is not None else jax.vmap(lambda k, a, b: one(k, a, b, None))(k, a, b)
    return one(k, a, b, m)


__all__ = [
    "LoraConfig",
    "LoraDenseGeneral",
    "LoraSpec",
    "SharedLoraA",
    "adapters_are_identity",
    "combine",
    "count_params",
    "dropout_rng",
    "apply_model_args",
    "get_peft_config",
    "has_adapters",
    "merge_adapters",
    "partition",
    "reference_params",
    "resolve_lora",
    "trainable_names",
    "without_adapters",
]
