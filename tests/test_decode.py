"""decode_and_strip_padding: padding/special-token stripping and every case of the reasoning-block policy."""

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from trl_jax.data.decode import decode_and_strip_padding, strip_reasoning

WORDS = ["the", "answer", "is", "42", "hmm", "let", "me", "think", "ok", "<think>", "</think>", "<r>", "</r>"]


def _tokenizer(markers_special: bool):
    specials = ["<pad>", "<eos>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    if markers_special:
        fast.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    else:
        fast.add_tokens(["<think>", "</think>"])
    return fast


def _ids(tok, texts, width=12, side="right"):
    rows = []
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        padn = width - len(ids)
        rows.append(ids + [tok.pad_token_id] * padn if side == "right" else [tok.pad_token_id] * padn + ids)
    return np.array(rows)


@pytest.mark.parametrize("markers_special", [False, True])
@pytest.mark.parametrize("side", ["left", "right"])
def test_every_case_of_the_policy(markers_special, side):
    tok = _tokenizer(markers_special)
    texts = [
        "the answer is 42",  # no markers: unchanged
        "<think> hmm let me think </think> the answer is 42",  # complete block: answer after it
        "hmm let me think </think> 42",  # only the closing marker (opened in the prompt)
        "<think> hmm let me think",  # unfinished: nothing to score
        "<think> hmm </think> ok <think> hmm",  # a new block opened after the last close: unfinished
        "",  # empty completion
    ]
    out = decode_and_strip_padding(_ids(tok, texts, side=side), tok)
    assert out == ["the answer is 42", "the answer is 42", "42", "", "", ""]


def test_custom_markers_and_disabled_policy():
    tok = _tokenizer(False)
    ids = _ids(tok, ["<r> hmm </r> 42", "<think> hmm </think> ok"])
    assert decode_and_strip_padding(ids, tok, think_start="<r>", think_end="</r>") == ["42", "<think> hmm </think> ok"]
    assert decode_and_strip_padding(ids, tok, think_start=None, think_end=None) == [
        "<r> hmm </r> 42",
        "<think> hmm </think> ok",
    ]


def test_mask_selects_tokens():
    tok = _tokenizer(False)
    ids = _ids(tok, ["the answer is 42"])
    mask = np.zeros_like(ids)
    mask[0, 3] = 1
    assert decode_and_strip_padding(ids, tok, mask=mask) == ["42"]
    with pytest.raises(ValueError, match="mask shape"):
        decode_and_strip_padding(ids, tok, mask=mask[:, :3])
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        decode_and_strip_padding(ids[0], tok)


def test_strip_reasoning_strings():
    assert strip_reasoning("plain") == "plain"
    assert strip_reasoning("<think>x</think>\n\n y ") == "y"
    assert strip_reasoning("x</think>y") == "y"
    assert strip_reasoning("<think>x") == ""
