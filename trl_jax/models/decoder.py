"""The Flax (linen) decoder: Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3, Gemma 2, Gemma 3 (text), Phi-3, and the
mixtures of experts Qwen3-MoE and Mixtral.

Gemma's layers add ``pre_feedforward_layernorm`` / ``post_feedforward_layernorm`` and use
``post_attention_layernorm`` on the attention output (``ModelConfig.sandwich_norms``), with ``(1 + w)`` norms.
Phi-3's fused ``qkv_proj`` / ``gate_up_proj`` checkpoint tensors are split into the q/k/v and gate/up params below
(see ``hf_io``).

Parameter tree (HF names, linen leaves; logical axis names in brackets; ``layers`` leading axis when scanned)::

    embed_tokens/embedding            [V, D]            (vocab, embed)
    layers/                           scanned: every leaf gets a leading [L] (layers) axis
                                      unrolled: layers_0/, layers_1/, ... instead
      input_layernorm/scale           [D]               (embed,)
      self_attn/q_proj/kernel         [D, N, Hd]        (embed, heads, head_dim)      bias [N, Hd]
      self_attn/k_proj/kernel         [D, K, Hd]        (embed, kv_heads, head_dim)   bias [K, Hd]
      self_attn/v_proj/kernel         [D, K, Hd]        (embed, kv_heads, head_dim)   bias [K, Hd]
      self_attn/o_proj/kernel         [N, Hd, D]        (heads, head_dim, embed)      bias [D]
      self_attn/q_norm/scale          [Hd]              (head_dim,)   Qwen3, Gemma 3
      self_attn/k_norm/scale          [Hd]              (head_dim,)   Qwen3, Gemma 3
      post_attention_layernorm/scale  [D]               (embed,)
      pre_feedforward_layernorm/scale [D]               (embed,)      Gemma only
      post_feedforward_layernorm/scale [D]              (embed,)      Gemma only
      mlp/gate_proj/kernel            [D, F]            (embed, mlp)
      mlp/up_proj/kernel              [D, F]            (embed, mlp)
      mlp/down_proj/kernel            [F, D]            (mlp, embed)
      mlp/gate/kernel                 [D, E]            (embed, expert)        mixture of experts: the router
      mlp/gate_proj/kernel            [D, E, Fe]        (embed, expert, mlp)   ... and E experts in place of the
      mlp/up_proj/kernel              [D, E, Fe]        (embed, expert, mlp)       dense MLP kernels above
      mlp/down_proj/kernel            [E, Fe, D]        (expert, mlp, embed)
                                      (Qwen3-MoE decoder_sparse_step / mlp_only_layers: unrolled layers, the dense
                                      MLP kernels on the layers without experts)
    norm/scale                        [D]               (embed,)
    lm_head/kernel                    [D, V]            (embed, vocab)   untied causal LMs only
    score/kernel                      [D, num_labels]   (embed, labels)  sequence classification only
    v_head/summary/kernel, bias       [D, 1], [1]       (embed, value), (value,)   value head only
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from trl_jax.models.attention import attend, build_mask, static_window, window_mask
from trl_jax.models.config import NO_WINDOW, ModelConfig
from trl_jax.models.lora import LoraDenseGeneral, SharedLoraA
from trl_jax.models.moe import ragged_experts, resolve_moe_impl, router_weights, sharded_ragged_experts, top_k_routing
from trl_jax.models.quant import int8_token_rows
from trl_jax.models.rope import apply_rope, layer_cos_sin, rope_cos_sin
from trl_jax.parallel.rules import active_mesh, active_spec, constrain

LOGICAL_AXIS_NAMES = ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "expert", "layers", "labels",
                      "value", "lora_rank")

_init = nn.initializers.normal(stddev=0.02)


def _p(init, names):
    return nn.with_logical_partitioning(init, names)


def _act(name: str):
    acts = {
        "silu": jax.nn.silu,
        "swish": jax.nn.silu,
        "gelu": functools.partial(jax.nn.gelu, approximate=False),
        "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
        "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
        "relu": jax.nn.relu,
    }
    if name not in acts:
        raise ValueError(f"hidden_act {name!r} is not supported; supported: {sorted(acts)}.")
    return acts[name]


# Activation layouts by logical name (trl_jax.parallel.rules): pinned only while a step or the sampler traces
# under ``activation_sharding(mesh)``; a no-op otherwise.
_EMBED = ("activation_batch", "activation_length", "activation_embed")
_HEADS = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
_KV_HEADS = ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim")
_MLP = ("activation_batch", "activation_length", "activation_mlp")


class RMSNorm(nn.Module):
    """HF RMSNorm: normalize in fp32, cast back to the input dtype, multiply by the weight.

    ``unit_offset`` (Gemma): the weight is stored as ``w`` and applied as ``(1 + w)``, multiplied in fp32 before the
    cast back (``Gemma2RMSNorm``: ``(x * (1 + w)).to(dtype)`` where Llama does ``w * x.to(dtype)``)."""

    eps: float
    param_dtype: jnp.dtype
    axis_name: str = "embed"
    unit_offset: bool = False

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.unit_offset else nn.initializers.ones
        scale = self.param("scale", _p(init, (self.axis_name,)), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.unit_offset:
            return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
        return scale.astype(x.dtype) * normed.astype(x.dtype)


def _norm(cfg: ModelConfig, name=None, axis_name: str = "embed") -> RMSNorm:
    """The model's RMSNorm (Gemma's ``(1 + w)`` form where the config says so)."""
    return RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, axis_name, cfg.norm_unit_offset, name=name)


def _embed_scale(cfg: ModelConfig, x):
    """Gemma's ``embed_tokens(ids) * sqrt(hidden_size)``, the multiplier cast to the compute dtype first."""
    if cfg.embedding_multiplier is None:
        return x
    return x * jnp.asarray(cfg.embedding_multiplier, x.dtype)


