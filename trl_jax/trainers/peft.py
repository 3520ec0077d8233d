"""LoRA in the trainers (TRL's ``peft_config=``): adapters on the loaded model, the frozen base kept in the
compute dtype, only adapters (and ``modules_to_save``) trained, the base with adapters off as the reference, and
PEFT-format saving.

A model path that is a PEFT adapter directory (``adapter_config.json``: saved by trl_jax or PEFT) loads its base
(``base_model_name_or_path``) plus the adapters, which then keep training.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp

from trl_jax.models.lora import (LoraSpec, adapters_are_identity, count_params, dropout_rng, reference_params,
                                 resolve_lora, trainable_names, without_adapters)
from trl_jax.train.precision import KEEP_FP32
from trl_jax.utils.trees import partition

logger = logging.getLogger(__name__)


def _cast_frozen_inplace(params, trainable: frozenset, dtype) -> None:
    """Frozen floating leaves to ``dtype``, one leaf at a time (the wider copy is released as it goes)."""

    def walk(node, prefix):
        for k in list(node):
            v = node[k]
            names = prefix + (str(k),)
            if isinstance(v, dict):
                walk(v, names)
            elif (names not in trainable and jnp.issubdtype(v.dtype, jnp.floating) and v.dtype != dtype
                  and names[-1] not in KEEP_FP32):  # 4-/8-bit scales stay fp32, as bitsandbytes keeps them
                node[k] = v.astype(dtype)
                del v

    walk(params, ())


class PeftMixin:
    """Mixed into ``BaseTrainer``: LoRA set-up at load time, the trainable predicate for the step, the base
    reference and adapter saving. ``lora_spec`` is ``None`` for a full fine-tune."""

    lora_spec: LoraSpec | None = None
    _trainable: frozenset | None = None
    _ref_is_base = False
    _base_model_path: str | None = None

    def _setup_peft(self, model, params, model_path, peft_config):
        """``(model, params, model_path)`` with adapters when ``peft_config`` is given or ``model_path`` is a
        PEFT adapter directory; otherwise unchanged."""
        from trl_jax.models.peft_io import add_adapters, load_adapter

        adapter_dir = getattr(self, "_adapter_dir", None)
        if peft_config is None and adapter_dir is None:
            quant = self._quantization_type()
            if quant == "int8":
                raise ValueError("load_in_8bit (LLM.int8) trains LoRA adapters on a frozen 8-bit base: pass a "
                                 "peft_config (YAML: `use_peft: true` and the lora_* keys); an 8-bit model cannot "
                                 "be trained in full.")
            if quant is not None:
                raise ValueError("load_in_4bit (QLoRA) trains LoRA adapters on a frozen 4-bit base: pass a "
                                 "peft_config (YAML: `use_peft: true` and the lora_* keys); a 4-bit model cannot "
                                 "be trained in full.")
            return model, params, model_path
        if peft_config is not None and adapter_dir is not None:
            raise ValueError(f"{adapter_dir} is a PEFT adapter directory and a peft_config was given too: pass one "
                             "(the directory continues its own adapters).")
        compute = self._compute_dtype_for_base()
        quant = self._quantization_type()
        if quant is not None:  # QLoRA: the frozen base in 4 (or 8) bits, the adapters trained on top
            from trl_jax.models.peft_io import quantize_model

            model, params = quantize_model(model, params, quant, mesh=self.mesh,
                                           llm_int8_threshold=self._llm_int8_threshold())
        if adapter_dir is not None:
            model, params = load_adapter(adapter_dir, model, params, mesh=self.mesh)
            tok = any(f.startswith("tokenizer") for f in os.listdir(adapter_dir))
            model_path = adapter_dir if tok else model_path
        else:
            spec = resolve_lora(peft_config, model.config)
            model, params = add_adapters(model, params, spec, rng=jax.random.PRNGKey(self.args.seed), mesh=self.mesh)
        self.lora_spec = model.config.lora
        self._trainable = trainable_names(params, self.lora_spec)
        if compute is not None:  # TRL/PEFT: the frozen base in the model's (compute) dtype, adapters in fp32
            _cast_frozen_inplace(params, self._trainable, compute)
        trained, _ = partition(params, self._trainable_pred())
        self.num_trainable_parameters = count_params(trained)
        self.num_parameters = count_params(params)
        logger.info("trainable params: %s || all params: %s || trainable%%: %.4f", f"{self.num_trainable_parameters:,}",
                    f"{self.num_parameters:,}", 100 * self.num_trainable_parameters / max(self.num_parameters, 1))
        return model, params, model_path

    def _quantization_get(self):
        """A getter on ``model_init_kwargs["quantization_config"]`` (a ``BitsAndBytesConfig`` or its dict), or
        ``None`` without one."""
        kwargs = getattr(self.args, "model_init_kwargs", None) or {}
        qc = kwargs.get("quantization_config") if isinstance(kwargs, dict) else None
        if qc is None:
            return None
        return (lambda k, d=None: qc.get(k, d)) if isinstance(qc, dict) else (lambda k, d=None: getattr(qc, k, d))

    def _llm_int8_threshold(self) -> float:
        get = self._quantization_get()
        t = get("llm_int8_threshold", 6.0) if get is not None else 6.0
        return 6.0 if t is None else float(t)

    def _quantization_type(self) -> str | None:
        """``"nf4"`` / ``"fp4"`` (``load_in_4bit``) or ``"int8"`` (``load_in_8bit``, LLM.int8) from
        ``model_init_kwargs["quantization_config"]`` (a ``BitsAndBytesConfig`` or its dict, as TRL passes it),
        ``None`` without one. Nested 4-bit quantization and 8-bit options trl_jax does not implement are
        refused."""
        get = self._quantization_get()
        if get is None:
            return None
        if get("load_in_8bit", False):
            if get("load_in_4bit", False):
                raise ValueError("load_in_8bit and load_in_4bit are both set: choose one (TRL and transformers "
                                 "refuse both at once).")
            if get("llm_int8_has_fp16_weight", False):
                raise ValueError("llm_int8_has_fp16_weight (a trainable fp16 master weight next to the int8 one) "
                                 "is not implemented: leave it off (the 8-bit base is frozen and LoRA adapters "
                                 "train), or train without quantization.")
            skip = get("llm_int8_skip_modules", None) or []
            other = [m for m in ([skip] if isinstance(skip, str) else skip) if m not in ("lm_head", "score")]
            if other:
                raise ValueError(f"llm_int8_skip_modules={skip!r}: trl_jax quantizes every attention/MLP projection "
                                 "and never the head; leave it unset (or name only lm_head / score).")
            if self._llm_int8_threshold() < 0:
                raise ValueError("llm_int8_threshold must be >= 0 (0: no outlier columns; default 6.0).")
            return "int8"
        if not get("load_in_4bit", False):
            return None
        if get("bnb_4bit_use_double_quant", False):
            raise ValueError("bnb_4bit_use_double_quant (nested quantization of the scales) is not implemented: "
                             "leave use_bnb_nested_quant off (the scales stay fp32, 0.5 bit per weight).")
        from trl_jax.models.quant import code_values

        quant = get("bnb_4bit_quant_type", "fp4")  # transformers' BitsAndBytesConfig default
        code_values(quant)  # validates
        return quant

    def _compute_dtype_for_base(self):
        from trl_jax.trainers.base import _dtype

        c = _dtype(self.args.compute_dtype)
        return None if c is None or jnp.dtype(c) == jnp.dtype(_dtype(self.args.param_dtype)) else c

    def _trainable_pred(self):
        if self._trainable is None:
            return None
        names = self._trainable
        return lambda path: path in names

    def _training_context(self):
        """LoRA dropout inside train steps (fresh masks per micro-batch); ``None`` when there is none."""
        if self.lora_spec is None or self.lora_spec.lora_dropout <= 0:
            return None
        return lambda rng: dropout_rng(jax.random.fold_in(rng, 0x10A))

    def print_trainable_parameters(self) -> None:
        """PEFT's line: trainable / all parameters."""
        if self.lora_spec is None:
            n = count_params(self.trained_params)
            print(f"trainable params: {n:,} || all params: {n:,} || trainable%: 100.0000")
            return
        print(f"trainable params: {self.num_trainable_parameters:,} || all params: {self.num_parameters:,} || "
              f"trainable%: {100 * self.num_trainable_parameters / self.num_parameters:.4f}")

    # ------------------------------------------------------------------ the reference
    def _lora_reference_originals(self, ref_model):
        """With LoRA and no ``ref_model`` the reference is the base (adapters off), as TRL's
        ``disable_adapter()``: no second copy of the weights, only the original ``modules_to_save`` weights."""
        if self.lora_spec is None or ref_model is not None:
            return False, None
        if getattr(self.args, "sync_ref_model", False):
            raise ValueError("sync_ref_model (TR-DPO) needs a separate reference: with LoRA and ref_model=None the "
                             "reference is the base model itself; pass ref_model or turn sync_ref_model off.")
        self._ref_is_base = True
        saved = partition(self.params, lambda p: any(m in p[:-1] for m in self.lora_spec.modules_to_save))[0]
        if not saved:
            return True, None
        from trl_jax.trainers.base import _dtype

        dtype = _dtype(getattr(self.args, "ref_param_dtype", None) or self.args.compute_dtype)
        return True, jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x.copy(),
                                  saved)

    def _reference(self, params, ref_params):
        """The reference params a loss uses: ``ref_params`` as given, or (LoRA, no ref_model) the policy's own
        base weights with its adapters removed and the original ``modules_to_save``."""
        if not self._ref_is_base:
            return ref_params
        return reference_params(params, ref_params)

    # ------------------------------------------------------------------ saving
    def _save_adapter_or_model(self, params, directory: str, merged: bool) -> None:
        from trl_jax.models import save_pretrained
        from trl_jax.models.lora import merge_adapters
        from trl_jax.models.peft_io import save_adapter

        if self.lora_spec is None:
            save_pretrained(self.model, params, directory, tokenizer=self.processing_class)
        elif merged:
            from trl_jax.models.model import CausalLM
            from trl_jax.models.quant import dequantize_model_params
            from trl_jax.trainers.base import _dtype

            if self.model.config.quantization:  # QLoRA: W = dequant(4-bit codes) + scaling * A B, in fp32
                params = dequantize_model_params(self.model, params)
            plain = CausalLM(self.model.config.replace(lora=None, quantization=None), hf_config=self.model.hf_config,
                             value_head=self.model.value_head)
            save_pretrained(plain, merge_adapters(params, self.lora_spec, dtype=_dtype(self.args.param_dtype)),
                            directory, tokenizer=self.processing_class)
        else:
            save_adapter(self.model, params, directory, base_model_name_or_path=self._base_model_path,
                         tokenizer=self.processing_class)


def lora_params_equal(params, ref_params, params_equal) -> jax.Array:
    """``params`` (with adapters) compute exactly ``ref_params`` (the base): every adapter is the identity and the
    remaining weights are equal."""
    return adapters_are_identity(params) & params_equal(without_adapters(params), ref_params)


__all__ = ["PeftMixin"]
