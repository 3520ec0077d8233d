"""HF safetensors checkpoints <-> trl_jax params: ``from_pretrained`` and ``save_pretrained`` (no torch).

Loading reads each tensor through a memory map and places it directly on its final sharding with
``jax.make_array_from_callback``: every device asks for its own slice only, so a sharded model never exists as
one host copy. Linear weights are transposed (HF ``[out, in]`` -> ``[in, out]``) and attention projections
reshaped to ``[D, heads, head_dim]`` as numpy views.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from trl_jax.models.config import SUPPORTED_ARCHITECTURES, ModelConfig, config_from_hf, load_hf_config
from trl_jax.models.decoder import ValueHead
from trl_jax.models.model import CausalLM
from trl_jax.models.safetensors_io import SafetensorsFile, save_file
from trl_jax.models.sharding import param_shardings

logger = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------- name mapping
@dataclass(frozen=True)
class _Entry:
    path: tuple[str, ...]  # our param path (under layers/ when stacked)
    hf: str  # HF name; "{i}" = layer index when stacked
    to_ours: Callable[[np.ndarray], np.ndarray]  # view transform HF -> ours
    to_hf: Callable[[np.ndarray], np.ndarray]
    stacked: bool = False
    only: tuple[int, ...] | None = None  # the layers that hold it (Qwen3-MoE's mixed layers); None = every layer

    def layers(self, cfg: ModelConfig) -> tuple[int, ...]:
        """The layer indices this (stacked) entry has a tensor in."""
        return tuple(range(cfg.num_hidden_layers)) if self.only is None else self.only


def _ident(x):
    return x


def _t(x):
    return x.T


def _heads_in(n, hd):  # [n*hd, D] -> [D, n, hd]
    return lambda w: w.reshape(n, hd, w.shape[-1]).transpose(2, 0, 1)


def _heads_in_inv(w):  # [D, n, hd] -> [n*hd, D]
    return w.transpose(1, 2, 0).reshape(-1, w.shape[0])


def _heads_out(n, hd):  # [D, n*hd] -> [n, hd, D]
    return lambda w: w.reshape(w.shape[0], n, hd).transpose(1, 2, 0)


def _heads_out_inv(w):  # [n, hd, D] -> [D, n*hd]
    return w.transpose(2, 0, 1).reshape(w.shape[-1], -1)


def _heads_bias(n, hd):
    return lambda b: b.reshape(n, hd)


def _flat(b):
    return b.reshape(-1)


def _rows(start, stop, then):  # HF [out, in]: rows [start, stop) of a fused projection, then ``then``
    return lambda w: then(w[start:stop])


def _projections(cfg: ModelConfig) -> list[tuple]:
    """q/k/v and MLP kernels: one HF tensor each; (Phi-3, :data:`FUSED_PROJECTIONS`) slices of the fused
    ``qkv_proj`` / ``gate_up_proj`` rows, which :func:`save_pretrained` concatenates again (entries sharing an HF
    name); (Qwen3-MoE, Mixtral, :data:`EXPERT_NAMES`) the router and every expert's tensors stacked on an expert
    axis (HF names with ``{j}``)."""
    N, K, Hd, F = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
    q, k, v = (("self_attn", n, "kernel") for n in ("q_proj", "k_proj", "v_proj"))
    gate, up, down = (("mlp", n, "kernel") for n in ("gate_proj", "up_proj", "down_proj"))
    if cfg.model_type in FUSED_PROJECTIONS:
        qkv, gate_up = FUSED_PROJECTIONS[cfg.model_type]
        nq, nk = N * Hd, K * Hd
        return [
            (q, qkv, _rows(0, nq, _heads_in(N, Hd)), _heads_in_inv),
            (k, qkv, _rows(nq, nq + nk, _heads_in(K, Hd)), _heads_in_inv),
            (v, qkv, _rows(nq + nk, nq + 2 * nk, _heads_in(K, Hd)), _heads_in_inv),
            (gate, gate_up, _rows(0, F, _t), _t),
            (up, gate_up, _rows(F, 2 * F, _t), _t),
            (down, "mlp.down_proj.weight", _t, _t),
        ]
    attn = [
        (q, "self_attn.q_proj.weight", _heads_in(N, Hd), _heads_in_inv),
        (k, "self_attn.k_proj.weight", _heads_in(K, Hd), _heads_in_inv),
        (v, "self_attn.v_proj.weight", _heads_in(K, Hd), _heads_in_inv),
    ]
    dense = [
        (gate, "mlp.gate_proj.weight", _t, _t),
        (up, "mlp.up_proj.weight", _t, _t),
        (down, "mlp.down_proj.weight", _t, _t),
    ]
    if cfg.num_experts:
        router, g, u, d = EXPERT_NAMES[cfg.model_type]
        experts = [
            (("mlp", "gate", "kernel"), router, _t, _t),
            (gate, g, _experts_in, _experts_in_inv),
            (up, u, _experts_in, _experts_in_inv),
            (down, d, _experts_out, _experts_out),
        ]
        if cfg.mixed_layers:  # Qwen3-MoE decoder_sparse_step / mlp_only_layers: each kind on its own layers
            sparse = cfg.sparse_layers
            rest = tuple(i for i in range(cfg.num_hidden_layers) if i not in sparse)
            return attn + [(*x, sparse) for x in experts] + [(*x, rest) for x in dense]
        return attn + experts
    return attn + dense


def _experts_in(w):  # HF experts stacked [E, F, D] <-> ours [D, E, F]
    return w.transpose(2, 0, 1)


def _experts_in_inv(w):
    return w.transpose(1, 2, 0)


def _experts_out(w):  # HF [E, D, F] <-> ours [E, F, D] (its own inverse)
    return w.transpose(0, 2, 1)


# model_type -> HF names of the router and of expert {j}'s gate, up and down projections (per-expert tensors, the
# layout transformers' save_pretrained writes)
EXPERT_NAMES = {
    "qwen3_moe": ("mlp.gate.weight", "mlp.experts.{j}.gate_proj.weight", "mlp.experts.{j}.up_proj.weight",
                  "mlp.experts.{j}.down_proj.weight"),
    "mixtral": ("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{j}.w1.weight",
                "block_sparse_moe.experts.{j}.w3.weight", "block_sparse_moe.experts.{j}.w2.weight"),
}
# model_type -> HF names of its fused (q, k, v) and (gate, up) projections, rows in that order
FUSED_PROJECTIONS = {"phi3": ("self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight")}
# Gemma's two extra norms per layer (ModelConfig.sandwich_norms)
_SANDWICH_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")


def param_entries(cfg: ModelConfig, *, value_head: bool = False) -> list[_Entry]:
    """The HF-name <-> param-path table for ``cfg`` (layer entries marked ``stacked``)."""
    N, K, Hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    L = "model.layers.{i}."
    e = [_Entry(("embed_tokens", "embedding"), "model.embed_tokens.weight", _ident, _ident)]
    lay = [
        (("input_layernorm", "scale"), "input_layernorm.weight", _ident, _ident),
        (("post_attention_layernorm", "scale"), "post_attention_layernorm.weight", _ident, _ident),
        *_projections(cfg),
        (("self_attn", "o_proj", "kernel"), "self_attn.o_proj.weight", _heads_out(N, Hd), _heads_out_inv),
    ]
    if cfg.sandwich_norms:
        lay += [((n, "scale"), f"{n}.weight", _ident, _ident) for n in _SANDWICH_NORMS]
    if cfg.qkv_bias:
        lay += [
            (("self_attn", "q_proj", "bias"), "self_attn.q_proj.bias", _heads_bias(N, Hd), _flat),
            (("self_attn", "k_proj", "bias"), "self_attn.k_proj.bias", _heads_bias(K, Hd), _flat),
            (("self_attn", "v_proj", "bias"), "self_attn.v_proj.bias", _heads_bias(K, Hd), _flat),
        ]
    if cfg.o_bias:
        lay.append((("self_attn", "o_proj", "bias"), "self_attn.o_proj.bias", _ident, _ident))
    if cfg.mlp_bias:
        lay += [(("mlp", p, "bias"), f"mlp.{p}.bias", _ident, _ident) for p in ("gate_proj", "up_proj", "down_proj")]
    if cfg.qk_norm:
        lay += [
            (("self_attn", "q_norm", "scale"), "self_attn.q_norm.weight", _ident, _ident),
            (("self_attn", "k_norm", "scale"), "self_attn.k_norm.weight", _ident, _ident),
        ]
    e += [_Entry(p, L + h, f, g, stacked=True, only=only[0] if only else None) for p, h, f, g, *only in lay]
    e.append(_Entry(("norm", "scale"), "model.norm.weight", _ident, _ident))
    if cfg.has_lm_head and not cfg.tie_word_embeddings:
        e.append(_Entry(("lm_head", "kernel"), "lm_head.weight", _t, _t))
    if cfg.num_labels:
        e.append(_Entry(("score", "kernel"), "score.weight", _t, _t))
    if value_head:
        e.append(_Entry(("v_head", "summary", "kernel"), "v_head.summary.weight", _t, _t))
        e.append(_Entry(("v_head", "summary", "bias"), "v_head.summary.bias", _ident, _ident))
    return e


def _hf_name(entry: _Entry, i: int) -> str:
    """Layer ``i``'s HF name of ``entry`` (an expert template ``{j}`` left for the checkpoint reader)."""
    return entry.hf.format(i=i, j="{j}")


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _param_path(entry: _Entry, cfg: ModelConfig, i: int | None = None) -> tuple[str, ...]:
    if not entry.stacked:
        return entry.path
    return (("layers",) if cfg.scan_layers else (f"layers_{i}",)) + entry.path