def _dense(features, axes, *, use_bias, cfg, name, axis=-1, bias_axes=None, layer=None, expert=False):
    """A projection (``nn.DenseGeneral`` numerics) that carries LoRA adapters when ``cfg.lora`` targets ``name`` in
    ``layer`` (``None``: scanned layers) and applies them whenever its params hold them (trl_jax.models.lora).
    ``expert``: a mixture-of-experts kernel, never quantized (bitsandbytes wraps linear layers only, and
    transformers stores experts as 3-D parameters)."""
    return LoraDenseGeneral(
        features=features,
        axis=axis,
        use_bias=use_bias,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=_p(_init, axes),
        bias_init=_p(nn.initializers.zeros, bias_axes or axes[-(len(features) if isinstance(features, tuple) else 1):]),
        name=name,
        lora=cfg.lora,
        lora_init=cfg.lora is not None and cfg.lora.adapts(name, layer),
        kernel_axes=tuple(axes),
        quant=cfg.quantization if name in _QUANTIZED and not expert else None,
        int8_threshold=cfg.llm_int8_threshold,
    )


def _shared_lora(cfg: ModelConfig, name: str, layer, x):
    """``(shared A, dropped-out x)`` of the fused PEFT module ``name`` (Phi-3's ``qkv_proj`` / ``gate_up_proj``)
    for its split parts (trl_jax.models.lora.SharedLoraA); ``(None, None)`` without fused LoRA."""
    if cfg.lora is None or not cfg.lora.fused:
        return None, None
    return SharedLoraA(lora=cfg.lora, lora_init=cfg.lora.adapts(name, layer), in_axes=("embed",), dtype=cfg.dtype,
                       param_dtype=cfg.param_dtype, name=name)(x)


_QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # bnb: all but heads


