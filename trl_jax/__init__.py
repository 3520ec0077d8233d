"""trl_jax: TRL's trainers as functional JAX/Flax code.

``from trl_jax import SFTTrainer, SFTConfig`` mirrors ``from trl import ...``; the heavy modules are imported on
first use, so ``import trl_jax.losses.dpo`` stays light.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "SFTConfig": "trl_jax.configs", "DPOConfig": "trl_jax.configs", "KTOConfig": "trl_jax.configs",
    "GRPOConfig": "trl_jax.configs", "OnlineDPOConfig": "trl_jax.configs", "RewardConfig": "trl_jax.configs",
    "ModelConfig": "trl_jax.configs",
    "ScriptArguments": "trl_jax.configs",
    "SFTTrainer": "trl_jax.trainers", "GRPOTrainer": "trl_jax.trainers", "OnlineDPOTrainer": "trl_jax.trainers", "DPOTrainer": "trl_jax.trainers", "KTOTrainer": "trl_jax.trainers",
    "RewardTrainer": "trl_jax.trainers",
    "DistillationConfig": "trl_jax.configs", "DistillationTrainer": "trl_jax.trainers",
    "RLOOConfig": "trl_jax.configs", "RLOOTrainer": "trl_jax.trainers",
    "selective_log_softmax": "trl_jax.ops", "fused_log_probs": "trl_jax.ops", "entropy_from_logits": "trl_jax.ops",
    "apply_chat_template": "trl_jax.data", "unpair_preference_dataset": "trl_jax.data",
    "extract_prompt": "trl_jax.data", "pack_dataset": "trl_jax.data",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'trl_jax' has no attribute {name!r}")
