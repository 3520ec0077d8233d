"""trl_jax.data against the installed TRL 1.16 data utils, trainer `_prepare_dataset`s, pack_dataset, collators."""

import copy
import json
import os
import random

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import datasets
import numpy as np
import pytest
import trl
from trl.trainer.dpo_trainer import DataCollatorForPreference as TRLPreferenceCollator
from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference as TRLUnpairedCollator
from trl.trainer.reward_trainer import DataCollatorForPreference as TRLRewardCollator
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling as TRLLMCollator

import trl_jax.data as D
from trl_jax.configs import DPOConfig, KTOConfig, RewardConfig, SFTConfig

from tiny_tokenizer import CHATML_TEMPLATE_NO_MARKERS, build_tiny_tokenizer

datasets.disable_progress_bars()

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731
TOOLS = [{"type": "function", "function": {"name": "add", "description": "add two numbers",
                                           "parameters": {"type": "object", "properties": {}}}}]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def _trl_args(cls, **kw):
    return cls(output_dir="/tmp/trl_jax_test_out", bf16=False, report_to="none", **kw)


def _rows(ds):
    return [dict(r) for r in ds]


# ---------------------------------------------------------------------------------------------- chat templates

CHAT_EXAMPLES = [
    {"messages": [U("What is 2+3?"), A("5"), U("And 2*3?"), A("6")]},
    {"prompt": [U("What color is the sky?")]},
    {"prompt": [U("What color is the sky?"), A("It is")]},
    {"prompt": [U("What is 7-2?")], "completion": [A("5")]},
    {"prompt": [U("What is 7-2?")], "chosen": [A("5")], "rejected": [A("4")]},
    {"chosen": [U("Hi"), A("Hello")], "rejected": [U("Hi"), A("Go away")]},
    {"prompt": [U("What is 1+1?")], "completion": [A("2")], "label": True},
    {"prompt": [U("Sum?")], "completion": [A("3")], "chat_template_kwargs": {"foo": 1}},
]


@pytest.mark.parametrize("example", CHAT_EXAMPLES)
def test_apply_chat_template_matches_trl(tok, example):
    assert D.apply_chat_template(copy.deepcopy(example), tok) == trl.apply_chat_template(copy.deepcopy(example), tok)
    assert D.apply_chat_template(copy.deepcopy(example), tok, tools=TOOLS) == trl.apply_chat_template(
        copy.deepcopy(example), tok, tools=TOOLS)
    assert D.maybe_apply_chat_template(copy.deepcopy(example), tok) == trl.maybe_apply_chat_template(
        copy.deepcopy(example), tok)


def test_apply_chat_template_bad_keys(tok):
    with pytest.raises(KeyError, match="Invalid keys"):
        D.apply_chat_template({"prompt": [U("x")], "chosen": [A("y")]}, tok)


def test_has_generation_markers():
    from trl.chat_template_utils import has_generation_markers as trl_has

    assert D.has_generation_markers(build_tiny_tokenizer().chat_template) is True
    assert D.has_generation_markers(CHATML_TEMPLATE_NO_MARKERS) is False
    assert trl_has(build_tiny_tokenizer().chat_template) is True


# ---------------------------------------------------------------------------------------------- example transforms

PAIR_EXAMPLES = [
    {"chosen": "The sky is blue.", "rejected": "The sky is green."},
    {"chosen": "abc", "rejected": "abd"},
    {"chosen": "same", "rejected": "same but longer"},
    {"chosen": [U("Q"), A("yes")], "rejected": [U("Q"), A("no")]},
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    {"prompt": "The sky is", "chosen": [U("x"), A("a")], "rejected": [U("x"), A("b")]},
]


@pytest.mark.parametrize("example", PAIR_EXAMPLES)
def test_extract_prompt_matches_trl(example):
    if "prompt" not in example:
        assert D.extract_prompt(copy.deepcopy(example)) == trl.extract_prompt(copy.deepcopy(example))
    assert D.maybe_extract_prompt(copy.deepcopy(example)) == trl.maybe_extract_prompt(copy.deepcopy(example))