class Attention(nn.Module):
    cfg: ModelConfig
    layer: int | None = None  # this layer's index when layers are unrolled (LoRA targets may differ per layer)

    @nn.compact
    def __call__(self, x, cos, sin, mask, kv, cache_index, segment_ids=None):
        c = self.cfg
        N, K, Hd, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
        li = self.layer
        fa = _shared_lora(c, "qkv_proj", li, x)  # Phi-3 + LoRA on qkv_proj: one A shared by q, k and v
        q = _dense((N, Hd), ("embed", "heads", "head_dim"), use_bias=c.qkv_bias, cfg=c, name="q_proj",
                   layer=li)(x, *fa)
        k = _dense((K, Hd), ("embed", "kv_heads", "head_dim"), use_bias=c.qkv_bias, cfg=c, name="k_proj",
                   layer=li)(x, *fa)
        v = _dense((K, Hd), ("embed", "kv_heads", "head_dim"), use_bias=c.qkv_bias, cfg=c, name="v_proj",
                   layer=li)(x, *fa)
        if c.qk_norm:
            q = _norm(c, "q_norm", "head_dim")(q)
            k = _norm(c, "k_norm", "head_dim")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = constrain(q, _HEADS)
        k, v = constrain(k, _KV_HEADS), constrain(v, _KV_HEADS)
        new_kv = None
        if kv is not None:  # write this call's keys/values into the preallocated cache at cache_index
            ck, cv = kv
            ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, cache_index, 0, 0))
            cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, cache_index, 0, 0))
            new_kv = (ck, cv)
            k, v = ck.astype(q.dtype), cv.astype(q.dtype)
        # segment ids (forward passes without a cache) let kernels that build their own mask (splash) run
        seg = segment_ids if kv is None else None
        out = attend(q, k, v, mask, scale=c.attention_scale, impl=c.attention_impl, segment_ids=seg,
                     window=static_window(c.sliding_windows), softcap=c.attn_logit_softcapping)
        out = _dense(D, ("heads", "head_dim", "embed"), use_bias=c.o_bias, cfg=c, name="o_proj", axis=(-2, -1),
                     bias_axes=("embed",), layer=li)(out)
        return out, new_kv


class MLP(nn.Module):
    cfg: ModelConfig
    layer: int | None = None

    @nn.compact
    def __call__(self, x):
        c, li = self.cfg, self.layer
        fa = _shared_lora(c, "gate_up_proj", li, x)  # Phi-3 + LoRA on gate_up_proj: one A shared by gate and up
        F = c.intermediate_size
        g = _dense(F, ("embed", "mlp"), use_bias=c.mlp_bias, cfg=c, name="gate_proj", layer=li)(x, *fa)
        u = _dense(F, ("embed", "mlp"), use_bias=c.mlp_bias, cfg=c, name="up_proj", layer=li)(x, *fa)
        hidden = constrain(_act(c.hidden_act)(g) * u, _MLP)
        return _dense(c.hidden_size, ("mlp", "embed"), use_bias=c.mlp_bias, cfg=c, name="down_proj", layer=li)(hidden)


class _ExpertKernel(nn.Module):
    """The ``kernel`` param of an expert projection, as ``_dense`` names it (the ragged dispatch reads it raw)."""

    shape: tuple
    axes: tuple
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self):
        return self.param("kernel", _p(_init, self.axes), self.shape, self.param_dtype)


_EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class SparseMoE(nn.Module):
    """Top-k mixture of experts (Qwen3-MoE, Mixtral): ``x [B, T, D]`` -> ``sum_e w_e * down_e(act(gate_e(x)) *
    up_e(x))`` with ``w`` the routing weights ``[B, T, E]`` (zero outside each token's top-k). The router logits
    ``[B, T, E]`` are sown as ``intermediates/router_logits`` (for the load-balancing loss).

    ``cfg.moe_impl`` picks the dispatch (:func:`trl_jax.models.moe.resolve_moe_impl`): dense (every expert on every
    token) or ragged (grouped matmuls over the tokens routed to each expert); same params, same numbers."""

    cfg: ModelConfig
    layer: int | None = None  # set when layers are unrolled

    def _adapted(self) -> bool:
        """Whether the expert projections carry LoRA adapters (applied by ``_dense`` only)."""
        c = self.cfg
        if c.lora is not None and any(c.lora.adapts(n, self.layer) for n in _EXPERT_PROJECTIONS):
            return True
        params = self.variables.get("params", {})
        return any(set(params.get(n, {})) - {"kernel"} for n in _EXPERT_PROJECTIONS)

    @nn.compact
    def __call__(self, x):
        c, li = self.cfg, self.layer
        E, F, D = c.num_experts, c.moe_intermediate_size, c.hidden_size
        logits = _dense(E, ("embed", "expert"), use_bias=False, cfg=c, name="gate", layer=li)(x)
        self.sow("intermediates", "router_logits", logits)
        mesh = active_mesh()
        if resolve_moe_impl(c.moe_impl, adapted=self._adapted(), mesh=mesh) == "ragged":
            return self._ragged(x, logits, mesh)
        w = router_weights(logits, c.num_experts_per_tok, normalize=c.norm_topk_prob)
        g = _dense((E, F), ("embed", "expert", "mlp"), use_bias=False, cfg=c, name="gate_proj", layer=li,
                   expert=True)(x)
        u = _dense((E, F), ("embed", "expert", "mlp"), use_bias=False, cfg=c, name="up_proj", layer=li,
                   expert=True)(x)
        h = _act(c.hidden_act)(g) * u * w[..., None].astype(g.dtype)  # weighting before down_e is linear in h
        return _dense(D, ("expert", "mlp", "embed"), use_bias=False, cfg=c, name="down_proj",
                      axis=(-2, -1), bias_axes=("embed",), layer=li, expert=True)(h)

    def _ragged(self, x, logits, mesh):
        c = self.cfg
        E, F, D, k = c.num_experts, c.moe_intermediate_size, c.hidden_size, c.num_experts_per_tok
        w, idx = top_k_routing(logits, k, normalize=c.norm_topk_prob)
        gate, up = (_ExpertKernel((D, E, F), ("embed", "expert", "mlp"), c.param_dtype, name=n)()
                    for n in ("gate_proj", "up_proj"))
        down = _ExpertKernel((E, F, D), ("expert", "mlp", "embed"), c.param_dtype, name="down_proj")()
        gate, up = (jnp.transpose(kern.astype(c.dtype), (1, 0, 2)) for kern in (gate, up))  # [E, D, F]
        down, x, act = down.astype(c.dtype), x.astype(c.dtype), _act(c.hidden_act)
        if mesh is None:  # one device, or a sharded jit without an activation-sharding context (left to GSPMD)
            B, T, _ = x.shape
            y = ragged_experts(x.reshape(B * T, D), idx.reshape(B * T, k), w.reshape(B * T, k), gate, up, down, act)
            return y.reshape(B, T, D)
        batch = active_spec(_EMBED, x.shape)
        batch = batch[0] if len(batch) else None
        mlp = active_spec(("activation_mlp",), (F,))
        tensor = mlp[0] if len(mlp) else None
        used = {batch} if isinstance(batch, str) else set(batch or ())
        if tensor is not None and used & ({tensor} if isinstance(tensor, str) else set(tensor)):
            tensor = None
        return sharded_ragged_experts(x, idx, w, gate, up, down, act, mesh, batch, tensor)


def _mlp_cls(cfg: ModelConfig, layer: int | None = None):
    """Layer ``layer``'s feed-forward block (``None``: scanned layers, all of one kind): experts where the config
    puts them (:meth:`ModelConfig.is_sparse_layer`), else the gated MLP."""
    return SparseMoE if cfg.is_sparse_layer(layer) else MLP


def _residual_blocks(cfg: ModelConfig, norm, x, attention, mlp):
    """The two residual blocks of a layer around ``attention(h)`` and ``mlp(h)`` (``norm(name)`` gives the named
    norm): pre-norm (Llama family, Phi-3), or Gemma's sandwich (a norm before and after each block, where
    ``post_attention_layernorm`` normalizes the attention output and ``pre_feedforward_layernorm`` is the pre-MLP
    norm). Returns ``(x, attention's extra output)``."""
    a, extra = attention(norm("input_layernorm")(x))
    if cfg.sandwich_norms:
        x = x + norm("post_attention_layernorm")(a)
        return x + norm("post_feedforward_layernorm")(mlp(norm("pre_feedforward_layernorm")(x))), extra
    x = x + a
    return x + mlp(norm("post_attention_layernorm")(x)), extra


