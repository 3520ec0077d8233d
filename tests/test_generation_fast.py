"""Fast rollouts: decode layout (no weight collectives in the decode loop), in-place KV cache whose attention cost
follows the tokens generated so far, prefix sharing within generation groups. Compiled-program checks use
``trl_jax.utils.hlo_cost`` on the decode loop bodies (8 simulated CPU devices); values against transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hlo_loops import body_cost, decode_loops, instructions, root_op
from model_fixtures import VOCAB, make_torch_model, save_torch_model

from trl_jax.generation import generate, repeat_for_generations
from trl_jax.generation.sampler import decode_segments, lower_generate, prepare_decode_params
from trl_jax.models import from_pretrained, param_shardings
from trl_jax.parallel import make_mesh, shard_batch
from trl_jax.utils.hlo_cost import hlo_cost

PAD = 0


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    out = {}
    for name in ("qwen3", "mistral"):
        tm = make_torch_model(name, seed=1)
        out[name] = (tm, save_torch_model(tm, tmp_path_factory.mktemp(name)))
    return out


def _prompts(B=8, P=8, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(B, P)).astype(np.int32)
    mask = np.ones_like(ids)
    for r in range(B):
        mask[r, : (0, 3, 6, 1)[r % 4]] = 0
    ids[mask == 0] = PAD
    return ids, mask


def _hf_greedy(tm, ids, mask, N):
    with torch.no_grad():
        out = tm.generate(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask),
                          max_new_tokens=N, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    return out[:, ids.shape[1]:].numpy()


def _weight_shapes(params):
    """Every parameter shape, and each scanned layer's shape without the leading layer axis (size-1 dims dropped)."""
    shapes = set()
    for x in jax.tree.leaves(params):
        for s in (x.shape, x.shape[1:]):
            squeezed = tuple(d for d in s if d != 1)
            if len(squeezed) >= 2:
                shapes.add(squeezed)
    return shapes


def _gathered_weights(comps, body, params):
    wshapes = _weight_shapes(params)
    found = []
    for _, op, shapes, _ in instructions(comps, body):
        if op in ("all-gather", "all-gather-start"):
            for _, dims in shapes:
                if tuple(d for d in dims if d != 1) in wshapes:
                    found.append(tuple(dims))
    return found


@pytest.mark.parametrize("scan", [True, False])
def test_decode_layout_has_no_weight_all_gather_in_decode_loop(dirs, scan):
    tm, d = dirs["qwen3"]
    model, params = from_pretrained(d, scan_layers=scan)
    c = model.config
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    mesh = make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    sh = jax.device_put(params, param_shardings(model.logical_axes(), model.abstract_params(), mesh))
    ids, mask = _prompts()
    b = shard_batch({"ids": ids, "mask": mask}, mesh)
    N = 12
    kw = dict(max_new_tokens=N, do_sample=False, pad_token_id=PAD, mesh=mesh)

    # the training (fsdp) layout gathers each scanned layer's weights inside the decode loop: the check sees it
    # (unrolled layers: XLA hoists the loop-invariant gathers out of the loop, holding gathered fp32 copies)
    comps, loops = decode_loops(lower_generate(model, sh, b["ids"], b["mask"], **kw).compile().as_text(),
                                c.num_hidden_layers, c.num_key_value_heads, c.head_dim)
    assert len(loops) == 1
    if scan:
        assert _gathered_weights(comps, next(iter(loops.values())), params)

    ref = _hf_greedy(tm, ids, mask, N)
    for layout in ("replicated", "tensor", "auto"):
        low = lower_generate(model, sh, b["ids"], b["mask"], decode_layout=layout, **kw)
        comps, loops = decode_loops(low.compile().as_text(), c.num_hidden_layers, c.num_key_value_heads, c.head_dim)
        (body,) = loops.values()
        assert _gathered_weights(comps, body, params) == [], layout
        cost = body_cost(comps, body)
        if layout in ("replicated", "auto"):  # auto on CPU (no memory limit reported): replicated
            assert cost["collective_bytes"].get("all-gather", 0) == 0, (layout, cost)
        out = generate(model, sh, b["ids"], b["mask"], decode_layout=layout, **kw)
        np.testing.assert_array_equal(np.asarray(out.completion_ids), ref)

    # the decode-layout params: compute dtype, replicated / split on head, MLP dims only (never the model dim)
    rep = prepare_decode_params(model, sh, mesh=mesh, layout="replicated", dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 and x.sharding.is_fully_replicated for x in jax.tree.leaves(rep))
    tp = prepare_decode_params(model, sh, mesh=mesh, layout="tensor")
    layer = tp["layers"] if scan else tp["layers_0"]
    assert layer["mlp"]["gate_proj"]["kernel"].sharding.spec[-1] == "fsdp"
    assert layer["mlp"]["down_proj"]["kernel"].sharding.spec[-2] == "fsdp"
    assert tp["embed_tokens"]["embedding"].sharding.spec == jax.sharding.PartitionSpec(None, None)  # 97 rows: no split


