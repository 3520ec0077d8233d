"""Trainer facades with TRL's constructor shape and config names."""

from trl_jax.trainers.base import BaseTrainer, TrainOutput
from trl_jax.trainers.sft import SFTTrainer

__all__ = ["BaseTrainer", "SFTTrainer", "TrainOutput"]