def test_is_conversational_and_chatml():
    # (PAIR_EXAMPLES[-1] mixes a string prompt with conversational answers: TRL's answer depends on set order.)
    for ex in CHAT_EXAMPLES + PAIR_EXAMPLES[:-1] + [{"text": "hi"}, {"prompt": "hi"}]:
        assert D.is_conversational(ex) == trl.is_conversational(ex)
    share = {"conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "yo"}]}
    assert D.is_conversational_from_value(share) and trl.is_conversational_from_value(share)
    assert D.maybe_convert_to_chatml(copy.deepcopy(share)) == trl.maybe_convert_to_chatml(copy.deepcopy(share))


def test_unpair_preference_dataset_matches_trl():
    ds = datasets.Dataset.from_dict({
        "prompt": ["The sky is", "The sun is", "Two plus two"],
        "chosen": [" blue.", " hot.", " is four."],
        "rejected": [" green.", " cold.", " is five."],
        "score": [1, 2, 3],
    })
    ours = D.unpair_preference_dataset(ds, batch_size=2)
    theirs = trl.unpair_preference_dataset(ds, batch_size=2)
    assert _rows(ours) == _rows(theirs)
    assert _rows(D.maybe_unpair_preference_dataset(ds)) == _rows(trl.maybe_unpair_preference_dataset(ds))
    kto_ds = datasets.Dataset.from_dict({"prompt": ["a"], "completion": ["b"], "label": [True]})
    assert D.maybe_unpair_preference_dataset(kto_ds) is kto_ds
    it = ds.to_iterable_dataset()
    assert list(D.unpair_preference_dataset(it)) == list(trl.unpair_preference_dataset(it))


# ---------------------------------------------------------------------------------------------- format validation


def test_validate_format_names_columns_and_formats():
    bad = datasets.Dataset.from_dict({"question": ["a"], "response": ["b"]})
    with pytest.raises(ValueError, match=r"columns \['question', 'response'\].*prompt_completion"):
        D.validate_dataset_format(bad, "sft")
    with pytest.raises(ValueError, match=r"columns \['question', 'response'\].*preference"):
        D.validate_dataset_format(bad, "dpo")
    with pytest.raises(ValueError, match="label"):
        D.validate_dataset_format(datasets.Dataset.from_dict({"prompt": ["a"], "completion": ["b"],
                                                              "label": ["yes"]}), "kto")
    with pytest.raises(ValueError, match="`prompt` must be a string or a list"):
        D.validate_dataset_format(datasets.Dataset.from_dict({"prompt": [3], "chosen": ["a"], "rejected": ["b"]}),
                                  "dpo")
    assert D.validate_dataset_format(datasets.Dataset.from_dict({"body": ["a"]}), "sft", "body") == "language_modeling"
    assert D.validate_dataset_format(datasets.Dataset.from_dict({"chosen": ["a"], "rejected": ["b"]}),
                                     "kto") == "preference_implicit_prompt"
    assert D.validate_dataset_format(datasets.Dataset.from_list([{"prompt": [U("q")]}]), "grpo") == "prompt_only"


# ---------------------------------------------------------------------------------------------- SFT preparation


def _trl_sft(tok, ds, packing=None, formatting_func=None, completion_only_loss=None, chat_template=None, **kw):
    args = _trl_args(trl.SFTConfig, **kw)
    trainer = trl.SFTTrainer.__new__(trl.SFTTrainer)
    trainer._tokenizer = tok
    trainer.chat_template = chat_template
    first = next(iter(ds))
    trainer.completion_only_loss = (
        ("prompt" in first and "completion" in first) if completion_only_loss is None else completion_only_loss
    )
    return trainer._prepare_dataset(ds, tok, args, args.packing if packing is None else packing, formatting_func,
                                    "train")


def _sft_datasets():
    text = datasets.Dataset.from_dict({"text": [
        "The sky is blue.", "What is 12+7? 19", "hello", "one two three four five six seven eight nine ten eleven "
        "twelve", "The sun is hot.<|im_end|>", "x",
    ]})
    pc = datasets.Dataset.from_dict({"prompt": ["The sky is", "What is 2+2?", "Count: one two three four five six"],
                                     "completion": [" blue.", " 4", " seven eight"]})
    msgs = datasets.Dataset.from_list([
        {"messages": [U("What is 2+3?"), A("5")]},
        {"messages": [U("What is 2+3?"), A("5"), U("And 3*3?"), A("9")]},
        {"messages": [U("Tell me a long story about the sea and the moon and the stars"), A("No.")]},
    ])
    conv_pc = datasets.Dataset.from_list([
        {"prompt": [U("What is 2+3?")], "completion": [A("5")]},
        {"prompt": [U("Hi"), A("Hello"), U("What is 4*4?")], "completion": [A("16")]},
    ])
    share = datasets.Dataset.from_list([
        {"conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "hello"}]}])
    tools_ds = datasets.Dataset.from_list([
        {"messages": [U("add 2 3"), A("5")], "tools": __import__("json").dumps(TOOLS)}])
    return {"text": text, "pc": pc, "msgs": msgs, "conv_pc": conv_pc, "share": share, "tools": tools_ds}


SFT_CASES = [
    ("text", {}),
    ("text", {"max_length": 5}),
    ("text", {"max_length": 5, "truncation_mode": "keep_end"}),
    ("pc", {}),
    ("pc", {"max_length": 6}),
    ("pc", {"completion_only_loss": False}),
    ("msgs", {}),
    ("msgs", {"assistant_only_loss": True}),
    ("msgs", {"assistant_only_loss": True, "max_length": 12}),
    ("conv_pc", {}),
    ("conv_pc", {"assistant_only_loss": True}),
    ("share", {}),
    ("tools", {}),
    ("text", {"packing": True, "max_length": 8}),
    ("text", {"packing": True, "max_length": 8, "packing_strategy": "bfd_split"}),
    ("text", {"packing": True, "max_length": 8, "packing_strategy": "wrapped"}),
    ("msgs", {"packing": True, "max_length": 20, "assistant_only_loss": True}),
    ("pc", {"packing": True, "max_length": 10, "shuffle_dataset": True}),
    ("text", {"dataset_text_field": "text", "eos_token": "<|endoftext|>"}),
]


@pytest.mark.parametrize("name,kw", SFT_CASES, ids=[f"{n}-{'-'.join(k)}" for n, k in SFT_CASES])
def test_prepare_sft_matches_trl(tok, name, kw):
    ds = _sft_datasets()[name]
    trl_tok = build_tiny_tokenizer()
    our_tok = build_tiny_tokenizer()
    if "eos_token" in kw:
        trl_tok.eos_token = kw["eos_token"]
    args = SFTConfig(bf16=False, **kw)
    D.setup_tokenizer(our_tok, args)
    trl_kw = {k: v for k, v in kw.items() if k != "completion_only_loss"}
    theirs = _trl_sft(trl_tok, ds, completion_only_loss=kw.get("completion_only_loss"), **trl_kw)
    ours = D.prepare_sft_dataset(ds, our_tok, args)
    assert _rows(ours) == _rows(theirs)


def test_prepare_sft_formatting_func(tok):
    ds = datasets.Dataset.from_dict({"q": ["What is 1+1?", "What is 2+2?"], "a": ["2", "4"]})
    fn = lambda ex: f"Q: {ex['q']} A: {ex['a']}"  # noqa: E731
    theirs = _trl_sft(tok, ds, formatting_func=fn, completion_only_loss=False, max_length=32)
    ours = D.prepare_sft_dataset(ds, tok, SFTConfig(bf16=False, max_length=32), formatting_func=fn)
    assert _rows(ours) == _rows(theirs)


def test_prepare_sft_errors(tok):
    bad = build_tiny_tokenizer(chat_template=CHATML_TEMPLATE_NO_MARKERS)
    with pytest.raises(ValueError, match="generation"):
        D.prepare_sft_dataset(_sft_datasets()["msgs"], bad, SFTConfig(bf16=False, assistant_only_loss=True))
    with pytest.raises(ValueError, match="conversational"):
        D.prepare_sft_dataset(_sft_datasets()["text"], tok, SFTConfig(bf16=False, assistant_only_loss=True))
    with pytest.raises(ValueError, match="match no accepted format"):
        D.prepare_sft_dataset(datasets.Dataset.from_dict({"body": ["x"]}), tok, SFTConfig(bf16=False))


def test_prepare_sft_iterable(tok):
    ds = _sft_datasets()["pc"]
    ours = D.prepare_sft_dataset(ds.to_iterable_dataset(), tok, SFTConfig(bf16=False, max_length=6))
    theirs = _trl_sft(tok, ds.to_iterable_dataset(), max_length=6)
    assert list(ours) == list(theirs)


# ---------------------------------------------------------------------------------------------- DPO / KTO preparation

PREF_STD = {"prompt": ["The sky is", "What is 2+2?", "one two three four five six seven eight nine"],
            "chosen": [" blue.", " 4", " ten"], "rejected": [" green.", " 5<|im_end|>", " eleven"]}
PREF_CONV = [{"prompt": [U("What is 2+2?")], "chosen": [A("4")], "rejected": [A("5")]},
             {"prompt": [U("Hi"), A("Hello"), U("Color of the sky?")], "chosen": [A("blue")],
              "rejected": [A("green")]}]
PREF_IMPLICIT = {"chosen": ["The sky is blue.", "The sun is hot."], "rejected": ["The sky is green.", "The sun is cold."]}
PREF_IMPLICIT_CONV = [{"chosen": [U("Q?"), A("yes")], "rejected": [U("Q?"), A("no")]}]


def _pref_sets():
    return {
        "std": datasets.Dataset.from_dict(PREF_STD),
        "conv": datasets.Dataset.from_list(PREF_CONV),
        "implicit": datasets.Dataset.from_dict(PREF_IMPLICIT),
        "implicit_conv": datasets.Dataset.from_list(PREF_IMPLICIT_CONV),
    }


@pytest.mark.parametrize("name", ["std", "conv", "implicit", "implicit_conv"])
@pytest.mark.parametrize("max_length", [None, 8])
def test_prepare_dpo_matches_trl(tok, name, max_length):
    ds = _pref_sets()[name]
    trainer = trl.DPOTrainer.__new__(trl.DPOTrainer)
    trainer._tokenizer = tok
    theirs = trainer._prepare_dataset(ds, tok, _trl_args(trl.DPOConfig, max_length=max_length), "train")
    ours = D.prepare_preference_dataset(ds, tok, DPOConfig(bf16=False, max_length=max_length))
    assert _rows(ours) == _rows(theirs)


KTO_UNPAIRED = {"prompt": ["The sky is", "What is 2+2?", "Hi", "one two three four five six seven eight nine", "Q"],
                "completion": [" blue.", " 5", " hello", " ten", " a"], "label": [True, False, True, False, True]}


@pytest.mark.parametrize("name", ["unpaired", "std", "conv", "implicit", "implicit_conv"])
@pytest.mark.parametrize("kw", [{"per_device_train_batch_size": 2}, {"per_device_train_batch_size": 3,
                                                                      "max_length": 8},
                                {"loss_type": "apo_zero_unpaired"}])
def test_prepare_kto_matches_trl(tok, name, kw):
    ds = datasets.Dataset.from_dict(KTO_UNPAIRED) if name == "unpaired" else _pref_sets()[name]
    trl_args = _trl_args(trl.KTOConfig, **kw)
    trainer = trl.KTOTrainer.__new__(trl.KTOTrainer)
    trainer._tokenizer = tok
    trainer.calculate_KL = trl_args.loss_type != "apo_zero_unpaired"
    trainer.desirable_weight = trl_args.desirable_weight
    trainer.undesirable_weight = trl_args.undesirable_weight
    theirs = trainer._prepare_dataset(ds, tok, trl_args, "train")
    ours = D.prepare_unpaired_preference_dataset(ds, tok, KTOConfig(bf16=False, **kw))
    assert _rows(ours) == _rows(theirs)


# ---------------------------------------------------------------------------------------------- reward preparation


def _reward_sets():
    sets = _pref_sets()
    sets["margin"] = datasets.Dataset.from_dict({**PREF_STD, "margin": [0.5, 1.0, 2.0]})
    sets["tools"] = datasets.Dataset.from_list([{**row, "tools": json.dumps(TOOLS)} for row in PREF_CONV])
    sets["tokenized"] = datasets.Dataset.from_dict({"chosen_ids": [[1, 2, 3], [4] * 20],
                                                    "rejected_ids": [[1, 2], [5]]})
    return sets


@pytest.mark.parametrize("name", ["std", "conv", "implicit", "implicit_conv", "margin", "tools", "tokenized"])
@pytest.mark.parametrize("max_length", [None, 12])
def test_prepare_reward_matches_trl(tok, name, max_length):
    ds = _reward_sets()[name]
    trainer = trl.RewardTrainer.__new__(trl.RewardTrainer)
    theirs = trainer._prepare_dataset(ds, tok, _trl_args(trl.RewardConfig, max_length=max_length), "train")
    ours = D.prepare_reward_dataset(ds, tok, RewardConfig(bf16=False, max_length=max_length))
    assert _rows(ours) == _rows(theirs)


def test_reward_collator_matches_trl(tok):
    rows = _rows(D.prepare_reward_dataset(_reward_sets()["margin"], tok, RewardConfig(bf16=False, max_length=None)))
    theirs = TRLRewardCollator(pad_token_id=tok.pad_token_id)(rows)
    ours = D.DataCollatorForRewardPreference(pad_token_id=tok.pad_token_id)(rows)
    mask = ours["attention_mask"]
    assert _unpad_rows(ours["input_ids"], mask) == _unpad_rows(theirs["input_ids"].numpy(),
                                                               theirs["attention_mask"].numpy())
    width = theirs["input_ids"].shape[1]
    np.testing.assert_array_equal(ours["input_ids"][:, :width], theirs["input_ids"].numpy())
    assert (ours["input_ids"][:, width:] == tok.pad_token_id).all() and mask[:, width:].sum() == 0
    np.testing.assert_allclose(ours["margin"], theirs["margin"].numpy())
    padded = D.DataCollatorForRewardPreference(pad_token_id=tok.pad_token_id, max_length=32, pad_batch_to=4)(rows)
    assert padded["input_ids"].shape == (8, 32) and list(padded["example_mask"]) == [1, 1, 1, 0]
    assert list(padded["margin"]) == [0.5, 1.0, 2.0, 0.0] and padded["attention_mask"][[3, 7]].sum() == 0


# ---------------------------------------------------------------------------------------------- packing


def _random_ids(n, seed, max_len=23):
    rng = random.Random(seed)
    ids = [[rng.randrange(100) for _ in range(rng.randrange(0, max_len))] for _ in range(n)]
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": [[t if t % 3 else -100 for t in x] for x in ids]})


@pytest.mark.parametrize("strategy", ["bfd", "bfd_split", "wrapped"])
@pytest.mark.parametrize("seq_length", [7, 16])
def test_pack_dataset_matches_trl(strategy, seq_length):
    ds = _random_ids(230, seed=seq_length)
    kw = {"batch_size": 100}
    assert _rows(D.pack_dataset(ds, seq_length, strategy, kw)) == _rows(trl.pack_dataset(ds, seq_length, strategy, kw))


def test_pack_dataset_default_batch_and_docstring_example():
    ds = _random_ids(1100, seed=3, max_len=9)
    assert _rows(D.pack_dataset(ds, 12, "bfd")) == _rows(trl.pack_dataset(ds, 12, "bfd"))
    small = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10], [11]],
                                        "attention_mask": [[1, 1, 1, 0, 0], [1, 0], [1, 1, 0], [1]]})
    for strategy in ("bfd", "bfd_split", "wrapped"):
        assert _rows(D.pack_dataset(small, 4, strategy)) == _rows(trl.pack_dataset(small, 4, strategy))
    with pytest.raises(ValueError, match="Invalid packing strategy"):
        D.pack_dataset(small, 4, "first_fit")


