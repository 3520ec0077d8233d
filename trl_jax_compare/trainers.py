"""TRL's trainers built from the fields of a config, with every dropout off, and a tiny PyTorch model directory."""

from __future__ import annotations

import torch

KINDS = ("sft", "dpo", "kto", "grpo", "online-dpo")


def trl_classes(kind: str):
    """``(config class, trainer class)`` of TRL for ``kind``."""
    import trl

    if kind == "sft":
        return trl.SFTConfig, trl.SFTTrainer
    if kind == "dpo":
        return trl.DPOConfig, trl.DPOTrainer
    if kind == "kto":
        from trl.trainer.kto_config import KTOConfig
        from trl.trainer.kto_trainer import KTOTrainer

        return KTOConfig, KTOTrainer
    if kind == "grpo":
        return trl.GRPOConfig, trl.GRPOTrainer
    if kind == "online-dpo":
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

        return OnlineDPOConfig, OnlineDPOTrainer
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def disable_dropout(*models) -> None:
    """Set every dropout probability of ``models`` (``None`` entries skipped) to 0."""
    for m in models:
        if m is None:
            continue
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
            for name in ("attention_dropout", "dropout", "hidden_dropout"):
                if isinstance(getattr(mod, name, None), float):
                    setattr(mod, name, 0.0)


def build_trl_trainer(kind: str, model, args_kwargs: dict, dataset, processing_class=None, callbacks=None,
                      trainer_cls=None, **trainer_kwargs):
    """TRL's trainer of ``kind`` (or ``trainer_cls``, a subclass of it) for ``args_kwargs`` (fields of its config),
    with every dropout of the policy (and reference) model switched off. ``trainer_kwargs``: e.g. ``reward_funcs``
    for GRPO / online DPO, ``rollout_func`` for GRPO."""
    cfg_cls, default_cls = trl_classes(kind)
    args = cfg_cls(**args_kwargs)
    if processing_class is None and isinstance(model, str):
        from transformers import AutoTokenizer

        processing_class = AutoTokenizer.from_pretrained(model)
    trainer = (trainer_cls or default_cls)(model=model, args=args, train_dataset=dataset,
                                           processing_class=processing_class, callbacks=callbacks, **trainer_kwargs)
    disable_dropout(getattr(trainer, "model", None), getattr(trainer, "ref_model", None))
    return trainer


def make_model_dir(path: str, *, seed: int = 0, hidden_size: int = 32, num_layers: int = 2,
                   initializer_range: float = 0.1, tie_word_embeddings: bool = False) -> str:
    """Save a random fp32 PyTorch ``Qwen3ForCausalLM`` (``hidden_size``, ``num_layers``, no dropout) with trl_jax's
    character tokenizer as an HF directory both sides load."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from trl_jax.assets import build_char_tokenizer

    tok = build_char_tokenizer()
    heads = max(hidden_size // 8, 2)
    cfg = Qwen3Config(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
        head_dim=8, max_position_embeddings=256, initializer_range=initializer_range,
        tie_word_embeddings=tie_word_embeddings, attention_dropout=0.0,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path
