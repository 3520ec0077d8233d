"""``OnlineDPOTrainer``: TRL 1.16's online DPO (``trl.experimental.online_dpo``) on the shared loop.

Every optimizer step builds its batch from fresh samples of the *current* policy, as TRL's ``training_step`` does:

* The step's prompts (``per_device_train_batch_size x data-parallel devices x gradient_accumulation_steps``, in the
  seeded per-epoch order of the shared loop) are rendered like TRL's ``_generate`` (chat template for
  conversational prompts, then tokenized without special tokens), left-padded to one bucket (the longest tokenized
  prompt over the datasets, rounded up to a multiple of 8) and repeated twice; the jitted KV-cache sampler
  (:func:`trl_jax.generation.generate`) draws two completions per prompt, ``max_new_tokens`` columns each,
  right-padded after the first EOS (TRL's ``truncate_right``).
* The pair is compared either by reward functions / reward models (TRL's ``_calculate_rewards_from_functions``:
  ``nansum`` of the weighted per-function rewards, ``missing_eos_penalty`` subtracted from completions without an
  EOS; the first completion is chosen when its score is ``>=`` the second's) or by a pairwise ``judge``
  (``judge.judge(prompts, [(first, second), ...]) -> [0 | 1, ...]``, the index of the preferred completion; the
  interface of TRL's ``BasePairwiseJudge``, which TRL 1.16's trainer no longer takes). Completions are decoded with
  :func:`trl_jax.data.decode.decode_and_strip_padding` (special tokens dropped, as TRL's
  ``batch_decode(skip_special_tokens=True)``).
* The pair is stored chosen-first as ``[B, 2, L]`` rows (the pair axis is never split by gradient accumulation or
  data-parallel sharding). The loss runs inside the shared jitted step: policy and reference (frozen initial
  weights, or ``ref_model``) per-token log-probs of the completion tokens from the hidden states
  (:func:`trl_jax.ops.fused_log_probs`, untempered logits as TRL's ``_forward``), summed per completion, and
  :func:`trl_jax.losses.dpo.dpo_loss_terms` with ``loss_type`` ``sigmoid`` or ``ipo`` (online DPO's IPO is not
  length-normalised: lengths of ones). ``beta`` may be a list: one value per epoch, the last one afterwards.
  Prompts longer than ``max_length - completion width`` are cut from the left for the forward pass (TRL's
  ``_forward``), the completion width being the longest completion of the micro-batch, as TRL's ``generate`` output.

Metrics (TRL's ``stats`` names, averaged over micro-batches and the logging window): ``objective/kl``,
``objective/entropy``, ``objective/non_score_reward``, ``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, ``val/contain_eos_token``,
``beta`` and, with reward functions, ``objective/rlhf_reward``, ``objective/scores_margin``, ``objective/scores``.
One difference: TRL sums ``objective/kl`` / ``entropy`` / ``non_score_reward`` / ``rlhf_reward`` over every column
of the generated block, padding after EOS included; here they are summed over the completion tokens only (the two
agree when no completion of the batch ended before the others).

Several processes (multi-host): every process builds the step's whole prompt batch and samples it on the global
arrays (the same key, so the same completions as one process); each process then decodes and scores (reward
functions / reward models / judge) only the pairs of its own rows (:meth:`BaseTrainer._local_rows`; a pair's two
completions are rows ``i`` and ``B + i`` of the sampled block, both on every process), and hands the loop its rows
(``LocalBatch``). The metrics come from the jitted step over the global batch, so they are the one-process numbers.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from trl_jax.configs import OnlineDPOConfig
from trl_jax.data.chat_template import maybe_apply_chat_template
from trl_jax.data.decode import decode_and_strip_padding
from trl_jax.data.formats import is_conversational
from trl_jax.losses.base import LossTerms
from trl_jax.losses.dpo import DPOInputs, dpo_loss_terms
from trl_jax.ops import fused_log_probs
from trl_jax.models.model import final_logit_softcapping
from trl_jax.ops.masking import masked_sum
from trl_jax.parallel.distributed import is_multiprocess
from trl_jax.trainers.base import BaseTrainer, LocalBatch, prompt_columns, reject_unsupported, take_rows
from trl_jax.trainers.online import OnlineTrainer, _left_pad, _round_up
from trl_jax.trainers.reference import ReferenceModelMixin, reference_value

_PROMPT_BUCKET = 8
_PAIRED = ("input_ids", "segment_ids", "completion_ids", "completion_mask")
# generation_kwargs keys the sampler understands (TRL passes them to transformers' GenerationConfig).
_GENERATION_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                    "eos_token_id", "do_sample")


def render_for_judge(messages) -> str:
    """A conversation as plain text for a judge, independent of the model's chat template (TRL's
    ``SIMPLE_CHAT_TEMPLATE``: ``"Role: content\\n\\n"`` per message); strings are returned unchanged."""
    if isinstance(messages, str):
        return messages
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages)


def preferred_first(scores: np.ndarray | None = None, ranks=None) -> np.ndarray:
    """``[n]`` bool: is the first completion of each pair the chosen one?

    From ``scores [2n]`` (first completions, then second ones): ``first >= second`` (TRL's tie rule), or from a
    judge's ``ranks`` (index of the preferred completion of each pair): ``rank == 0``.
    """
    if ranks is not None:
        ranks = list(ranks)
        bad = [r for r in ranks if r not in (0, 1, -1)]
        if bad:
            raise ValueError(f"The judge returned {bad[:3]}; it must return, per pair, the index (0 or 1) of the "
                             "preferred completion.")
        return np.array([r == 0 for r in ranks], bool)
    scores = np.asarray(scores, np.float32)
    n = scores.shape[0] // 2
    return scores[:n] >= scores[n:]


class OnlineDPOTrainer(BaseTrainer):
    """``OnlineDPOTrainer(model, ref_model=None, reward_funcs=..., args=OnlineDPOConfig(...), train_dataset=...,
    processing_class=...)`` — TRL 1.16's signature, plus ``judge=`` (a pairwise judge instead of reward functions).

    ``reward_funcs``: one or a list of Python callables with TRL's signature (``prompts``, ``completions``,
    ``completion_ids``, ``trainer_state`` and the dataset's other columns as keyword lists; floats or ``None``),
    built-in names (:data:`trl_jax.rewards.REWARD_FUNCS`), dotted import paths, or reward models (a local directory
    / hub id of a ``*ForSequenceClassification`` checkpoint, or a ``(CausalLM, params)`` pair with a ``score``
    head), weighted by ``args.reward_weights``. ``judge``: an object with ``judge(prompts, completion_pairs)`` or a
    callable with that signature, returning the index (0/1) of the preferred completion of each pair.
    """

    _tag = "online-dpo"
    config_class = OnlineDPOConfig

    def __init__(self, model, ref_model=None, reward_funcs=None, args: OnlineDPOConfig | None = None,
                 data_collator=None, train_dataset=None, eval_dataset=None, processing_class=None,
                 reward_processing_classes=None, peft_config=None, compute_metrics=None, callbacks=None,
                 optimizers=None, preprocess_logits_for_metrics=None, *, judge=None):
        if optimizers is not None and all(o is None for o in optimizers):
            optimizers = None  # TRL's default `(None, None)`
        reject_unsupported("OnlineDPOTrainer", data_collator=data_collator,
                           compute_metrics=compute_metrics, optimizers=optimizers,
                           preprocess_logits_for_metrics=preprocess_logits_for_metrics)
        if train_dataset is None:
            raise ValueError("OnlineDPOTrainer needs a train_dataset with a `prompt` column.")
        if ref_model is not None and ref_model is model:
            raise ValueError("`model` and `ref_model` cannot be the same object. To use the initial weights as the "
                             "reference, omit `ref_model` (or pass None).")
        if reward_funcs is None and judge is None:
            raise ValueError("OnlineDPOTrainer needs `reward_funcs` (reward functions / reward models) or a pairwise "
                             "`judge` to compare the two completions of each prompt.")
        if reward_funcs is not None and judge is not None:
            raise ValueError("Pass either `reward_funcs` or `judge`, not both: the pair is ranked by one of them.")
        if args is not None:
            self._check_args(args)
        self._prompt_len: dict[str, int] = {}
        super().__init__(model, args, train_dataset, eval_dataset, processing_class, callbacks, ref_model=ref_model,
                         peft_config=peft_config)
        self._check_args(self.args)
        self.judge = judge
        if judge is not None and not (callable(getattr(judge, "judge", None)) or callable(judge)):
            raise TypeError("`judge` must have a `judge(prompts, completion_pairs)` method or be such a callable.")
        if reward_funcs is not None:
            if not isinstance(reward_funcs, (list, tuple)) or (
                    isinstance(reward_funcs, tuple) and len(reward_funcs) == 2 and isinstance(reward_funcs[1], dict)):
                reward_funcs = [reward_funcs]
            if len(reward_funcs) == 0:
                raise ValueError("`reward_funcs` is empty: pass at least one reward function or reward model.")
            self._setup_rewards(list(reward_funcs), reward_processing_classes)
        else:
            self.reward_funcs, self.reward_func_names = None, []
        tok = self.processing_class
        self.pad_token_id = int(tok.pad_token_id)
        gen_kwargs = dict(self.args.generation_kwargs or {})
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        extra = gen_kwargs.get("eos_token_id")
        if extra is not None:
            eos += [extra] if isinstance(extra, int) else list(extra)
        self.eos_token_ids = list(dict.fromkeys(int(e) for e in eos))
        if not self.eos_token_ids:
            raise ValueError("The tokenizer has no eos_token_id; set `eos_token` in the config.")
        self._gen_step = 0
        self._eval_calls = 0
        self._pending_tokens = 0.0
        self._user_metrics: dict[str, list] = {}

    # ------------------------------------------------------------------ config
    @staticmethod
    def _check_args(args):
        if args.use_vllm:
            raise ValueError("use_vllm=True: trl_jax generates with its own jitted JAX sampler; set use_vllm=False.")
        if args.max_new_tokens is None or args.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be a positive int (completions are padded to it).")
        gk = args.generation_kwargs or {}
        unknown = sorted(set(gk) - set(_GENERATION_KEYS))
        if unknown:
            raise ValueError(f"generation_kwargs {unknown} are not supported by trl_jax's sampler; supported: "
                             f"{list(_GENERATION_KEYS)}.")
        if gk.get("do_sample") is False:
            raise ValueError("generation_kwargs do_sample=False would make both completions of a pair identical; "
                             "online DPO samples.")
        beta = args.beta
        betas = list(beta) if isinstance(beta, (list, tuple)) else [beta]
        if not betas or any(float(b) <= 0 for b in betas):
            raise ValueError(f"beta must be a positive float or a non-empty list of positive floats; got {beta!r}.")

    # ------------------------------------------------------------------ reference model (frozen initial weights)
    _resolve_ref_model = ReferenceModelMixin._resolve_ref_model

    def _ref_params_for_state(self):
        return self.ref_model_params

    # ------------------------------------------------------------------ rewards (the online layer's reward machinery)
    _setup_rewards = OnlineTrainer._setup_rewards
    _call_reward_func = OnlineTrainer._call_reward_func
    _find_offender = staticmethod(OnlineTrainer._find_offender)
    _reward_model_scores = OnlineTrainer._reward_model_scores
    _fetch_reward_model_scores = OnlineTrainer._fetch_reward_model_scores
    _dispatch_reward_model = OnlineTrainer._dispatch_reward_model  # bucketed lengths, scored while Python rewards run
    _calculate_rewards = OnlineTrainer._calculate_rewards
    _log_metric = OnlineTrainer._log_metric
    _sample = OnlineTrainer._sample  # the jitted sampler call, with this trainer's _sampling_kwargs

    def total_rewards(self, rows, prompts, completions, completion_ids, contain_eos) -> np.ndarray:
        """``[N]`` scores: ``nansum`` over functions of ``reward x weight``, minus ``missing_eos_penalty`` where
        the completion has no EOS (TRL's ``_calculate_rewards_from_functions`` + penalty)."""
        per_func = self._calculate_rewards(rows, prompts, completions, completion_ids)
        total = np.nansum(per_func * self.reward_weights[None, :], axis=1).astype(np.float32)
        if self.args.missing_eos_penalty is not None:
            total = total - np.where(np.asarray(contain_eos, bool), 0.0, self.args.missing_eos_penalty)
        return total.astype(np.float32)

    def _judge_ranks(self, prompts, completions, n):
        prompts = [render_for_judge(p) for p in prompts[:n]]
        texts = [render_for_judge(c) for c in completions]
        pairs = list(zip(texts[:n], texts[n:2 * n], strict=True))
        fn = self.judge.judge if callable(getattr(self.judge, "judge", None)) else self.judge
        ranks = list(fn(prompts, pairs))
        if len(ranks) != n:
            raise ValueError(f"The judge returned {len(ranks)} ranks for {n} pairs; return one per pair.")
        return ranks

    # ------------------------------------------------------------------ beta schedule
    def beta_for_step(self, step: int) -> float:
        """``beta`` of optimizer step ``step`` (0-based): a list gives one value per epoch, then its last value."""
        beta = self.args.beta
        if not isinstance(beta, (list, tuple)):
            return float(beta)
        epoch = step // self.steps_per_epoch()
        return float(beta[epoch] if epoch < len(beta) else beta[-1])

    # ------------------------------------------------------------------ data
    def _prepare_dataset(self, dataset, split):
        prompt_columns(dataset, split, "OnlineDPOTrainer")
        tok = self.processing_class

        def tokenize(example):
            text = maybe_apply_chat_template({"prompt": example["prompt"]}, tok)["prompt"]
            return {"prompt_ids": list(tok(text=text, add_special_tokens=False)["input_ids"])}

        dataset = dataset.map(tokenize)
        self._prompt_len[split] = max(len(x) for x in dataset["prompt_ids"])
        return dataset

    @property
    def prompt_length(self) -> int:
        """The prompt bucket: longest tokenized prompt over the datasets, rounded up to a multiple of 8."""
        return _round_up(max(self._prompt_len.values()), _PROMPT_BUCKET)

    # ------------------------------------------------------------------ generation
    def _sampling_kwargs(self):
        a = self.args
        gk = dict(a.generation_kwargs or {})
        top_k = gk.get("top_k", a.top_k)
        top_p = gk.get("top_p", a.top_p)
        rep = gk.get("repetition_penalty", a.repetition_penalty)
        return dict(
            max_new_tokens=int(gk.get("max_new_tokens", a.max_new_tokens)),
            temperature=gk.get("temperature", a.temperature),
            top_k=top_k or None, top_p=None if top_p == 1.0 else top_p, min_p=gk.get("min_p", a.min_p),
            repetition_penalty=None if rep == 1.0 else rep,
            eos_token_id=self.eos_token_ids, pad_token_id=self.pad_token_id,
        )

    def build_pairs(self, rows: list[dict], prompt_ids, prompt_mask, completion_ids, completion_mask, *,
                    num_rows: int, micro_rows: int, beta: float):
        """Judge sampled completions and pack the pairs, chosen first.

        ``rows``: the ``n <= num_rows`` real prompts; ``prompt_ids`` / ``prompt_mask [num_rows, P]`` (left-padded);
        ``completion_ids`` / ``completion_mask [2 num_rows, C]``: row ``i`` and row ``num_rows + i`` are the two
        completions of prompt ``i`` (rows past ``n`` in each half are padding). Returns ``(arrays, table)``:
        ``arrays`` maps ``input_ids`` / ``segment_ids [num_rows, 2, P + C]``, ``completion_ids`` /
        ``completion_mask [num_rows, 2, C]``, ``scores`` / ``contain_eos [num_rows, 2]`` fp32, ``example_mask`` and
        ``beta [num_rows]``; ``table`` lists the real prompts with both completions and their scores.

        Several processes: the arguments are the whole batch (on every process); only the pairs of this process's
        rows (:meth:`_local_rows`, padding pairs included so every process scores as many) are decoded and
        scored, and ``arrays`` / ``table`` hold only those rows. One process: every row.
        """
        n, big = len(rows), num_rows
        cids = np.asarray(completion_ids)
        cmask = np.asarray(completion_mask).astype(np.int32)
        sl = self._local_rows(big)
        # the pairs scored here: the real ones (one process), or all of this process's rows (padding pairs repeat
        # the last prompt), so that every process scores the same number of completions (reward models' batches)
        mine = np.arange(sl.start, sl.stop) if is_multiprocess() else np.arange(n)
        mine_rows = [rows[min(int(i), n - 1)] for i in mine]
        real = np.r_[mine, big + mine]  # the completions scored here: first ones, then second ones
        is_eos = np.isin(cids, np.asarray(self.eos_token_ids)) & (cmask > 0)
        contain_eos = is_eos.any(axis=1)
        texts = decode_and_strip_padding(cids[real], self.processing_class, mask=cmask[real], think_start=None,
                                         think_end=None)
        prompts = [r["prompt"] for r in mine_rows] * 2
        conversational = is_conversational({"prompt": rows[0]["prompt"]})
        completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
        scores = np.zeros(2 * big, np.float32)
        first = np.ones(big, bool)  # padding pairs (and other processes' pairs): first = chosen
        if len(mine):
            if self.reward_funcs is not None:
                lengths = cmask[real].sum(axis=1)
                ids_list = [row[:k].tolist() for row, k in zip(cids[real], lengths, strict=True)]
                self._user_metrics = {}
                scores[real] = self.total_rewards(mine_rows + mine_rows, prompts, completions, ids_list,
                                                  contain_eos[real])
                first[mine] = preferred_first(scores[real])
            else:
                first[mine] = preferred_first(ranks=self._judge_ranks(prompts, completions, len(mine)))
        first[n:] = True
        idx = np.arange(big)
        chosen, rejected = np.where(first, idx, idx + big), np.where(first, idx + big, idx)

        # TRL's _forward: prompt columns cut from the left so that prompt + completion block <= max_length, the
        # block being as wide as the micro-batch's longest completion (the width of `generate`'s output).
        lengths = cmask.sum(axis=1)
        p = prompt_ids.shape[1]
        dist = p - 1 - np.arange(p)  # distance of a prompt column from the prompt's end
        seg_prompt = np.zeros((big, p), np.int32)
        for s in range(0, big, micro_rows):
            width = int(max(lengths[s:s + micro_rows].max(), lengths[big + s:big + s + micro_rows].max(), 1))
            keep = max(int(self.args.max_length) - width, 1)
            seg_prompt[s:s + micro_rows] = prompt_mask[s:s + micro_rows] * (dist < keep)[None, :]

        def pair(a_prompt, a_c):
            c, r = a_c[chosen], a_c[rejected]
            if a_prompt is None:
                return np.stack([c, r], axis=1)
            return np.stack([np.concatenate([a_prompt, c], 1), np.concatenate([a_prompt, r], 1)], axis=1)

        arrays = {
            "input_ids": pair(prompt_ids, cids).astype(np.int32),
            "segment_ids": pair(seg_prompt, cmask).astype(np.int32),
            "completion_ids": pair(None, cids).astype(np.int32),
            "completion_mask": pair(None, cmask).astype(np.int32),
            "scores": pair(None, scores).astype(np.float32),
            "contain_eos": pair(None, contain_eos.astype(np.float32)),
            "example_mask": (idx < n).astype(np.float32),
            "beta": np.full((big,), beta, np.float32),
        }
        arrays = {k: v[sl] for k, v in arrays.items()}  # this process's rows (all rows with one process)
        by_row = dict(zip(real.tolist(), completions, strict=True))
        table = [{"prompt": rows[i]["prompt"], "chosen": by_row[int(chosen[i])], "rejected": by_row[int(rejected[i])],
                  **({"score_chosen": float(scores[chosen[i]]), "score_rejected": float(scores[rejected[i]])}
                     if self.reward_funcs is not None else {})} for i in mine.tolist() if i < n]
        return arrays, table

    def _generate_pairs(self, rows, num_rows, micro_rows, rng, beta):
        if not rows:
            raise ValueError("No prompts to generate from.")
        padded = rows + [rows[-1]] * (num_rows - len(rows))
        prompt_ids, prompt_mask = _left_pad([r["prompt_ids"] for r in padded], self.prompt_length, self.pad_token_id)
        cids, cmask = self._sample(self.state.params, np.concatenate([prompt_ids, prompt_ids]),
                                   np.concatenate([prompt_mask, prompt_mask]), rng, num_generations=2,
                                   group_layout="tiled")  # each prompt prefilled once for its pair
        arrays, table = self.build_pairs(rows, prompt_ids, prompt_mask, cids, cmask, num_rows=num_rows,
                                         micro_rows=micro_rows, beta=beta)
        self.last_pairs = table  # this process's pairs (every pair with one process)
        return LocalBatch(arrays, num_rows)

    def _collate(self, rows, num_rows):
        """Generation *is* the collation: sample two completions per prompt with the current params and pair them.
        A short last batch is padded with masked pairs (``example_mask``)."""
        if self._training_batch:
            rng = jax.random.fold_in(jax.random.PRNGKey(self.args.seed + 1), self._gen_step)
            return self._generate_pairs(rows, num_rows, self.micro_batch_rows, rng,
                                        self.beta_for_step(self._gen_step))
        self._eval_calls += 1
        rng = jax.random.fold_in(jax.random.PRNGKey(self.args.seed + 2), self._eval_calls)
        step = max(int(self.state.step) - 1, 0) if self.state is not None else 0
        return self._generate_pairs(rows, num_rows, num_rows, rng, self.beta_for_step(step))

    _training_batch = False

    def _collate_local(self, ds, indices, num_rows: int, collate=None) -> LocalBatch:
        """Every process collates the *whole* batch ``indices`` (the prompts sampled as one global batch, the same
        draws as one process); :meth:`build_pairs` keeps this process's rows: a ``LocalBatch``."""
        return self._collate(take_rows(ds, indices), num_rows)

    def _batch_for_step(self, step: int):
        self._gen_step, self._training_batch = step, True
        try:
            batch = super()._batch_for_step(step)
        finally:
            self._training_batch = False
        return batch

    def _batch_stats(self, batch):
        seg = batch["segment_ids"] * batch["example_mask"][:, None, None]
        return {"num_tokens": float(seg.sum())}

    # ------------------------------------------------------------------ loss
    def _token_logps(self, params, ids, seg, completion_ids, completion_mask):
        """``[R, C]`` fp32 per-token log-probs of the completion tokens (0 outside ``completion_mask``), from the
        hidden states of ``ids [R, P + C]`` (left-padded prompt + right-padded completion; ``seg`` 1 = real)."""
        c = completion_ids.shape[1]
        pos = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
        hidden = self.model.hidden_states(params, ids, pos, seg)
        h = hidden[:, ids.shape[1] - c - 1:-1]
        return fused_log_probs(h, self.model.lm_head_weight(params), completion_ids,
                               chunk_size=self.args.logprob_chunk_size, mask=completion_mask.astype(bool),
                               final_logit_softcapping=final_logit_softcapping(self.model))

    def loss_fn(self, params, batch, rng, ref_params=None) -> LossTerms:
        """TRL's online DPO loss of one micro-batch of pairs (mean over its pairs) and TRL's ``stats``."""
        ref_params = self._reference(params, ref_params)  # LoRA without ref_model: the base
        if ref_params is None:
            raise ValueError("Online DPO needs the reference params in the train state.")
        b = batch["input_ids"].shape[0]
        flat = {k: jnp.concatenate([batch[k][:, 0], batch[k][:, 1]], axis=0) for k in _PAIRED}  # [2b, ...]
        mask = flat["completion_mask"].astype(bool)
        args = (flat["input_ids"], flat["segment_ids"], flat["completion_ids"], flat["completion_mask"])
        logps = self._token_logps(params, *args)
        seq = masked_sum(logps, mask, axis=-1)
        # the summed reference log-probs go through reference_value themselves: while the reference holds the
        # policy's weights they are exactly `seq` (two sums of equal values need not round alike), so the
        # log-ratios are exactly 0 and `rewards/accuracies` (a strict >) counts ties as TRL does
        ref_seq = reference_value(seq, lambda rp: masked_sum(self._token_logps(rp, *args), mask, axis=-1), params,
                                  ref_params)
        beta = batch["beta"][0]
        keep = batch["example_mask"]
        ones = jnp.ones((b,), jnp.float32)
        terms = dpo_loss_terms(
            DPOInputs(seq[:b], seq[b:], ref_seq[:b], ref_seq[b:], chosen_lengths=ones, rejected_lengths=ones),
            beta=beta, loss_type=self.args.loss_type, example_mask=keep,
        )
        return LossTerms(terms.numerator, terms.denominator,
                         online_dpo_metrics(terms.metrics, seq, ref_seq, batch, beta,
                                            with_scores=self.reward_funcs is not None))

    # ------------------------------------------------------------------ eval
    def evaluate(self, eval_dataset=None, metric_key_prefix: str = "eval") -> dict:
        """Sample pairs for the eval prompts with the current params and report the loss and TRL's stats."""
        return super().evaluate(eval_dataset, metric_key_prefix)


def online_dpo_metrics(dpo_metrics: dict, seq_logps, ref_seq_logps, batch: dict, beta, *, with_scores: bool) -> dict:
    """TRL's online DPO ``stats`` for one micro-batch (NaN when it holds no real pair).

    ``dpo_metrics``: :func:`~trl_jax.losses.dpo.dpo_loss_terms`' ``rewards/*`` and ``logps/*`` (same formulas as
    TRL's online trainer); ``seq_logps`` / ``ref_seq_logps [2b]`` (chosen rows, then rejected rows): summed
    completion log-probs; ``batch``: ``scores`` / ``contain_eos [b, 2]``, ``example_mask [b]``.
    """
    sg = jax.lax.stop_gradient
    keep = batch["example_mask"].astype(jnp.float32)
    count = jnp.sum(keep)
    keep2 = jnp.concatenate([keep, keep])

    def mean2(x):  # over every real completion (both of each pair)
        return jnp.where(count > 0, jnp.sum(x * keep2) / jnp.maximum(2.0 * count, 1.0), jnp.nan)

    def flat(x):
        return jnp.concatenate([x[:, 0], x[:, 1]]).astype(jnp.float32)

    seq = sg(seq_logps)
    kl = seq - sg(ref_seq_logps)  # Σ_t (log π - log π_ref) per completion
    non_score = -beta * kl
    metrics = {k: jnp.where(count > 0, v, jnp.nan) for k, v in dpo_metrics.items()}
    metrics.update({
        "objective/kl": mean2(kl),
        "objective/entropy": mean2(-seq),
        "objective/non_score_reward": mean2(non_score),
        "val/contain_eos_token": mean2(flat(batch["contain_eos"])),
        "beta": jnp.asarray(beta, jnp.float32),
    })
    if with_scores:
        scores = flat(batch["scores"])
        margin = batch["scores"][:, 0] - batch["scores"][:, 1]
        metrics.update({
            "objective/scores": mean2(scores),
            "objective/scores_margin": jnp.where(count > 0, jnp.sum(margin * keep) / jnp.maximum(count, 1.0), jnp.nan),
            "objective/rlhf_reward": mean2(scores + non_score),
        })
    return metrics