class DecoderLayer(nn.Module):
    """One block. ``x [B, T, D]``; ``window`` None or a scalar; ``kv`` None or ``(k, v) [B, S, K, Hd]``."""

    cfg: ModelConfig
    layer: int | None = None  # set when layers are unrolled

    @nn.compact
    def __call__(self, x, cos, sin, base_mask, segment_ids, q_slots, kv_slots, cache_index, window, kv):
        c = self.cfg
        mask = base_mask if window is None else base_mask & window_mask(q_slots, kv_slots, window)
        cos, sin = layer_cos_sin(cos, sin, window, NO_WINDOW)
        x = constrain(x, _EMBED)  # block boundary: batch over (data, fsdp), the model dimension whole
        attn = Attention(c, self.layer, name="self_attn")
        x, new_kv = _residual_blocks(
            c, lambda name: _norm(c, name), x, lambda h: attn(h, cos, sin, mask, kv, cache_index, segment_ids),
            _mlp_cls(c, self.layer)(c, self.layer, name="mlp"))
        return constrain(x, _EMBED), new_kv


def _remat(cls, cfg: ModelConfig):
    if cfg.remat_policy == "none":
        return cls
    policy = {
        "full": None,
        "dots_saveable": jax.checkpoint_policies.dots_saveable,
        "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }[cfg.remat_policy]
    return nn.remat(cls, policy=policy, prevent_cse=not cfg.scan_layers)


class Decoder(nn.Module):
    """Embedding -> layers -> final norm. Heads (lm_head / score / v_head) are created at init, applied outside."""

    cfg: ModelConfig
    value_head: bool = False

    def setup(self):
        c = self.cfg
        self.embed_tokens = nn.Embed(
            c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
            embedding_init=_p(_init, ("vocab", "embed")),
        )
        layer_cls = _remat(DecoderLayer, c)
        if c.scan_layers:
            self.layers = nn.scan(
                layer_cls,
                variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast,) * 7 + (0, 0),
                length=c.num_hidden_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c)
        else:
            self.layers = [layer_cls(c, i, name=f"layers_{i}") for i in range(c.num_hidden_layers)]
        self.norm = _norm(c)
        if c.has_lm_head and not c.tie_word_embeddings:
            self.lm_head = nn.DenseGeneral(
                c.vocab_size, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype,
                kernel_init=_p(_init, ("embed", "vocab")),
            )
        if c.num_labels:
            self.score = nn.DenseGeneral(
                c.num_labels, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype,
                kernel_init=_p(_init, ("embed", "labels")),
            )
        if self.value_head:
            self.v_head = ValueHead(c.param_dtype)

    def __call__(self, input_ids, positions, q_segment_ids, kv_segment_ids, q_slots, kv_slots,
                 cache=None, cache_index=None):
        """Final-norm hidden states ``[B, T, D]`` and the updated ``(k, v)`` cache (``None`` without a cache)."""
        c = self.cfg
        x = self.embed_tokens(input_ids)
        if c.pad_token_id is not None:
            # transformers' nn.Embedding(padding_idx=pad_token_id): a pad token's lookup sends no gradient to the
            # pad row (a sampled or packed pad token must not train it); tied heads still reach it as logits
            x = jnp.where((input_ids == c.pad_token_id)[..., None], jax.lax.stop_gradient(x), x)
        x = _embed_scale(c, x.astype(c.dtype))
        cos, sin = rope_cos_sin(c, positions, c.dtype)
        base_mask = build_mask(q_slots, kv_slots, q_segment_ids, kv_segment_ids)
        windows = jnp.asarray(c.window_array(), jnp.int32) if c.has_sliding_window else None
        # queries are the keys' own tokens at slots 0..T-1 only without a cache (the model's forward passes)
        seg = q_segment_ids if cache is None and q_segment_ids is kv_segment_ids else None
        # LLM.int8 (8-bit base): outlier columns over the real tokens only (trl_jax.models.quant.int8_token_rows)
        with int8_token_rows(q_segment_ids != 0 if c.quantization == "int8" else None):
            x, new_cache = self._layers(x, cos, sin, base_mask, seg, q_slots, kv_slots, cache_index, windows, cache)
        return self.norm(x), new_cache

    def _layers(self, x, cos, sin, base_mask, seg, q_slots, kv_slots, cache_index, windows, cache):
        c = self.cfg
        if c.scan_layers:
            x, new_cache = self.layers(x, cos, sin, base_mask, seg, q_slots, kv_slots, cache_index, windows, cache)
        else:
            ks, vs = [], []
            for i, layer in enumerate(self.layers):
                w = None if windows is None else windows[i]
                kv = None if cache is None else (cache[0][i], cache[1][i])
                x, nkv = layer(x, cos, sin, base_mask, seg, q_slots, kv_slots, cache_index, w, kv)
                if nkv is not None:
                    ks.append(nkv[0])
                    vs.append(nkv[1])
            new_cache = (jnp.stack(ks), jnp.stack(vs)) if cache is not None else None
        return x, new_cache

    def init_all(self, input_ids, positions, seg, slots):
        """Touch every parameter (used by ``init``)."""
        h, _ = self(input_ids, positions, seg, seg, slots, slots)
        out = [h]
        if self.cfg.has_lm_head and not self.cfg.tie_word_embeddings:
            out.append(self.lm_head(h))
        if self.cfg.num_labels:
            out.append(self.score(h))
        if self.value_head:
            out.append(self.v_head(h))
        return out


