"""``RLOOTrainer``: TRL 1.16's REINFORCE leave-one-out on the shared loop.

Generation, reward scoring, buffering (``steps_per_generation`` x ``num_iterations``), the completions table and
evaluation are the online layer's (:class:`trl_jax.trainers.online.OnlineTrainer`), as for GRPO. Here:

* With ``beta != 0`` the reference model's per-token log-probs are computed at generation time, next to the
  policy's, and the sequence KL ``sum_t (logp_t - ref_logp_t)`` is subtracted from the reward (TRL puts the KL in
  the reward, not in the loss). Both forward passes are dispatched before the reward functions run.
* The rewards become leave-one-out advantages (:func:`trl_jax.losses.rloo.rloo_advantages`): a completion's
  baseline is the mean reward of the other completions of its prompt; ``normalize_advantages`` z-scores them over
  the generation batch.
* The loss (:func:`trl_jax.losses.rloo.rloo_loss`) clips the *sequence* importance ratio and averages over the
  micro-batch; the shared step averages the ``gradient_accumulation_steps`` micro-batches, as the Trainer's
  division by ``gradient_accumulation_steps`` does.

Generation metrics: ``reward``, ``reward_std``, ``rewards/<name>/mean|std``, ``frac_reward_zero_std``, ``kl``
(``beta != 0``) and ``completions/*``; loss metrics: ``entropy``, ``clip_ratio/low_mean|low_min|high_mean|high_max|
region_mean`` (TRL's names).
"""

from __future__ import annotations

import jax
import numpy as np

from trl_jax.configs import RLOOConfig
from trl_jax.losses.base import LossTerms
from trl_jax.losses.rloo import rloo_advantages, rloo_loss
from trl_jax.parallel.distributed import gather_to_host
from trl_jax.trainers.online import OnlineTrainer
from trl_jax.trainers.reference import reference_value


class RLOOTrainer(OnlineTrainer):
    """``RLOOTrainer(model, reward_funcs, args=RLOOConfig(...), train_dataset=..., processing_class=...)``.

    ``reward_funcs`` and ``reward_processing_classes`` as for :class:`trl_jax.trainers.grpo.GRPOTrainer`
    (callables, built-in names, dotted paths, reward models).
    """

    _tag = "rloo"
    config_class = RLOOConfig
    _kl_jit = None

    # ------------------------------------------------------------------ KL at generation time
    def _dispatch_generation_forwards(self, params, arrays):
        """With ``beta != 0``: start ``old_logps - ref_logps`` per token (one forward pair per micro-batch) on the
        device; :meth:`compute_advantages` fetches it. The reference is the policy's own log-probs while the two
        hold the same weights (exactly 0, as TRL's identical reference copy gives)."""
        if self.args.beta == 0.0:
            return None
        if self._kl_jit is None:
            def kl(p, rp, b):
                logps = self._token_logps(p, b)
                rp = self._reference(p, rp)  # LoRA without ref_model: the base
                if rp is None:
                    raise ValueError("beta != 0 needs the reference model params in the train state.")
                return logps - reference_value(logps, lambda r: self._token_logps(r, b), p, rp)

            self._kl_jit = jax.jit(kl)
        rows = self.micro_batch_rows
        keys = ("input_ids", "segment_ids", "completion_ids", "completion_mask")
        ref = self.state.ref_params
        return [self._kl_jit(params, ref, self._device_batch({k: arrays[k][s:s + rows] for k in keys}))
                for s in range(0, arrays["input_ids"].shape[0], rows)]

    def compute_advantages(self, rewards_per_func, arrays, *, num_generations: int, pending=None):
        args = self.args
        per_token_kl = None
        if pending is not None:
            per_token_kl = np.concatenate([np.asarray(x, np.float32) for x in gather_to_host(pending)], axis=0)
        return rloo_advantages(
            rewards_per_func, self.reward_weights, num_generations=num_generations, beta=args.beta,
            per_token_kl=per_token_kl, completion_mask=arrays["completion_mask"],
            reward_clip_range=args.reward_clip_range, normalize_advantages=args.normalize_advantages,
            reward_func_names=self.reward_func_names,
        )

    # ------------------------------------------------------------------ loss
    def loss_terms(self, params, batch, ref_params=None, *, training=True) -> LossTerms:
        """TRL's ``_compute_loss`` for one micro-batch of generated rows (``old_logps``: the sequence sums of
        ``old_per_token_logps`` when the buffer outlives one step, else the current ones: ratio exactly 1)."""
        coef = self.router_aux_loss_coef
        aux = None
        if coef:
            (logps, ent), aux = self._token_logps(params, batch, entropy=True, aux_loss=True)
        else:
            logps, ent = self._token_logps(params, batch, entropy=True)
        mask = batch["completion_mask"]
        old = batch.get("old_per_token_logps")
        old_logps = None if old is None else (old * mask).sum(1)
        return rloo_loss(logps, old_logps, batch["advantages"], mask, epsilon=self.args.epsilon,
                         epsilon_high=self.args.epsilon_high, entropies=ent, aux_loss=aux,
                         router_aux_loss_coef=coef)

    def loss_fn(self, params, batch, rng, ref_params=None) -> LossTerms:
        """The micro-batch loss ``l_j`` with denominator 1: the shared step's ``sum(num) / sum(den)`` is the mean
        over the accumulation window, what the Trainer back-propagates (``sum_j l_j / gradient_accumulation_steps``)."""
        return self.loss_terms(params, batch, ref_params)
