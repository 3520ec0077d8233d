"""Train state, step builders (jit over a mesh, pmap), optimizers and schedules, mixed precision, checkpoints."""

from trl_jax.train.checkpoint import Checkpointer, restore_or_init
from trl_jax.train.optim import NO_DECAY_PATTERNS, OPTIMIZERS, decay_mask, make_optimizer, optimizer_from_args
from trl_jax.train.precision import cast_floating, fp32_optimizer_state
from trl_jax.train.schedules import SCHEDULER_TYPES, get_warmup_steps, make_schedule
from trl_jax.train.state import TrainState, abstract_like, shardings_of, train_state_shardings
from trl_jax.train.step import (
    PmapTrainStep,
    TrainStep,
    clip_by_global_norm_torch,
    make_eval_step,
    make_pmap_train_step,
    make_train_step,
    replicate,
    unreplicate,
)

__all__ = [
    "NO_DECAY_PATTERNS",
    "OPTIMIZERS",
    "SCHEDULER_TYPES",
    "Checkpointer",
    "PmapTrainStep",
    "TrainState",
    "TrainStep",
    "abstract_like",
    "cast_floating",
    "clip_by_global_norm_torch",
    "decay_mask",
    "fp32_optimizer_state",
    "get_warmup_steps",
    "make_eval_step",
    "make_optimizer",
    "make_pmap_train_step",
    "make_schedule",
    "make_train_step",
    "optimizer_from_args",
    "replicate",
    "restore_or_init",
    "shardings_of",
    "train_state_shardings",
    "unreplicate",
]