# ---------------------------------------------------------------------------------------------- reading
class _Checkpoint:
    """All tensors of a (possibly sharded) safetensors checkpoint directory, opened lazily."""

    def __init__(self, directory: str):
        self.dir = directory
        index = os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME)
        if os.path.exists(index):
            with open(index) as fh:
                self.weight_map = json.load(fh)["weight_map"]
        else:
            files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(
                    f"No *.safetensors (nor {SAFE_WEIGHTS_INDEX_NAME}) in {directory!r}. trl_jax reads safetensors "
                    "only: re-save the checkpoint with transformers' save_pretrained(safe_serialization=True)."
                )
            self.weight_map = {}
            for f in files:
                for k in SafetensorsFile(os.path.join(directory, f)).keys():
                    self.weight_map[k] = f
        self._files: dict[str, SafetensorsFile] = {}

    def __contains__(self, name):
        return name.format(j=0) in self.weight_map if "{j}" in name else name in self.weight_map

    def __getitem__(self, name) -> np.ndarray:
        if "{j}" in name:  # every expert's tensor, stacked [E, ...] (one layer of experts on the host)
            experts = []
            while name.format(j=len(experts)) in self.weight_map:
                experts.append(self[name.format(j=len(experts))])
            return np.stack(experts)
        f = self.weight_map[name]
        if f not in self._files:
            self._files[f] = SafetensorsFile(os.path.join(self.dir, f))
        return self._files[f][name]


