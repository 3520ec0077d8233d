"""LoRA adapters on a loaded model, and PEFT's adapter directory format in and out (no torch, no peft).

A PEFT adapter directory holds ``adapter_config.json`` (``peft.LoraConfig`` fields) and
``adapter_model.safetensors`` with ``base_model.model.<HF module>.lora_A.weight [r, in]``,
``...lora_B.weight [out, r]``, ``...lora_magnitude_vector [out]`` (DoRA) and ``base_model.model.<HF name>`` for the
``modules_to_save``; ``peft.PeftModel.from_pretrained(transformers_model, directory)`` loads what
:func:`save_adapter` writes, and :func:`load_adapter` reads what PEFT saves.

A fused module (Phi-3's ``qkv_proj`` / ``gate_up_proj``) is one PEFT adapter: its ``lora_A`` is our shared
``qkv_proj/lora_a``, its ``lora_B`` rows (and magnitude) the parts' ``lora_b`` concatenated in q, k, v (gate, up)
order.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from trl_jax.models.hf_io import _get as _get_path
from trl_jax.models.hf_io import _param_path, _to_host, param_entries
from trl_jax.models.lora import (ADAPTER_LEAVES, FUSED_GROUPS, LoraSpec, combine, dora_weight_norm, lora_a_init,
                                 lora_b_init, path_names, resolve_lora, shared_a_path)
from trl_jax.models.model import CausalLM
from trl_jax.models.safetensors_io import SafetensorsFile, save_file

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_PEFT_LEAF = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}
# our projection -> HF module path inside a layer
_HF_PROJ = {**{p: f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")},
            **{p: f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj", "gate_up_proj")}}


def is_adapter_dir(path) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), ADAPTER_CONFIG_NAME))


def read_adapter_config(directory) -> dict:
    with open(os.path.join(os.fspath(directory), ADAPTER_CONFIG_NAME)) as fh:
        return json.load(fh)


def with_lora(model: CausalLM, spec: LoraSpec | None) -> CausalLM:
    """The same model with ``spec``'s adapters in its config (``None``: the plain model)."""
    return CausalLM(model.config.replace(lora=spec), hf_config=model.hf_config, value_head=model.value_head)


