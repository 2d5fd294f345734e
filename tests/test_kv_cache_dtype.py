"""A KV cache stored in 16 bits: the same rounding on the C and torch paths, logits close to float32's, and
a request's output still independent of its batch."""

import pytest
import torch
from test_engine import GREEDY, SEEDED, mixed_prompts, tokens
from test_model_logits import TOL, prompt_ids, reference_logits, shoal_logits
from test_quant_kernels import BUILDS
from transformers import AutoModelForCausalLM

import shoal
from shoal.kernels.build import load_library
from shoal.kernels.cpu import bind, rope_store_c
from shoal.kernels.torch_ops import write_kv

KV16 = [torch.float16, torch.bfloat16]
# float16 keeps 11 significant bits, bfloat16 8: the logits move by about that much, relative
KV16_TOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("isa", BUILDS)
@pytest.mark.parametrize("dtype", KV16, ids=str)
def test_the_kernel_rounds_to_16_bits_as_torch_does(isa, dtype):
    lib = bind(load_library(isa))
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, d, block, rows = 2, 2, 16, 8, 12
    scales = torch.tensor([1e-9, 1e-6, 3e-5, 1e-3, 1.0, 300.0, 7e4, 1e6]).repeat_interleave(1 + rows // 8)[
        :rows
    ]
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * d, generator=g) * scales[:, None]
    cos, sin = (
        torch.ones(rows, d),
        torch.zeros(rows, d),
    )  # no rotation: the values reach the cache as they are
    slots = torch.arange(rows)
    k, v = (torch.zeros(2, kv_heads, block, d, dtype=dtype) for _ in range(2))
    rope_store_c(lib, qkv.clone(), cos, sin, k, v, slots, heads)
    k_ref, v_ref = (torch.zeros(2, kv_heads, block, d, dtype=dtype) for _ in range(2))
    parts = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    write_kv(k_ref, v_ref, parts[1].reshape(rows, kv_heads, d), parts[2].reshape(rows, kv_heads, d), slots)
    assert torch.equal(k.view(torch.int16), k_ref.view(torch.int16))  # bit for bit, infinities included
    assert torch.equal(v.view(torch.int16), v_ref.view(torch.int16))


@pytest.mark.parametrize("dtype", KV16, ids=str)
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_16_bit_kv_logits_agree_across_paths_and_stay_near_float32(tiny_dirs, arch, dtype):
    c_model, torch_model = (
        shoal.load_model(tiny_dirs[arch]),
        shoal.load_model(tiny_dirs[arch], kernels="torch"),
    )
    ids = prompt_ids(c_model)
    ours = shoal_logits(c_model, ids, chunks=[17, 9], kv_dtype=dtype)
    ref = reference_logits(AutoModelForCausalLM.from_pretrained(tiny_dirs[arch]).eval(), ids)
    limit = KV16_TOL[dtype] * ref.abs().max().item()
    error = (ours - ref).abs().max().item()
    assert TOL < error < limit  # 16-bit storage really happened, and costs no more than its precision
    # the torch path rounds the same way (its float32 K may sit a rounding boundary apart: not bit-equal)
    assert (shoal_logits(torch_model, ids, chunks=[17, 9], kv_dtype=dtype) - ref).abs().max().item() < limit
    whole = shoal_logits(c_model, ids, chunks=[40], kv_dtype=dtype)
    for chunks in ([1, 39], [16, 16, 8], [5]):
        assert torch.equal(shoal_logits(c_model, ids, chunks=chunks, kv_dtype=dtype), whole), chunks


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_16_bit_kv_keeps_each_request_independent_of_its_batch(tiny_llama, params):
    prompts = mixed_prompts(20, seed=8)
    batched = shoal.LLM(
        tiny_llama, kv_cache_memory=8 << 20, kv_cache_dtype="float16", max_num_batched_tokens=256
    )
    alone = shoal.LLM(
        tiny_llama, kv_cache_memory=8 << 20, kv_cache_dtype="float16", max_num_batched_tokens=48
    )
    together = tokens(batched.generate(prompts, params, use_tqdm=False))
    assert together == [tokens(alone.generate([p], params, use_tqdm=False))[0] for p in prompts]
    assert batched.engine.core.runner.kv_caches[0][0].dtype == torch.float16


def test_16_bit_kv_holds_twice_the_tokens(tiny_llama):
    full = shoal.LLM(tiny_llama, kv_cache_memory=4 << 20)
    half = shoal.LLM(tiny_llama, kv_cache_memory=4 << 20, kv_cache_dtype="bfloat16")
    assert half.engine.block_manager.num_blocks == 2 * full.engine.block_manager.num_blocks
    with pytest.raises(shoal.InvalidRequestError, match="kv_cache_dtype"):
        shoal.LLM(tiny_llama, kv_cache_dtype="int8")