def test_position_ids_match_trl_collator():
    seq_lengths = [[3, 1], [2], [4, 2, 1]]
    expected = TRLLMCollator.get_position_ids_from_packed_seq_lengths(seq_lengths)
    for sl, exp in zip(seq_lengths, expected):
        np.testing.assert_array_equal(D.position_ids_from_seq_lengths(sl), exp.numpy())
    np.testing.assert_array_equal(D.segment_ids_from_seq_lengths([2, 1], 5), [1, 1, 2, 0, 0])


# ---------------------------------------------------------------------------------------------- collators


def _unpad_rows(ids, mask):
    return [list(r[m.astype(bool)]) for r, m in zip(ids, mask)]


def test_bucket_length():
    assert D.bucket_length(5, max_length=64, pad_to_multiple_of=8) == 8
    assert D.bucket_length(60, max_length=62, pad_to_multiple_of=8) == 62
    assert D.bucket_length(5, max_length=64) == 64
    assert D.bucket_length(5) == 8 and D.bucket_length(8) == 8 and D.bucket_length(9) == 16


def test_sft_collator_padded_matches_trl(tok):
    ds = D.prepare_sft_dataset(_sft_datasets()["pc"], tok, SFTConfig(bf16=False, max_length=16))
    rows = _rows(ds)
    ours = D.DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, max_length=16, pad_to_multiple_of=4)(rows)
    theirs = TRLLMCollator(pad_token_id=tok.pad_token_id, pad_to_multiple_of=4)(rows)
    length = theirs["input_ids"].shape[1]
    assert ours["input_ids"].shape == (len(rows), length) and length % 4 == 0  # multiple of 4, below max_length
    for key in ("input_ids", "attention_mask", "labels"):
        np.testing.assert_array_equal(ours[key], theirs[key].numpy())
    np.testing.assert_array_equal(ours["loss_mask"], (theirs["labels"] != -100).numpy())
    np.testing.assert_array_equal(ours["segment_ids"], theirs["attention_mask"].numpy())
    fixed = D.DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, max_length=16, pad_batch_to=4)(rows)
    n = len(rows)
    assert fixed["input_ids"].shape == (4, 16) and list(fixed["example_mask"]) == [1] * n + [0] * (4 - n)
    assert fixed["loss_mask"][n:].sum() == 0 and fixed["attention_mask"][n:].sum() == 0
    np.testing.assert_array_equal(fixed["labels"][:n, :length], ours["labels"])