@pytest.mark.parametrize("scan", [True, False])
def test_decode_step_cost_follows_tokens_generated_and_cache_updates_in_place(dirs, scan):
    _, d = dirs["qwen3"]
    model, params = from_pretrained(d, scan_layers=scan)
    c = model.config
    L, K, Hd = c.num_hidden_layers, c.num_key_value_heads, c.head_dim
    ids, mask = _prompts()
    B, P = ids.shape
    costs = {}
    for N in (128, 1024):
        text = lower_generate(model, params, ids, mask, jax.random.key(0), max_new_tokens=N, pad_token_id=PAD,
                              eos_token_id=[3]).compile().as_text()
        comps, loops = decode_loops(text, L, K, Hd)
        # one loop per segment, over a cache of P + end - 1 slots
        assert sorted(loops) == [P + e - 1 for _, e in decode_segments(N, 128)]
        for S, body in loops.items():
            costs[N, S] = body_cost(comps, body)["matmul_flops"]
            # in place: inside the loop nothing but a dynamic-update-slice produces a whole-cache buffer
            for name, op, shapes, instr in instructions(comps, body):
                if any(dims == [L, B, S, K, Hd] for _, dims in shapes):
                    if op == "fusion":
                        callee = instr.split("calls=")[1].split(",")[0].strip().lstrip("%")
                        op = root_op(comps, callee)
                    assert op in ("parameter", "get-tuple-element", "tuple", "while", "dynamic-update-slice",
                                  "bitcast"), (N, S, op, instr[:200])
    # the step that samples token 64 runs in the first segment, attending over P + 127 slots with either budget
    step64 = P + 127
    assert costs[1024, step64] <= 1.3 * costs[128, step64]
    assert costs[1024, step64] == costs[128, step64]
    # and the cost counter does see attention: the last segment of the 1024 budget (P + 1023 slots) costs more
    assert costs[1024, P + 1023] > 2 * costs[1024, step64]


def test_decode_segments():
    assert decode_segments(1, 128) == ()
    assert decode_segments(100, 128) == ((1, 100),)
    assert decode_segments(1024, 128) == ((1, 128), (128, 256), (256, 512), (512, 1024))
    assert decode_segments(300, 128) == ((1, 128), (128, 256), (256, 300))


@pytest.mark.parametrize("name,scan", [("mistral", True), ("mistral", False), ("qwen3", False)])
def test_greedy_across_segments_matches_transformers(dirs, name, scan):
    """Small segments (4, 8, 16, 20 tokens): the cache grows three times; mistral's sliding window (4) too."""
    tm, d = dirs[name]
    model, params = from_pretrained(d, scan_layers=scan)
    ids, mask = _prompts(B=4)
    N = 20
    out = generate(model, params, ids, mask, max_new_tokens=N, do_sample=False, pad_token_id=PAD,
                   decode_block_size=4)
    np.testing.assert_array_equal(np.asarray(out.completion_ids), _hf_greedy(tm, ids, mask, N))


def test_prefix_sharing_same_tokens_and_a_fraction_of_the_prefill(dirs):
    tm, d = dirs["qwen3"]
    model, params = from_pretrained(d)
    uids, umask = _prompts(B=2, seed=3)
    G = 4
    rep = repeat_for_generations({"ids": uids, "mask": umask}, G)  # p0 p0 p0 p0 p1 p1 p1 p1
    tiled = {"ids": np.concatenate([uids] * G), "mask": np.concatenate([umask] * G)}  # p0 p1 p0 p1 ...
    kw = dict(max_new_tokens=10, pad_token_id=PAD, temperature=1.3, top_k=20, repetition_penalty=1.2,
              eos_token_id=[5])
    for batch, layout in ((rep, "consecutive"), (tiled, "tiled")):
        base = generate(model, params, batch["ids"], batch["mask"], jax.random.key(1), **kw)
        shared = generate(model, params, batch["ids"], batch["mask"], jax.random.key(1), num_generations=G,
                          group_layout=layout, **kw)
        np.testing.assert_array_equal(np.asarray(shared.completion_ids), np.asarray(base.completion_ids))
        np.testing.assert_array_equal(np.asarray(shared.completion_mask), np.asarray(base.completion_mask))
        np.testing.assert_allclose(np.asarray(shared.logprobs), np.asarray(base.logprobs), atol=1e-5)
        assert len({tuple(r) for r in np.asarray(base.completion_ids)}) > 2  # the G samples differ
        greedy = generate(model, params, batch["ids"], batch["mask"], max_new_tokens=10, do_sample=False,
                          pad_token_id=PAD, num_generations=G, group_layout=layout)
        np.testing.assert_array_equal(np.asarray(greedy.completion_ids), _hf_greedy(tm, batch["ids"],
                                                                                   batch["mask"], 10))
    # each distinct prompt is prefilled once: a quarter of the prefill's matmuls (N=1: prefill + one sample only)
    one = dict(max_new_tokens=1, do_sample=False, pad_token_id=PAD)
    full = hlo_cost(lower_generate(model, params, rep["ids"], rep["mask"], **one).compile())["matmul_flops"]
    part = hlo_cost(lower_generate(model, params, rep["ids"], rep["mask"], num_generations=G, **one).compile())
    assert part["matmul_flops"] == pytest.approx(full / G, rel=0.01)
    with pytest.raises(ValueError, match="identical prompts"):
        generate(model, params, tiled["ids"], tiled["mask"], num_generations=G, **one)
    with pytest.raises(ValueError, match="multiple of num_generations"):
        generate(model, params, rep["ids"][:6], rep["mask"][:6], num_generations=G, **one)


