"""``GRPOTrainer``: TRL 1.16's group relative policy optimisation on the shared loop.

Generation, reward scoring, buffering (``steps_per_generation`` x ``num_iterations``), the completions table and
evaluation are the online layer's (:class:`trl_jax.trainers.online.OnlineTrainer`). Here:

* The ``[N, F]`` rewards of a generation batch become group-relative advantages
  (:func:`trl_jax.losses.grpo.grpo_advantages`).
* The loss (:func:`trl_jax.losses.grpo.grpo_loss`, every ``loss_type``) runs inside the shared jitted step. Each
  micro-batch contributes TRL's own micro-batch loss (TRL's normalizers, including ``/ gradient_accumulation_steps``
  and DAPO's ``num_items_in_batch`` over the generation batch), so an optimizer step back-propagates exactly the sum
  TRL back-propagates. With ``beta != 0`` the reference log-probs are computed in the step (KL in the loss).

Loss metrics (``kl``, ``entropy``, ``clip_ratio/*``, ...) are logged once per step, generation metrics once per
generation.
"""

from __future__ import annotations

import jax.numpy as jnp

from trl_jax.configs import GRPOConfig
from trl_jax.losses.base import LossTerms
from trl_jax.losses.grpo import grpo_advantages, grpo_loss
from trl_jax.trainers.online import (  # noqa: F401 - re-exported: the online layer's helpers, by their old path
    REWARD_MODEL_MIN_BUCKET,
    OnlineTrainer,
    _add_phase,
    _left_pad,
    _round_up,
    gather_rows,
    reward_func_name,
    reward_model_bucket,
)
from trl_jax.trainers.reference import reference_value


class GRPOTrainer(OnlineTrainer):
    """``GRPOTrainer(model, reward_funcs, args=GRPOConfig(...), train_dataset=..., processing_class=...)``.

    Generation, rewards, buffering and logging: :class:`trl_jax.trainers.online.OnlineTrainer`. Here: GRPO's
    group-relative advantages and its policy loss (every ``loss_type``).
    """

    _tag = "grpo"
    config_class = GRPOConfig

    @staticmethod
    def _check_args(args):
        OnlineTrainer._check_args(args)
        if args.use_adaptive_entropy:
            raise ValueError("use_adaptive_entropy is not supported by trl_jax yet; use a fixed entropy_coef.")
        if args.max_tool_calling_iterations is not None:
            raise ValueError("Tool calling is not supported by trl_jax yet; unset max_tool_calling_iterations.")

    def compute_advantages(self, rewards_per_func, arrays, *, num_generations: int, pending=None):
        args = self.args
        return grpo_advantages(
            rewards_per_func, self.reward_weights, num_generations=num_generations, scale_rewards=args.scale_rewards,
            multi_objective_aggregation=args.multi_objective_aggregation, reward_func_names=self.reward_func_names,
        )

    def grpo_loss_terms(self, params, batch, ref_params=None, *, training=True) -> LossTerms:
        """TRL's micro-batch loss terms (``grpo_loss``) for one micro-batch of generated rows."""
        args = self.args
        coef = self.router_aux_loss_coef  # mixture of experts: the config's, else the checkpoint's (TRL)
        aux = None
        if coef:
            (logps, ent), aux = self._token_logps(params, batch, entropy=True, aux_loss=True)
        else:
            logps, ent = self._token_logps(params, batch, entropy=True)
        ref = None
        if args.beta != 0.0:
            ref_params = self._reference(params, ref_params)  # LoRA without ref_model: the base
            if ref_params is None:
                raise ValueError("beta != 0 needs the reference model params in the train state.")
            ref = reference_value(logps, lambda rp: self._token_logps(rp, batch), params, ref_params)
        return grpo_loss(
            logps, batch.get("old_per_token_logps"), ref, batch["advantages"], batch["completion_mask"],
            loss_type=args.loss_type, epsilon=args.epsilon, epsilon_high=args.epsilon_high, delta=args.delta,
            beta=args.beta, importance_sampling_level=args.importance_sampling_level,
            use_bias_correction_kl=args.use_bias_correction_kl, sapo_temperature_neg=args.sapo_temperature_neg,
            sapo_temperature_pos=args.sapo_temperature_pos, vespo_k_pos=args.vespo_k_pos,
            vespo_lambda_pos=args.vespo_lambda_pos, vespo_k_neg=args.vespo_k_neg,
            vespo_lambda_neg=args.vespo_lambda_neg, entropies=ent, top_entropy_quantile=args.top_entropy_quantile,
            entropy_coef=args.entropy_coef, off_policy_mask_threshold=args.off_policy_mask_threshold,
            max_completion_length=args.max_completion_length,
            num_items_in_batch=batch["num_items_in_batch"][0],
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            steps_per_generation=self.steps_per_generation, training=training, aux_loss=aux,
            router_aux_loss_coef=coef,
        )

    def loss_fn(self, params, batch, rng, ref_params=None) -> LossTerms:
        """TRL's micro-batch loss ``l_j`` (already divided by ``gradient_accumulation_steps`` where TRL divides)
        as ``numerator = l_j``, ``denominator = 1 / GA``: the shared step's ``sum(num) / sum(den)`` is then
        ``sum_j l_j``, exactly what TRL back-propagates over an accumulation window."""
        terms = self.grpo_loss_terms(params, batch, ref_params)
        ga = self.args.gradient_accumulation_steps
        return LossTerms(terms.loss, jnp.float32(1.0 / ga), terms.metrics)

    def loss_terms(self, params, batch, ref_params=None, *, training=True) -> LossTerms:
        return self.grpo_loss_terms(params, batch, ref_params, training=training)
