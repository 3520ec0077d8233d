"""The TRL (PyTorch) side of ``trl-jax compare``: shipped with trl_jax, never imported by it.

``trl_jax.compare`` runs the comparison and the trl_jax side; it starts ``python -m trl_jax_compare.worker`` as a
subprocess for the TRL side, so that nothing under ``trl_jax/`` imports torch or trl. This package needs the
``compare`` extra (``pip install "trl-jax[compare]"``: TRL, torch, matplotlib).

Modules: :mod:`trl_jax_compare.trainers` (TRL's trainers built from a config's fields, dropout off; the tiny
PyTorch model directory), :mod:`trl_jax_compare.replay` (TRL's GRPO / online DPO trainers fed the completions
trl_jax sampled), :mod:`trl_jax_compare.worker` (the subprocess entry point).
"""

from trl_jax_compare.trainers import build_trl_trainer, make_model_dir, trl_classes

__all__ = ["build_trl_trainer", "make_model_dir", "trl_classes"]