def resolve_checkpoint_dir(path_or_hub_id: str, revision: str | None = None, token=None) -> str:
    """A local directory as is; otherwise ``huggingface_hub.snapshot_download`` (config, safetensors, tokenizer).

    A path or id that names no model raises ``trl_jax.assets.ModelPathError`` (a ``ValueError``) naming it and what
    was expected, instead of the hub's traceback."""
    from trl_jax.assets import check_model_path, model_path_error

    check_model_path(path_or_hub_id)  # a path that does not exist, a directory without config.json, a bad id
    if os.path.isdir(os.path.expanduser(path_or_hub_id)):
        return os.path.expanduser(path_or_hub_id)
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            path_or_hub_id,
            revision=revision,
            token=token,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"],
        )
    except Exception as e:  # noqa: BLE001 - not cached offline, unknown, gated, network: one clear message
        raise model_path_error(path_or_hub_id, e) from e


def from_pretrained(
    path_or_hub_id: str,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    mesh: Mesh | None = None,
    rules=None,
    shardings=None,
    scan_layers: bool = True,
    remat_policy: str = "none",
    attention_impl: str = "auto",
    moe_impl: str = "auto",
    value_head: bool = False,
    seed: int = 0,
    revision: str | None = None,
    token=None,
) -> tuple[CausalLM, dict]:
    """Load an HF checkpoint of a supported architecture (``config.SUPPORTED_ARCHITECTURES``: Llama, Mistral,
    Qwen2, Qwen3, Gemma 2, Gemma 3 text, Phi-3; ``*ForCausalLM`` or ``*ForSequenceClassification``).

    Returns ``(model, params)``. Each tensor is read from its safetensors file (sharded checkpoints through
    ``model.safetensors.index.json``) and put on its final sharding as it is read: ``shardings`` (a tree
    matching the params) if given, else from ``mesh`` + ``rules`` (logical axis rules, default
    :data:`trl_jax.parallel.rules.DEFAULT_RULES`), else the first local device. ``value_head=True`` adds TRL's
    ``v_head`` (loaded when the checkpoint has ``v_head.summary.*``, else randomly initialized from ``seed``).
    ``moe_impl``: the mixture-of-experts dispatch (``"auto"``, ``"dense"``, ``"ragged"``; :mod:`trl_jax.models.moe`).
    """
    directory = resolve_checkpoint_dir(path_or_hub_id, revision=revision, token=token)
    hf_config = load_hf_config(directory)
    cfg = config_from_hf(hf_config, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers,
                         remat_policy=remat_policy, attention_impl=attention_impl, moe_impl=moe_impl)
    model = CausalLM(cfg, hf_config=hf_config, value_head=value_head)
    abstract = model.abstract_params()
    if shardings is None:
        if mesh is not None:
            shardings = param_shardings(model.logical_axes(), abstract, mesh, rules)
        else:
            dev = SingleDeviceSharding(jax.local_devices()[0])
            shardings = jax.tree_util.tree_map(lambda _: dev, abstract)
    ckpt = _Checkpoint(directory)
    np_dtype = np.dtype(jnp.dtype(param_dtype))
    params: dict = {}
    missing_heads = []
    for entry in param_entries(cfg, value_head=value_head):
        if entry.path[0] == "v_head" and entry.hf not in ckpt:
            missing_heads.append(entry)
            continue
        layers = entry.layers(cfg) if entry.stacked else (None,)
        names = [_hf_name(entry, i) for i in layers] if entry.stacked else [entry.hf]
        absent = [n for n in names if n not in ckpt]
        if absent:
            hint = (" The config says tie_word_embeddings=False but the checkpoint has no lm_head.weight."
                    if entry.hf == "lm_head.weight" else "")
            raise ValueError(f"Checkpoint {directory!r} lacks tensor(s) {absent[:3]}.{hint}")
        if entry.stacked and cfg.scan_layers:
            path = _param_path(entry, cfg)
            _set(params, path, _place_stacked(ckpt, names, entry, _get(abstract, path), _get(shardings, path),
                                              np_dtype))
        else:
            for i, n in zip(layers, names):
                path = _param_path(entry, cfg, i)
                _set(params, path, _place(ckpt, n, entry, _get(abstract, path), _get(shardings, path), np_dtype))
    if missing_heads:
        logger.warning("No v_head weights in %s: the value head is randomly initialized.", directory)
        head = ValueHead(cfg.param_dtype)
        rand = nn.meta.unbox(jax.jit(head.init)(jax.random.PRNGKey(seed), jnp.zeros((1, cfg.hidden_size)))["params"])
        params["v_head"] = jax.tree_util.tree_map(jax.device_put, rand, shardings["v_head"])
    return model, params


