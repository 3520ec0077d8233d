"""Heads: sequence-classification scores equal transformers' ``*ForSequenceClassification``; the value head follows
TRL's ``AutoModelForCausalLMWithValueHead`` contract (``v_head.summary`` on the last hidden state, fp32).

trl 1.16.0 (installed) no longer ships ``AutoModelForCausalLMWithValueHead`` (it lived in
``trl/experimental/ppo/modeling_value_head.py``), so the value-head reference is that contract driven through
transformers' ``output_hidden_states`` and a ``torch.nn.Linear`` holding the checkpoint's ``v_head.summary``.
"""

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from model_fixtures import make_torch_model, padded_batch, save_torch_model
from trl_jax.models import from_pretrained, save_pretrained


def _torch_scores(tm, ids, mask, pos):
    with torch.no_grad():
        return tm(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask),
                  position_ids=torch.as_tensor(pos, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_sequence_classification_scores_match_transformers(name, tmp_path):
    tm = make_torch_model(name, kind="seqcls", num_labels=3)
    model, params = from_pretrained(save_torch_model(tm, tmp_path / "src"))
    assert params["score"]["kernel"].shape == (32, 3)
    ids, mask, pos = padded_batch()  # pad_token_id = 0 in both padded rows
    ref = _torch_scores(tm, ids, mask, pos)
    out = np.asarray(jax.jit(model.sequence_scores)(params, ids, pos, mask))
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    # save -> transformers AutoModelForSequenceClassification: identical scores
    save_pretrained(model, params, str(tmp_path / "out"))
    back = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out"),
                                                                         attn_implementation="eager")
    np.testing.assert_array_equal(_torch_scores(back.eval(), ids, mask, pos), ref)


def test_value_head_follows_trl_contract(tmp_path):
    tm = make_torch_model("qwen3")
    src = save_torch_model(tm, tmp_path / "src")
    # TRL saves the value head next to the LM weights as v_head.summary.{weight,bias}
    rng = np.random.default_rng(0)
    f = f"{src}/model.safetensors"
    tensors = safetensors.numpy.load_file(f)
    tensors["v_head.summary.weight"] = rng.normal(size=(1, 32)).astype(np.float32)
    tensors["v_head.summary.bias"] = np.array([0.3], np.float32)
    safetensors.numpy.save_file(tensors, f, metadata={"format": "pt"})
    model, params = from_pretrained(src, value_head=True)
    ids, mask, pos = padded_batch()
    values = jax.jit(model.values)(params, ids, pos, mask)
    assert values.shape == ids.shape and values.dtype == np.float32
    summary = torch.nn.Linear(32, 1)
    with torch.no_grad():
        summary.weight.copy_(torch.from_numpy(tensors["v_head.summary.weight"]))
        summary.bias.copy_(torch.from_numpy(tensors["v_head.summary.bias"]))
        hidden = tm(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask),
                    position_ids=torch.as_tensor(pos, dtype=torch.long), output_hidden_states=True).hidden_states[-1]
        ref = summary(hidden.float()).squeeze(-1).numpy()
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(values)[valid], ref[valid], atol=1e-4, rtol=0)
    # the head survives save_pretrained under TRL's names, and transformers still loads the LM
    save_pretrained(model, params, str(tmp_path / "out"))
    saved = safetensors.numpy.load_file(str(tmp_path / "out" / "model.safetensors"))
    np.testing.assert_array_equal(saved["v_head.summary.weight"], tensors["v_head.summary.weight"])
    transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))


def test_value_head_randomly_initialized_when_absent(tmp_path):
    model, params = from_pretrained(save_torch_model(make_torch_model("llama"), tmp_path), value_head=True)
    assert params["v_head"]["summary"]["kernel"].shape == (32, 1)
    with pytest.raises(ValueError, match="no `score` head"):
        model.sequence_scores(params, np.ones((1, 3), np.int32))