@pytest.mark.parametrize("strategy", ["bfd", "bfd_split"])
def test_sft_collator_packed_padding_free_matches_trl(tok, strategy):
    args = SFTConfig(bf16=False, max_length=12, packing=True, packing_strategy=strategy)
    rows = _rows(D.prepare_sft_dataset(_sft_datasets()["text"], tok, args))
    assert len(rows) >= 2
    ours = D.DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, max_length=12, padding_free=True)(rows)
    theirs = TRLLMCollator(pad_token_id=tok.pad_token_id, padding_free=True)(rows)
    mask = ours["attention_mask"]
    # TRL flattens the batch into one row; ours keeps [B, max_length] rows with segment ids.
    for key in ("input_ids", "labels", "position_ids"):
        flat = np.concatenate(_unpad_rows(ours[key], mask))
        np.testing.assert_array_equal(flat, theirs[key][0].numpy())
    seq_idx = np.concatenate([r[m.astype(bool)] + 100 * i for i, (r, m) in enumerate(zip(ours["segment_ids"], mask))])
    assert list(np.unique(seq_idx, return_inverse=True)[1]) == list(theirs["seq_idx"][0].numpy())
    assert ours["input_ids"].shape == (len(rows), 12)


@pytest.mark.parametrize("kw", [{}, {"max_length": 6}, {"max_length": 6, "truncation_mode": "keep_end"},
                                {"pad_to_multiple_of": 8}])