def _check_shape(name, got, want):
    if tuple(got) != tuple(want):
        raise ValueError(f"Tensor {name!r} has shape {tuple(got)} after conversion; the config expects {tuple(want)}.")


def _place(ckpt, name, entry, abstract, sharding, np_dtype):
    view = entry.to_ours(ckpt[name])
    _check_shape(name, view.shape, abstract.shape)
    return jax.make_array_from_callback(
        abstract.shape, sharding, lambda idx: np.ascontiguousarray(view[idx]).astype(np_dtype)
    )


def _place_stacked(ckpt, names, entry, abstract, sharding, np_dtype):
    views = [entry.to_ours(ckpt[n]) for n in names]
    _check_shape(names[0], (len(views),) + views[0].shape, abstract.shape)

    def cb(idx):
        layers = range(len(views))[idx[0]]
        return np.stack([np.ascontiguousarray(views[i][idx[1:]]) for i in layers]).astype(np_dtype)

    return jax.make_array_from_callback(abstract.shape, sharding, cb)


# ---------------------------------------------------------------------------------------------- writing
def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)\s*", str(size), flags=re.I)
    if not m:
        raise ValueError(f"max_shard_size {size!r} not understood; use an int (bytes) or e.g. '5GB', '500MB'.")
    unit = m.group(2).upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


