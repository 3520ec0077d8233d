"""trl_jax: TRL's trainers as functional JAX/Flax code."""

__version__ = "0.1.0"