class ValueHead(nn.Module):
    """TRL's ``v_head``: ``summary`` Linear D -> 1 with bias, applied in fp32 to the last hidden state."""

    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, h):
        return nn.DenseGeneral(
            1, use_bias=True, dtype=jnp.float32, param_dtype=self.param_dtype,
            kernel_init=_p(_init, ("embed", "value")), bias_init=_p(nn.initializers.zeros, ("value",)),
            name="summary",
        )(h.astype(jnp.float32))[..., 0]


# ---------------------------------------------------------------------------------------------------------------------
# Decode path (generation): the same layer math as ``DecoderLayer`` (its sub-modules applied to their params), with
# the KV cache threaded through the layer loop as one ``[L, B, S, K, Hd]`` buffer per k/v that each layer updates in
# place (``dynamic_update_slice`` at ``(layer, 0, index, 0, 0)``), so no step rewrites or stacks the whole cache.


def init_decode_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
    """``k, v [L, B, S, K, Hd]`` (zeros), ``segment_ids [B, S]`` (0 = empty slot), ``index`` (next slot to write)."""
    dtype = dtype or cfg.dtype
    shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "segment_ids": jnp.zeros((batch, max_len), jnp.int32), "index": jnp.zeros((), jnp.int32)}


def _decode_layer(cfg: ModelConfig, p, x, cos, sin, mask, k_all, v_all, layer, index, unrolled: int | None = None):
    """One decoder layer on ``x [B, T, D]``: writes its T keys/values into ``k_all/v_all [L, B, S, K, Hd]`` at
    ``(layer, :, index)`` and attends over that layer's ``S`` slots (``mask [B, 1, T, S]``); ``cos/sin`` are this
    layer's table ``[B, T, rotary_dim]``. ``unrolled``: the layer's static index when layers are unrolled (its
    feed-forward kind may differ from the others'), ``None`` when scanned."""
    c = cfg
    N, K, Hd, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
    a = p["self_attn"]

    def dense(inp, features, axes, use_bias, params, axis=-1, bias_axes=None, shared_a=None):
        return _dense(features, axes, use_bias=use_bias, cfg=c, name=None, axis=axis,
                      bias_axes=bias_axes).apply({"params": params}, inp, shared_a)

    # Phi-3 + LoRA on qkv_proj: the shared A of q, k and v (no dropout when decoding)
    qkv_a = a["qkv_proj"].get("lora_a") if isinstance(a.get("qkv_proj"), dict) else None

    def attention(h):
        q = dense(h, (N, Hd), ("embed", "heads", "head_dim"), c.qkv_bias, a["q_proj"], shared_a=qkv_a)
        k = dense(h, (K, Hd), ("embed", "kv_heads", "head_dim"), c.qkv_bias, a["k_proj"], shared_a=qkv_a)
        v = dense(h, (K, Hd), ("embed", "kv_heads", "head_dim"), c.qkv_bias, a["v_proj"], shared_a=qkv_a)
        if c.qk_norm:
            q = _norm(c, None, "head_dim").apply({"params": a["q_norm"]}, q)
            k = _norm(c, None, "head_dim").apply({"params": a["k_norm"]}, k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        at = (layer, 0, index, 0, 0)
        k_new = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), at)
        v_new = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), at)
        _, B, S, _, _ = k_new.shape
        kc = jax.lax.dynamic_slice(k_new, (layer, 0, 0, 0, 0), (1, B, S, K, Hd))[0].astype(q.dtype)
        vc = jax.lax.dynamic_slice(v_new, (layer, 0, 0, 0, 0), (1, B, S, K, Hd))[0].astype(q.dtype)
        out = attend(q, kc, vc, mask, scale=c.attention_scale, impl=c.attention_impl,
                     softcap=c.attn_logit_softcapping)
        out = dense(out, D, ("heads", "head_dim", "embed"), c.o_bias, a["o_proj"], axis=(-2, -1),
                    bias_axes=("embed",))
        return out, (k_new, v_new)

    mlp = _mlp_cls(c, unrolled)(c, unrolled)
    x, (k_all, v_all) = _residual_blocks(c, lambda name: (lambda h: _norm(c).apply({"params": p[name]}, h)), x,
                                         attention, lambda h: mlp.apply({"params": p["mlp"]}, h))
    return x, k_all, v_all