def _to_host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def _split_experts(tensors: list[tuple[str, np.ndarray]]) -> list[tuple[str, np.ndarray]]:
    """Expert-stacked tensors (names with ``{j}``, leading expert axis) -> one tensor per expert."""
    out = []
    for n, a in tensors:
        out.extend([(n.format(j=j), a[j]) for j in range(a.shape[0])] if "{j}" in n else [(n, a)])
    return out


def _fuse_shared_names(tensors: list[tuple[str, np.ndarray]]) -> list[tuple[str, np.ndarray]]:
    """Entries that share an HF name (slices of a fused projection) -> one tensor, their rows concatenated in entry
    order, at the first one's place."""
    groups: dict[str, list[np.ndarray]] = {}
    for n, a in tensors:
        groups.setdefault(n, []).append(a)
    return [(n, parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)) for n, parts in groups.items()]


def _family_hf_kwargs(cfg: ModelConfig) -> dict:
    """The config fields of ``cfg``'s family beyond the shared ones (inverse of ``config._FAMILY_TRAITS``)."""
    mt = cfg.model_type
    kw: dict = {}
    if mt in ("llama", "qwen3", "gemma2", "gemma3_text", "qwen3_moe"):
        kw["attention_bias"] = cfg.qkv_bias
    if mt == "llama":
        kw["mlp_bias"] = cfg.mlp_bias
    if mt == "qwen3_moe":
        kw.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                  moe_intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
                  router_aux_loss_coef=cfg.router_aux_loss_coef, decoder_sparse_step=cfg.decoder_sparse_step,
                  mlp_only_layers=list(cfg.mlp_only_layers))
    if mt == "mixtral":
        kw.update(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                  router_aux_loss_coef=cfg.router_aux_loss_coef)
    if mt in ("mistral", "phi3", "mixtral"):
        kw["sliding_window"] = (cfg.sliding_windows or (None,))[0]
    if mt in ("gemma2", "gemma3_text"):
        ws = cfg.sliding_windows or (None,) * cfg.num_hidden_layers
        kw.update(hidden_activation=cfg.hidden_act,
                  query_pre_attn_scalar=cfg.query_pre_attn_scalar,
                  final_logit_softcapping=cfg.final_logit_softcapping,
                  sliding_window=next((w for w in ws if w is not None), None),
                  layer_types=["full_attention" if w is None else "sliding_attention" for w in ws])
    if mt == "gemma2":
        kw["attn_logit_softcapping"] = cfg.attn_logit_softcapping
    return kw