def test_preference_collator_matches_trl(tok, kw):
    rows = _rows(D.prepare_preference_dataset(_pref_sets()["std"], tok, DPOConfig(bf16=False, max_length=None)))
    for i, r in enumerate(rows):
        r["ref_chosen_logps"], r["ref_rejected_logps"] = -1.5 * i, -2.5 * i
    theirs = TRLPreferenceCollator(pad_token_id=tok.pad_token_id, **kw)(rows)
    ours = D.DataCollatorForPreference(pad_token_id=tok.pad_token_id, **kw)(rows)
    mask = ours["attention_mask"]
    for key in ("input_ids", "completion_mask"):
        assert _unpad_rows(ours[key], mask) == _unpad_rows(theirs[key].numpy(), theirs["attention_mask"].numpy())
    np.testing.assert_array_equal(mask.sum(1), theirs["attention_mask"].numpy().sum(1))
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        np.testing.assert_allclose(ours[key], theirs[key].numpy())
    if "pad_to_multiple_of" in kw:
        np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"].numpy())
    base = D.DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=16)(rows)
    padded = D.DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=16, pad_batch_to=4)(rows)
    assert base["input_ids"].shape == (6, 16)  # no pad_to_multiple_of: pad to max_length
    assert padded["input_ids"].shape == (8, 16) and list(padded["example_mask"]) == [1, 1, 1, 0]
    for key in ("input_ids", "attention_mask", "completion_mask"):
        np.testing.assert_array_equal(padded[key][[0, 1, 2, 4, 5, 6]], base[key])
        assert padded[key][[3, 7]].sum() == (0 if key != "input_ids" else 2 * 16 * tok.pad_token_id)