def test_tensor_parallel_decode_layout_splits_heads_and_gathers_no_weight(tmp_path):
    """Heads, KV heads, MLP and vocabulary all divisible by 8: a real 8-way tensor-parallel decode."""
    tm = make_torch_model("qwen3", seed=1, vocab_size=128, num_attention_heads=8, num_key_value_heads=8)
    model, params = from_pretrained(save_torch_model(tm, tmp_path))
    c = model.config
    mesh = make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    sh = jax.device_put(params, param_shardings(model.logical_axes(), model.abstract_params(), mesh))
    ids, mask = _prompts()
    ids = np.where(mask == 1, ids % 128, PAD).astype(np.int32)
    b = shard_batch({"ids": ids, "mask": mask}, mesh)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=PAD, mesh=mesh, decode_layout="tensor")
    tp = prepare_decode_params(model, sh, mesh=mesh, layout="tensor")
    P_ = jax.sharding.PartitionSpec
    assert tp["layers"]["self_attn"]["q_proj"]["kernel"].sharding.spec == P_(None, None, "fsdp", None)
    assert tp["layers"]["self_attn"]["k_proj"]["kernel"].sharding.spec == P_(None, None, "fsdp", None)
    assert tp["layers"]["self_attn"]["o_proj"]["kernel"].sharding.spec == P_(None, "fsdp", None, None)
    assert tp["embed_tokens"]["embedding"].sharding.spec == P_("fsdp", None)
    comps, loops = decode_loops(lower_generate(model, sh, b["ids"], b["mask"], **kw).compile().as_text(),
                                c.num_hidden_layers, c.num_key_value_heads, c.head_dim)
    (body,) = loops.values()
    assert _gathered_weights(comps, body, params) == []
    assert body_cost(comps, body)["collective_bytes"].get("all-reduce", 0) > 0  # activations are reduced instead
    out = generate(model, sh, b["ids"], b["mask"], **kw)
    np.testing.assert_array_equal(np.asarray(out.completion_ids), _hf_greedy(tm, ids, mask, 12))


@pytest.mark.parametrize("scan", [True, False])
def test_donated_decode_step_updates_the_cache_in_place(dirs, scan):
    from trl_jax.generation import make_decode_fns
    from trl_jax.models.decoder import init_decode_cache

    _, d = dirs["mistral"]  # sliding window 4: the cached mask must apply it too
    model, params = from_pretrained(d, scan_layers=scan)
    c = model.config
    ids, mask = _prompts(B=4)
    B, P = ids.shape
    prefill, step = make_decode_fns(model)
    cache = init_decode_cache(c, B, P + 6)
    k_before = cache["k"]
    logits, cache = prefill(params, cache, ids, mask)
    assert k_before.is_deleted()  # donated
    seq, full_mask = ids, mask
    pos = mask.sum(1)
    for t in range(6):  # teacher-forced tokens: each step's logits equal the full forward's at that position
        tok = np.asarray(jnp.argmax(logits, -1), np.int32)
        seq = np.concatenate([seq, tok[:, None]], 1)
        full_mask = np.concatenate([full_mask, np.ones((B, 1), np.int32)], 1)
        ref = model.logits(params, seq, np.maximum(np.cumsum(full_mask, 1) - 1, 0), attention_mask=full_mask)[:, -1]
        logits, cache = step(params, cache, tok, pos + t)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=2e-5)
    # compiled step: the cache's k/v are aliased to the outputs, and only a dynamic-update-slice writes them
    L, S, K, Hd = c.num_hidden_layers, P + 6, c.num_key_value_heads, c.head_dim
    text = step.lower(params, cache, tok, pos).compile().as_text()
    assert "input_output_alias" in text
    from trl_jax.utils.hlo_cost import parse
    comps, entry = parse(text)
    for _, op, shapes, instr in instructions(comps, entry):
        if any(dims == [L, B, S, K, Hd] for _, dims in shapes):
            if op == "fusion":
                op = root_op(comps, instr.split("calls=")[1].split(",")[0].strip().lstrip("%"))
            assert op in ("parameter", "get-tuple-element", "tuple", "while", "dynamic-update-slice", "bitcast"), \
                instr[:200]