def decode_forward(cfg: ModelConfig, params, cache: dict, input_ids, positions, q_segment_ids):
    """Cached forward of ``T`` new tokens per row, written at slots ``[index, index + T)`` of ``cache``.

    ``params``: the decoder's params (scanned or unrolled layers); ``cache`` from :func:`init_decode_cache`;
    ``input_ids, positions, q_segment_ids [B, T]``. Attention covers the cache's ``S`` slots (causal by slot, same
    segment, sliding windows), so its cost follows the cache length the caller allocated. Returns the final-norm
    hidden states ``[B, T, D]`` and the cache with ``k/v`` updated in place and ``index + T``.
    """
    c = cfg
    B, T = input_ids.shape
    idx = cache["index"]
    S = cache["segment_ids"].shape[1]
    kv_seg = jax.lax.dynamic_update_slice(cache["segment_ids"], q_segment_ids.astype(jnp.int32), (0, idx))
    q_slots = idx + jnp.arange(T, dtype=jnp.int32)
    kv_slots = jnp.arange(S, dtype=jnp.int32)
    base_mask = build_mask(q_slots, kv_slots, q_segment_ids.astype(jnp.int32), kv_seg)
    x = _embed_scale(c, nn.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype).apply(
        {"params": params["embed_tokens"]}, input_ids).astype(c.dtype))
    cos, sin = rope_cos_sin(c, positions, c.dtype)
    windows = c.window_array() if c.has_sliding_window else None

    def mask_for(w):
        return base_mask if w is None else base_mask & window_mask(q_slots, kv_slots, w)

    k_all, v_all = cache["k"], cache["v"]
    if c.scan_layers:
        ws = jnp.asarray(windows if windows is not None else (0,) * c.num_hidden_layers, jnp.int32)

        def body(carry, xs):
            x, k_all, v_all = carry
            p, layer, w = xs
            w = None if windows is None else w
            lc, ls = layer_cos_sin(cos, sin, w, NO_WINDOW)
            x, k_all, v_all = _decode_layer(c, p, x, lc, ls, mask_for(w), k_all, v_all, layer, idx)
            return (x, k_all, v_all), None

        (x, k_all, v_all), _ = jax.lax.scan(
            body, (x, k_all, v_all), (params["layers"], jnp.arange(c.num_hidden_layers, dtype=jnp.int32), ws))
    else:
        for i in range(c.num_hidden_layers):
            w = None if windows is None else windows[i]
            lc, ls = layer_cos_sin(cos, sin, w, NO_WINDOW)
            x, k_all, v_all = _decode_layer(c, params[f"layers_{i}"], x, lc, ls, mask_for(w), k_all, v_all, i, idx,
                                            unrolled=i)
    h = _norm(c).apply({"params": params["norm"]}, x)
    return h, {"k": k_all, "v": v_all, "segment_ids": kv_seg, "index": idx + T}