def _new_leaves(model: CausalLM, params):
    """``[(names, abstract leaf)]`` of the leaves ``model`` (with adapters) has and ``params`` lacks."""
    have = {path_names(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
    return [(path_names(p), x) for p, x in jax.tree_util.tree_leaves_with_path(model.abstract_params())
            if path_names(p) not in have]


def _shardings(model: CausalLM, mesh, rules):
    from jax.sharding import SingleDeviceSharding

    from trl_jax.models.sharding import param_shardings

    abstract = model.abstract_params()
    if mesh is None:
        dev = SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda _: dev, abstract)
    return param_shardings(model.logical_axes(), abstract, mesh, rules)


def add_adapters(model: CausalLM, params, spec: LoraSpec, *, rng=None, mesh=None, rules=None,
                 adapter_dtype=None, _placeholders=False):
    """``(adapted model, params with new adapters)``: LoRA A random (PEFT's init), B zero (so the adapted model
    equals the base), DoRA magnitudes ``||W||`` of the loaded kernels. New leaves are placed on the sharding their
    logical axes give on ``mesh`` (the kernel's input/output axes); ``adapter_dtype`` defaults to the
    model's ``param_dtype``. ``params`` are not copied. (``_placeholders``: zeros everywhere, for
    :func:`load_adapter` to overwrite: no random init to compile.)"""
    lmodel = with_lora(model, spec)
    dtype = adapter_dtype or model.config.param_dtype
    rng = jax.random.PRNGKey(0) if rng is None else rng
    shardings = _shardings(lmodel, mesh, rules)
    new: dict = {}
    leaves = _new_leaves(lmodel, params)
    # one compiled init for every A and B (keys: fold_in(rng, leaf index)), one for every DoRA magnitude
    ab = [(i, names, x.shape) for i, (names, x) in enumerate(leaves) if names[-1] in ("lora_a", "lora_b")]

    def make_all(rng):
        out = []
        for i, names, shape in ab:
            if _placeholders:
                out.append(jnp.zeros(shape, dtype))
                continue
            init = lora_a_init if names[-1] == "lora_a" else lora_b_init
            key = jax.random.fold_in(rng, i)
            if names[0] == "layers":
                keys = jax.random.split(key, shape[0])
                out.append(jax.vmap(lambda k, init=init, shape=shape: init(k, shape[1:], dtype,
                                                                            spec.init_lora_weights))(keys))
            else:
                out.append(init(key, shape, dtype, spec.init_lora_weights))
        return out

    if ab:
        made = jax.jit(make_all, out_shardings=[_get_path(shardings, names) for _, names, _ in ab])(rng)
        for (_, names, _), arr in zip(ab, made):
            _set(new, names, arr)
    mags = []  # (names, A path, n_in, kernel)
    for names, x in leaves:
        if names[-1] != "lora_magnitude":
            continue
        if _placeholders:
            _set(new, names, jax.device_put(jnp.zeros(x.shape, dtype), _get_path(shardings, names)))
            continue
        module = names[:-1]
        a_path = module + ("lora_a",)
        if not _has_path(new, a_path):  # a part of a fused module: the shared A
            a_path = shared_a_path(module)
        a = _get_path(new, a_path)
        n_in = a.ndim - 1 - (1 if names[0] == "layers" else 0)
        mags.append((names, a_path, n_in, _kernel_of(model, params, module, a.shape[a.ndim - 1 - n_in:-1])))

    def norms(kernels, As, Bs):
        out = []
        for (names, _, n_in, _), k, a, b in zip(mags, kernels, As, Bs):
            f = lambda k, a, b, n_in=n_in: dora_weight_norm(  # noqa: E731
                k.astype(jnp.float32), a.astype(jnp.float32), b.astype(jnp.float32), spec.scaling, n_in).astype(dtype)
            out.append(jax.vmap(f)(k, a, b) if names[0] == "layers" else f(k, a, b))
        return out

    if mags:
        made = jax.jit(norms, out_shardings=[_get_path(shardings, m[0]) for m in mags])(
            [m[3] for m in mags], [_get_path(new, m[1]) for m in mags],
            [_get_path(new, m[0][:-1] + ("lora_b",)) for m in mags])
        for m, arr in zip(mags, made):
            _set(new, m[0], arr)
    missing = [names for names, _ in leaves if names[-1] not in ADAPTER_LEAVES]
    if missing:
        raise ValueError(f"adding adapters created unexpected parameters {missing[:3]}")
    return untie_saved_embedding(lmodel, combine(params, new), mesh=mesh, rules=rules)


def quantize_model(model: CausalLM, params, quant_type: str = "nf4", *, mesh=None, rules=None,
                   llm_int8_threshold: float = 6.0):
    """``(4-bit model, params)``: every projection kernel stored as bitsandbytes' blockwise 4-bit codes
    (``kernel_q``, ``kernel_absmax``; trl_jax.models.quant), one leaf at a time, placed on the shardings the
    quantized model's logical axes give on ``mesh``. Embeddings, norms and heads stay as they are.
    ``quant_type="int8"``: LLM.int8 instead (``kernel_int8``, ``kernel_scb``; outlier columns at
    ``|x| >= llm_int8_threshold``, none when it is 0)."""
    from trl_jax.models.quant import quantize_params

    extra = {"llm_int8_threshold": float(llm_int8_threshold)} if quant_type == "int8" else {}
    qmodel = CausalLM(model.config.replace(quantization=quant_type, **extra), hf_config=model.hf_config,
                      value_head=model.value_head)
    params = jax.tree.map(lambda x: x, params)
    experts = _pop_expert_mlps(model.config, params)  # mixture of experts: the experts stay unquantized
    params = quantize_params(params, quant_type)
    for layer, mlp in experts.items():
        params[layer]["mlp"] = mlp
    return qmodel, jax.device_put(params, _shardings(qmodel, mesh, rules))


def _pop_expert_mlps(cfg, params) -> dict:
    """Take the expert MLPs (``{layer key: mlp params}``) out of ``params``: transformers stores experts as 3-D
    parameters, which bitsandbytes leaves unquantized (it wraps ``nn.Linear`` only)."""
    if not cfg.num_experts:
        return {}
    keys = (["layers"] if cfg.scan_layers else
            [f"layers_{i}" for i in range(cfg.num_hidden_layers) if cfg.is_sparse_layer(i)])
    return {k: params[k].pop("mlp") for k in keys if k in params and "mlp" in params[k]}


def untie_saved_embedding(model: CausalLM, params, *, mesh=None, rules=None):
    """PEFT's tied-weights rule for ``modules_to_save`` naming ``embed_tokens`` and/or ``lm_head`` on a tied
    model: each named module trains its own copy (``embed_tokens`` feeds the input only, ``lm_head`` the output
    only) and the other keeps the original weight. Returns ``(model, params)`` with an untied ``lm_head``
    initialised from the embedding (a copy), or unchanged when the rule does not apply (``ensure_weight_tying``
    keeps one tied, trained weight)."""
    import copy

    cfg, spec = model.config, model.config.lora
    if not (spec and {"embed_tokens", "lm_head"} & set(spec.modules_to_save) and cfg.tie_word_embeddings
            and cfg.has_lm_head and not cfg.num_labels and not spec.ensure_weight_tying):
        return model, params
    hf = copy.deepcopy(model.hf_config) if model.hf_config is not None else None
    if hf is not None:
        hf.tie_word_embeddings = False
    untied = CausalLM(cfg.replace(tie_word_embeddings=False), hf_config=hf, value_head=model.value_head)
    sharding = _get_path(_shardings(untied, mesh, rules), ("lm_head", "kernel"))
    kernel = jax.jit(lambda e: e.T, out_shardings=sharding)(params["embed_tokens"]["embedding"])
    return untied, {**params, "lm_head": {"kernel": kernel}}


def _kernel_of(model: CausalLM, params, module: tuple, in_shape: tuple):
    """The (dequantized, fp32) kernel of ``module``."""
    node = _get_path(params, module)
    if "kernel" in node:
        return node["kernel"]
    from trl_jax.models.quant import dequantize_int8_kernel, dequantize_kernel

    if "kernel_int8" in node:
        g = dequantize_int8_kernel
        return jax.vmap(g)(node["kernel_int8"], node["kernel_scb"]) if module[0] == "layers" else g(
            node["kernel_int8"], node["kernel_scb"])
    f = lambda q, a: dequantize_kernel(q, a, in_shape, model.config.quantization)  # noqa: E731
    return jax.vmap(f)(node["kernel_q"], node["kernel_absmax"]) if module[0] == "layers" else f(
        node["kernel_q"], node["kernel_absmax"])


def _has_path(tree, names) -> bool:
    for n in names:
        if not isinstance(tree, dict) or n not in tree:
            return False
        tree = tree[n]
    return True


def _set(tree, names, value):
    for n in names[:-1]:
        tree = tree.setdefault(n, {})
    tree[names[-1]] = value


# ------------------------------------------------------------------------------------------ saving
def _adapter_modules(model: CausalLM, params):
    """``[(HF module name, our module path, layer, parts)]`` of every adapted PEFT module (one entry per layer).
    ``parts``: a fused module's split projections (paths of their B / magnitude, in PEFT's row order; its A at
    ``our module path``), ``()`` for a plain projection."""
    cfg = model.config
    out = []
    for i, names in enumerate(cfg.lora.targets):
        for proj in names:
            hf = _HF_PROJ[proj]
            group = hf.split(".")[0]
            prefix = (("layers",) if cfg.scan_layers else (f"layers_{i}",)) + (group,)
            parts = tuple(prefix + (p,) for p in FUSED_GROUPS.get(proj, ()))
            out.append((f"model.layers.{i}.{hf}", prefix + (proj,), i, parts))
    return out


def adapter_state_dict(model: CausalLM, params) -> dict[str, np.ndarray]:
    """PEFT's adapter tensors (names and layouts of ``adapter_model.safetensors``) as host arrays."""
    cfg, spec = model.config, model.config.lora
    out: dict[str, np.ndarray] = {}
    cache: dict = {}

    def host(path, i):
        if path not in cache:
            cache[path] = _to_host(_get_path(params, path))
        x = cache[path]
        return x[i] if cfg.scan_layers and path[0] == "layers" else x

    for hf, ours, i, parts in _adapter_modules(model, params):
        rows = parts or (ours,)  # B / magnitude: a fused module's parts' rows, concatenated in PEFT's order
        a = host(ours + ("lora_a",), i)
        b = np.concatenate([host(p + ("lora_b",), i).reshape(spec.r, -1).T for p in rows])
        out[f"{_PREFIX}{hf}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, spec.r).T)
        out[f"{_PREFIX}{hf}.lora_B.weight"] = np.ascontiguousarray(b)
        if spec.use_dora:
            out[f"{_PREFIX}{hf}.lora_magnitude_vector"] = np.ascontiguousarray(np.concatenate(
                [host(p + ("lora_magnitude",), i).reshape(-1) for p in rows]))
    for entry, names, i in _saved_module_entries(model, params):
        arr = host(names, i if entry.stacked else None)
        out[_PREFIX + entry.hf.format(i=i)] = np.ascontiguousarray(entry.to_hf(arr))
    return out


def _saved_module_entries(model: CausalLM, params):
    cfg, spec = model.config, model.config.lora
    value_head = "v_head" in params
    out = []
    for entry in param_entries(cfg, value_head=value_head):
        if not any(m in entry.path[:-1] for m in spec.modules_to_save):
            continue
        if entry.stacked:
            out += [(entry, _param_path(entry, cfg, i), i) for i in range(cfg.num_hidden_layers)]
        else:
            out.append((entry, entry.path, 0))
    return out


def adapter_config_dict(spec: LoraSpec, base_model_name_or_path: str | None) -> dict:
    target = spec.target_modules
    if spec.fused and isinstance(target, str) and target.lower() == "all-linear":
        # as PEFT writes it for Phi-3: 'all-linear' expanded to the adapted modules' full names
        target = tuple(f"model.layers.{i}.{_HF_PROJ[p]}" for i, names in enumerate(spec.targets) for p in names)
    return {
        "peft_type": "LORA",
        "task_type": spec.task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": spec.r,
        "lora_alpha": spec.lora_alpha,
        "lora_dropout": spec.lora_dropout,
        "target_modules": target if isinstance(target, str) else sorted(target),
        "modules_to_save": list(spec.modules_to_save) or None,
        "bias": spec.bias,
        "use_rslora": spec.use_rslora,
        "use_dora": spec.use_dora,
        "init_lora_weights": spec.init_lora_weights,
        "layers_to_transform": None if spec.layers_to_transform is None else list(spec.layers_to_transform),
        "layers_pattern": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
        "ensure_weight_tying": spec.ensure_weight_tying,
    }


def save_adapter(model: CausalLM, params, save_directory, *, base_model_name_or_path: str | None = None,
                 tokenizer=None) -> str:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` (PEFT's layout). Every process of a
    multi-host run must call it (gathers); process 0 writes."""
    if model.config.lora is None:
        raise ValueError("save_adapter: the model has no LoRA adapters (model.config.lora is None).")
    tensors = adapter_state_dict(model, params)
    if jax.process_index() != 0:
        return os.fspath(save_directory)
    os.makedirs(save_directory, exist_ok=True)
    save_file(tensors, os.path.join(save_directory, ADAPTER_WEIGHTS_NAME))
    with open(os.path.join(save_directory, ADAPTER_CONFIG_NAME), "w") as fh:
        json.dump(adapter_config_dict(model.config.lora, base_model_name_or_path), fh, indent=2, sort_keys=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(save_directory)
    return os.fspath(save_directory)


# ------------------------------------------------------------------------------------------ loading
def load_adapter(directory, model: CausalLM, params, *, mesh=None, rules=None, adapter_dtype=None):
    """``(adapted model, params)``: the adapters of a PEFT directory (saved by PEFT or :func:`save_adapter`) put
    on ``model`` (the base, loaded by ``from_pretrained``). ``modules_to_save`` weights replace the base's."""
    directory = os.fspath(directory)
    config = read_adapter_config(directory)
    spec = resolve_lora(config, model.config)
    lmodel, params = add_adapters(model, params, spec, mesh=mesh, rules=rules, adapter_dtype=adapter_dtype,
                                  _placeholders=True)  # every adapter leaf is read from the file below
    f = SafetensorsFile(os.path.join(directory, ADAPTER_WEIGHTS_NAME))
    keys = set(f.keys())
    names = {k.replace(".default.", ".") for k in keys}
    if names != keys:
        raise ValueError(f"{directory}: adapter tensors named with an adapter name ('.default.') are not supported.")
    shardings = _shardings(lmodel, mesh, rules)
    dtype = np.dtype(jnp.dtype(adapter_dtype or model.config.param_dtype))
    cfg = lmodel.config
    used = set()
    per_leaf: dict = {}
    def layer_shape(path):
        want = _get_path(params, path)
        return want.shape[1:] if path[0] == "layers" else want.shape

    for hf, ours, i, parts in _adapter_modules(lmodel, params):
        for leaf, peft_name in _PEFT_LEAF.items():
            if leaf == "lora_magnitude" and not spec.use_dora:
                continue
            key = f"{_PREFIX}{hf}.{peft_name}"
            if key not in keys:
                raise ValueError(f"{directory}: {ADAPTER_WEIGHTS_NAME} lacks {key!r}.")
            used.add(key)
            t = f[key]
            if leaf == "lora_a":
                per_leaf.setdefault(ours + (leaf,), {})[i] = t.T.reshape(layer_shape(ours + (leaf,)))
                continue
            rows = parts or (ours,)  # a fused module's B rows / magnitudes: its parts', in PEFT's order
            shapes = [layer_shape(p + (leaf,)) for p in rows]
            sizes = [int(np.prod(sh[1:] if leaf == "lora_b" else sh)) for sh in shapes]
            if t.shape[0] != sum(sizes):
                raise ValueError(f"{directory}: {key} has {t.shape[0]} rows, expected {sum(sizes)} "
                                 f"({' + '.join(map(str, sizes))}).")
            start = 0
            for p, sh, n in zip(rows, shapes, sizes):
                part = t[start:start + n]
                start += n
                per_leaf.setdefault(p + (leaf,), {})[i] = part.T.reshape(sh) if leaf == "lora_b" else part.reshape(sh)
    for entry, names_, i in _saved_module_entries(lmodel, params):
        key = _PREFIX + entry.hf.format(i=i)
        if key not in keys:
            raise ValueError(f"{directory}: {ADAPTER_WEIGHTS_NAME} lacks {key!r} (a modules_to_save weight).")
        used.add(key)
        per_leaf.setdefault(names_, {})[i] = entry.to_ours(f[key])
    unused = keys - used
    params = jax.tree.map(lambda x: x, params)  # fresh containers: the caller's tree is not modified
    if unused:
        raise ValueError(f"{directory}: adapter tensors {sorted(unused)[:3]} do not belong to this "
                         f"{cfg.model_type} model with target_modules={spec.target_modules!r}.")
    unset = [n for n in (path_names(p) for p, _ in jax.tree_util.tree_leaves_with_path(params))
             if n[-1] in ADAPTER_LEAVES and n not in per_leaf]
    if unset:  # (add_adapters made placeholders: each one must come from the file)
        raise ValueError(f"{directory}: no tensor for the adapter leaves {['/'.join(n) for n in unset[:3]]}.")
    for names_, by_layer in per_leaf.items():
        stacked = names_[0] == "layers"
        arr = np.stack([by_layer[i] for i in sorted(by_layer)]) if stacked else by_layer[next(iter(by_layer))]
        old = _get_path(params, names_)
        if tuple(arr.shape) != tuple(old.shape):
            raise ValueError(f"{directory}: tensor for {'/'.join(names_)} has shape {arr.shape}, expected {old.shape}.")
        leaf_dtype = dtype if names_[-1] in ADAPTER_LEAVES else np.dtype(old.dtype)
        _set_existing(params, names_, jax.device_put(arr.astype(leaf_dtype), _get_path(shardings, names_)))
    return lmodel, params


def _set_existing(tree, names, value):
    for n in names[:-1]:
        tree = tree[n]
    tree[names[-1]] = value


def spec_from_adapter_dir(directory, model_cfg) -> LoraSpec:
    return resolve_lora(read_adapter_config(directory), model_cfg)


def replace_spec(spec: LoraSpec, **kw) -> LoraSpec:
    return dataclasses.replace(spec, **kw)


__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "add_adapters",
    "adapter_state_dict",
    "is_adapter_dir",
    "load_adapter",
    "quantize_model",
    "read_adapter_config",
    "save_adapter",
    "with_lora",
]