@pytest.mark.parametrize("max_length", [None, 5])
def test_unpaired_collator_matches_trl(tok, max_length):
    ds = D.prepare_unpaired_preference_dataset(datasets.Dataset.from_dict(KTO_UNPAIRED), tok,
                                               KTOConfig(bf16=False, per_device_train_batch_size=5, max_length=None))
    rows = _rows(ds)
    for i, r in enumerate(rows):
        r["ref_logps"], r["ref_KL_logps"] = -1.0 * i, -0.5 * i
    theirs = TRLUnpairedCollator(pad_token_id=tok.pad_token_id, max_length=max_length)(rows)
    ours = D.DataCollatorForUnpairedPreference(pad_token_id=tok.pad_token_id, max_length=max_length)(rows)
    for prefix in ("", "KL_"):
        mask = ours[f"{prefix}attention_mask"]
        for key in ("input_ids", "completion_mask"):
            assert _unpad_rows(ours[prefix + key], mask) == _unpad_rows(
                theirs[prefix + key].numpy(), theirs[f"{prefix}attention_mask"].numpy())
    np.testing.assert_array_equal(ours["label"], theirs["label"].numpy())
    for key in ("ref_logps", "ref_KL_logps"):
        np.testing.assert_allclose(ours[key], theirs[key].numpy())
    # KL completions are the batch's completions rotated by one
    assert rows[0]["KL_completion_ids"] == rows[-1]["completion_ids"]


