"""Trainer facades with TRL's constructor shape and config names."""

from trl_jax.trainers.base import BaseTrainer, TrainOutput
from trl_jax.trainers.callbacks import TrainerControl, TrainerState
from trl_jax.trainers.distillation import DistillationTrainer
from trl_jax.trainers.dpo import DPOTrainer
from trl_jax.trainers.grpo import GRPOTrainer
from trl_jax.trainers.kto import KTOTrainer
from trl_jax.trainers.online_dpo import OnlineDPOTrainer
from trl_jax.trainers.reward import RewardTrainer
from trl_jax.trainers.rloo import RLOOTrainer
from trl_jax.trainers.sft import SFTTrainer

__all__ = ["BaseTrainer", "DistillationTrainer", "DPOTrainer", "GRPOTrainer", "KTOTrainer", "OnlineDPOTrainer",
           "RewardTrainer", "RLOOTrainer", "SFTTrainer", "TrainOutput", "TrainerControl", "TrainerState"]
