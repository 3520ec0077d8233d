"""HF safetensors in/out: trl_jax save -> transformers (PyTorch) load gives the same logits; sharded checkpoints
load onto a mesh of 8 simulated CPU devices with the parameters actually sharded."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from model_fixtures import ARCHS, make_torch_model, padded_batch, save_torch_model, torch_logits
from trl_jax.models import from_pretrained, save_pretrained
from trl_jax.models.safetensors_io import SafetensorsFile, save_file


def _torch_params_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        torch.testing.assert_close(sa[k].float(), sb[k].float(), atol=0, rtol=0, msg=k)


@pytest.mark.parametrize("name", list(ARCHS))
def test_round_trip_to_transformers(name, tmp_path):
    tm = make_torch_model(name)
    src = save_torch_model(tm, tmp_path / "src")
    model, params = from_pretrained(src)
    files = save_pretrained(model, params, str(tmp_path / "out"))
    assert files == ["model.safetensors"]
    keys = SafetensorsFile(str(tmp_path / "out" / "model.safetensors")).keys()
    assert ("lm_head.weight" in keys) == (not tm.config.tie_word_embeddings)
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager")
    _torch_params_equal(tm, back)
    ids, mask, pos = padded_batch()
    np.testing.assert_array_equal(torch_logits(back, ids, mask, pos), torch_logits(tm, ids, mask, pos))


def test_sharded_save_and_bf16_save(tmp_path):
    tm = make_torch_model("qwen3")
    model, params = from_pretrained(save_torch_model(tm, tmp_path / "src"))
    out = str(tmp_path / "sharded")
    files = save_pretrained(model, params, out, max_shard_size="8KB")
    assert len(files) > 3 and os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    with open(os.path.join(out, "model.safetensors.index.json")) as fh:
        index = json.load(fh)
    assert set(index["weight_map"].values()) == set(files)
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    _torch_params_equal(tm, back)
    # and trl_jax reads its own sharded output back bit-exactly
    _, params2 = from_pretrained(out)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)
    # bf16 save: torch loads bf16 weights equal to the bf16 rounding of ours
    out16 = str(tmp_path / "bf16")
    save_pretrained(model, params, out16, dtype=jnp.bfloat16)
    back16 = transformers.AutoModelForCausalLM.from_pretrained(out16)
    assert back16.dtype == torch.bfloat16
    w = back16.model.layers[1].mlp.down_proj.weight.detach().float().numpy()
    ours = np.asarray(params["layers"]["mlp"]["down_proj"]["kernel"][1]).T
    np.testing.assert_array_equal(w, ours.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_sharded_checkpoint_loads_onto_8_device_mesh(tmp_path):
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    tm = make_torch_model("llama")
    src = save_torch_model(tm, tmp_path / "src", max_shard_size="20KB")
    assert os.path.exists(os.path.join(src, "model.safetensors.index.json"))
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    model, params = from_pretrained(src, mesh=mesh)
    q = params["layers"]["self_attn"]["q_proj"]["kernel"]  # [L, D, N, Hd] = (layers, embed, heads, head_dim)
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (2, 16, 1, 8)
    up = params["layers"]["mlp"]["up_proj"]["kernel"]  # (layers, embed, mlp)
    assert up.addressable_shards[0].data.shape == (2, 16, 16)
    k = params["layers"]["self_attn"]["k_proj"]["kernel"]  # 2 kv heads do not split over tensor=4: replicated
    assert k.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None, None)
    ids, mask, pos = padded_batch()
    out = np.asarray(jax.jit(model.logits)(params, ids, pos, mask))
    ref = torch_logits(tm, ids, mask, pos)
    assert np.abs(out - ref)[mask.astype(bool)].max() <= 1e-4


def test_unsupported_architecture_lists_supported(tmp_path):
    transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"Unsupported architecture.*gpt2.*llama.*mistral.*qwen2.*qwen3"):
        from_pretrained(str(tmp_path))


def test_missing_lm_head_is_reported(tmp_path):
    tm = make_torch_model("llama")
    src = save_torch_model(tm, tmp_path)
    f = os.path.join(src, "model.safetensors")
    tensors = {k: v for k, v in safetensors.numpy.load_file(f).items() if k != "lm_head.weight"}
    safetensors.numpy.save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lm_head.weight"):
        from_pretrained(src)


def test_safetensors_writer_matches_the_safetensors_library(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.normal(size=(3, 5)).astype(np.float32), "b": np.arange(7, dtype=np.int64),
               "c": rng.normal(size=(2, 2)).astype(np.float16)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    back = safetensors.numpy.load_file(str(tmp_path / "x.safetensors"))
    for k in tensors:
        np.testing.assert_array_equal(back[k], tensors[k])
    bf = rng.normal(size=(4, 3)).astype(ml_dtypes.bfloat16)
    save_file({"w": bf}, str(tmp_path / "bf.safetensors"))
    t = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(tmp_path / "bf.safetensors"))["w"]
    assert t.dtype == torch.bfloat16
    np.testing.assert_array_equal(t.float().numpy(), bf.astype(np.float32))


def test_save_tokenizer_and_generation_config(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(97)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0", unk_token="w1")
    gen = transformers.GenerationConfig(max_new_tokens=7, do_sample=False)
    tm = make_torch_model("qwen2")
    model, params = from_pretrained(save_torch_model(tm, tmp_path / "src"))
    out = str(tmp_path / "out")
    save_pretrained(model, params, out, tokenizer=hf_tok, generation_config=gen)
    assert os.path.exists(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer.json")) as fh:
        assert json.load(fh)["model"]["vocab"] == vocab
    assert transformers.GenerationConfig.from_pretrained(out).max_new_tokens == 7
    assert transformers.AutoConfig.from_pretrained(out).architectures == ["Qwen2ForCausalLM"]


def test_safetensors_reader_and_writer_round_trip_every_dtype(tmp_path):
    """save_file/SafetensorsFile (the safetensors package) round-trip every dtype a checkpoint holds, bf16 and fp8
    included, and read what safetensors.numpy / transformers wrote."""
    from trl_jax.models.safetensors_io import SafetensorsFile as Reader

    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 4))
    tensors = {
        "f64": x, "f32": x.astype(np.float32), "f16": x.astype(np.float16), "bf16": x.astype(ml_dtypes.bfloat16),
        "e4m3": x.astype(ml_dtypes.float8_e4m3fn), "e5m2": x.astype(ml_dtypes.float8_e5m2),
        "i64": np.arange(5, dtype=np.int64), "i32": np.arange(5, dtype=np.int32), "i8": np.arange(5, dtype=np.int8),
        "u8": np.arange(5, dtype=np.uint8), "bool": x > 0, "scalar": np.float32(2.5).reshape(()),
        "empty": np.zeros((0, 3), np.float32), "transposed": x.astype(np.float32).T,  # non-contiguous input
    }
    path = str(tmp_path / "all.safetensors")
    save_file(tensors, path, metadata={"format": "pt", "note": "x"})
    f = Reader(path)
    assert sorted(f.keys()) == sorted(tensors) and "f32" in f and "nope" not in f
    assert f.metadata == {"format": "pt", "note": "x"}
    for k, v in tensors.items():
        got = f[k]
        assert got.dtype == v.dtype and got.shape == v.shape, k
        np.testing.assert_array_equal(got.astype(np.float64), np.asarray(v).astype(np.float64), err_msg=k)
    plain = {k: v for k, v in tensors.items() if k not in ("e4m3", "e5m2")}
    with safetensors.safe_open(path, framework="numpy") as back:  # the library reads ours
        for k in plain:
            np.testing.assert_array_equal(back.get_tensor(k), plain[k], err_msg=k)
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in plain.items()}, str(tmp_path / "lib.st"))
    lib = Reader(str(tmp_path / "lib.st"))  # and we read the library's
    for k in plain:
        np.testing.assert_array_equal(lib[k], plain[k], err_msg=k)
    assert not os.path.exists(path + ".tmp")
    with pytest.raises(KeyError, match="nope"):
        f["nope"]
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ValueError, match=r"bad\.safetensors is not a readable safetensors file"):
        Reader(str(tmp_path / "bad.safetensors"))