def _rope_hf(cfg: ModelConfig) -> dict:
    rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type not in ("default", "longrope"):
        rope["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_position_embeddings)
    if cfg.rope_type == "longrope":
        rope.update(short_factor=list(cfg.rope_short_factor), long_factor=list(cfg.rope_long_factor),
                    attention_factor=cfg.rope_attention_factor,
                    original_max_position_embeddings=cfg.rope_original_max_position_embeddings)
    if cfg.partial_rotary_factor != 1.0:
        rope["partial_rotary_factor"] = cfg.partial_rotary_factor
    if cfg.rope_local_theta is not None:
        rope = {"full_attention": rope, "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_theta}}
    return rope


def to_hf_config(cfg: ModelConfig):
    """A ``transformers`` config for ``cfg`` (for models built from scratch, without an HF config)."""
    from transformers import AutoConfig

    rope = _rope_hf(cfg)
    kw = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        hidden_act=cfg.hidden_act, tie_word_embeddings=cfg.tie_word_embeddings,
        max_position_embeddings=cfg.max_position_embeddings, rope_parameters=rope, pad_token_id=cfg.pad_token_id,
    )
    kw.update(_family_hf_kwargs(cfg))
    if "hidden_activation" in kw:
        del kw["hidden_act"]
    if cfg.model_type == "phi3" and cfg.rope_type == "longrope":
        kw["original_max_position_embeddings"] = cfg.rope_original_max_position_embeddings
    if cfg.num_labels:
        kw["num_labels"] = cfg.num_labels
    return AutoConfig.for_model(cfg.model_type, **kw)


def save_pretrained(
    model: CausalLM,
    params: dict,
    save_directory: str,
    *,
    max_shard_size: int | str = "5GB",
    dtype=None,
    tokenizer=None,
    generation_config=None,
) -> list[str]:
    """Write HF-compatible ``*.safetensors`` (+ index json when sharded) and ``config.json``.

    ``dtype`` casts the saved tensors (default: as the params are). Tokenizer and generation config are saved
    when given. The result loads with ``transformers.AutoModelForCausalLM.from_pretrained`` (or
    ``AutoModelForSequenceClassification`` for models with a ``score`` head). In multi-host runs every process
    must call this (the gathers are collective); only process 0 writes. Returns the weight file names.
    """
    cfg = model.config
    limit = _parse_size(max_shard_size)
    has_vhead = "v_head" in params
    tensors: list[tuple[str, np.ndarray]] = []
    for entry in param_entries(cfg, value_head=has_vhead):
        if entry.stacked and cfg.scan_layers:
            stacked = _to_host(_get(params, _param_path(entry, cfg)))
            for i in range(cfg.num_hidden_layers):
                tensors.append((_hf_name(entry, i), entry.to_hf(stacked[i])))
        else:
            for i in entry.layers(cfg) if entry.stacked else (0,):
                arr = _to_host(_get(params, _param_path(entry, cfg, i)))
                tensors.append((_hf_name(entry, i), entry.to_hf(arr)))
    tensors = _split_experts(_fuse_shared_names(tensors))
    if dtype is not None:
        np_dtype = np.dtype(jnp.dtype(dtype))
        tensors = [(n, a.astype(np_dtype)) for n, a in tensors]
    shards: list[list[tuple[str, np.ndarray]]] = [[]]
    size = 0
    for n, a in tensors:
        if shards[-1] and size + a.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((n, a))
        size += a.nbytes
    if jax.process_index() != 0:
        return []
    os.makedirs(save_directory, exist_ok=True)
    for f in os.listdir(save_directory):  # stale weights from an earlier save would be picked up on load
        if f.endswith(".safetensors") or f == SAFE_WEIGHTS_INDEX_NAME:
            os.remove(os.path.join(save_directory, f))
    files = []
    if len(shards) == 1:
        save_file(dict(shards[0]), os.path.join(save_directory, SAFE_WEIGHTS_NAME))
        files.append(SAFE_WEIGHTS_NAME)
    else:
        weight_map = {}
        for k, shard in enumerate(shards):
            fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(dict(shard), os.path.join(save_directory, fname))
            files.append(fname)
            weight_map.update({n: fname for n, _ in shard})
        index = {"metadata": {"total_size": sum(a.nbytes for _, a in tensors)}, "weight_map": weight_map}
        with open(os.path.join(save_directory, SAFE_WEIGHTS_INDEX_NAME), "w") as fh:
            json.dump(index, fh, indent=2, sort_keys=True)
    hf_config = model.hf_config if model.hf_config is not None else to_hf_config(cfg)
    arch_cls = SUPPORTED_ARCHITECTURES[cfg.model_type][1 if cfg.num_labels else 0]
    hf_config.architectures = [arch_cls]
    saved_dtype = tensors[0][1].dtype
    hf_config.dtype = "bfloat16" if saved_dtype == np.dtype(jnp.bfloat16) else saved_dtype.name
    hf_config.save_pretrained(save_directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(save_directory)
    if generation_config is not None:
        generation_config.save_pretrained(save_directory)
    return files