# ---------------------------------------------------------------------------------------------- loading / builtins


def test_load_dataset_any(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    ds = datasets.Dataset.from_list(rows)
    ds.to_json(str(tmp_path / "d.jsonl"))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for src in (tmp_path / "d.jsonl", str(tmp_path / "d.parquet"), str(tmp_path / "saved"), rows, ds):
        assert _rows(D.load_dataset_any(src)) == rows
    dd = datasets.DatasetDict({"train": ds, "test": ds})
    assert D.load_dataset_any(dd, split="test") is dd["test"]
    with pytest.raises(ValueError, match="splits"):
        D.load_dataset_any(dd, split="validation")
    with pytest.raises(TypeError):
        D.load_dataset_any(3)


def test_builtin_datasets(tok):
    from trl_jax.data.builtin import BUILTIN_DATASETS

    sft = D.load_dataset_any("builtin:arithmetic_sft")
    assert len(sft) == 2000 and D.validate_dataset_format(sft, "sft").startswith("language_modeling")

    def solve(q):
        if q.startswith("What is "):
            a, b = q[len("What is "):-1].split("+")
            return str(int(a) + int(b))
        if q.startswith("What comes after "):
            return str(int(q[len("What comes after "):-1]) + 1)
        kind, digits = q.split(" ")
        return digits if kind == "Repeat" else digits[::-1]

    for row in sft:
        q, a = row["messages"][0]["content"], row["answer"]
        assert solve(q) == a == row["messages"][1]["content"], q
    pref = D.load_dataset_any("builtin:arithmetic_preference")
    assert D.validate_dataset_format(pref, "dpo") == "preference"
    assert all(r["chosen"][0]["content"] != r["rejected"][0]["content"] for r in pref)
    prompts = D.load_dataset_any("builtin:arithmetic_prompts", split="test")
    assert len(prompts) == 200 and D.validate_dataset_format(prompts, "grpo") == "prompt_only"
    assert set(BUILTIN_DATASETS) == {"arithmetic_sft", "arithmetic_preference", "arithmetic_prompts"}
    # the tokenized pipeline runs on them
    out = D.prepare_sft_dataset(sft.select(range(8)), tok, SFTConfig(bf16=False, assistant_only_loss=True,
                                                                     max_length=64))
    assert len(out) == 8 and all(any(t != -100 for t in r["labels"]) for r in out)
