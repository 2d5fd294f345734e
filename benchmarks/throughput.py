"""Throughput of shoal against transformers' batched generate, same model, prompts and dtype, in one run.

64 requests, prompt lengths random in [32, 256] (fixed seed), 128 new tokens each, ignore_eos.
Prints tokens/s of both and their ratio, plus batch-1 decode tokens/s of both; writes JSON.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from machine import write_json


def make_prompts(count: int, low: int, high: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(rng.randint(low, high))] for _ in range(count)]


def run_shoal(llm, prompts, max_tokens: int) -> dict:
    from shoal import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"seconds": elapsed, "generated_tokens": generated, "tokens_per_s": generated / elapsed}


def shoal_decode_rate(llm, prompt: list[int], max_tokens: int) -> float:
    """Batch-1 decode tokens/s: time between the first and the last generated token."""
    from shoal import SamplingParams
    from shoal.engine.request import OutputKind

    engine = llm.engine
    engine.add_request(
        prompt,
        SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
        "b1",
        output_kind=OutputKind.CUMULATIVE,
    )
    first = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if first is None and out.outputs[0].token_ids:
                first = (time.perf_counter(), len(out.outputs[0].token_ids))
            last = (time.perf_counter(), len(out.outputs[0].token_ids))
    return (last[1] - first[1]) / (last[0] - first[0])


def load_hf(model_path: str | None):
    from transformers import AutoModelForCausalLM

    from shoal.models.loader import default_model_path

    path = Path(model_path or default_model_path())
    if path.suffix == ".gguf":
        return AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        ).eval()
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@torch.inference_mode()
def run_hf(model, prompts, max_tokens: int, pad_id: int) -> dict:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=max_tokens,
        min_new_tokens=max_tokens,
        do_sample=False,
        pad_token_id=pad_id,
    )
    elapsed = time.perf_counter() - start
    generated = (out.shape[1] - width) * len(prompts)
    return {"seconds": elapsed, "generated_tokens": generated, "tokens_per_s": generated / elapsed}


@torch.inference_mode()
def hf_decode_rate(model, prompt: list[int], max_tokens: int) -> float:
    ids = torch.tensor([prompt])
    one = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    prefill = time.perf_counter() - one
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
    return (max_tokens - 1) / (time.perf_counter() - start - prefill)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct GGUF")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--min-prompt", type=int, default=32)
    parser.add_argument("--max-prompt", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument(
        "--quantization",
        default="float32",
        help="shoal's weight format: float32 (default: the dtype transformers runs in), or auto to keep the file's",
    )
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--output", default="benchmarks/results/throughput.json")
    args = parser.parse_args()

    from shoal import LLM, load_model

    model = load_model(args.model, quantization=args.quantization)
    llm = LLM(
        model,
        kv_cache_memory=2 << 30,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    prompts = make_prompts(
        args.num_requests, args.min_prompt, args.max_prompt, model.config.vocab_size, args.seed
    )
    run_shoal(llm, prompts[:4], 8)  # warm-up
    print(f"shoal keeps {model.describe_weights()}")
    result = {
        "model": model.name,
        "dtype": "float32",
        "shoal_weights": model.describe_weights(),
        "threads": torch.get_num_threads(),
        "num_requests": args.num_requests,
        "prompt_lengths": [args.min_prompt, args.max_prompt],
        "max_tokens": args.max_tokens,
    }
    result["shoal"] = run_shoal(llm, prompts, args.max_tokens)
    result["shoal"]["batch1_decode_tokens_per_s"] = shoal_decode_rate(llm, prompts[0][:32], args.max_tokens)
    print(
        f"shoal:        {result['shoal']['tokens_per_s']:8.1f} tokens/s  ({result['shoal']['seconds']:.1f} s)  "
        f"batch-1 decode {result['shoal']['batch1_decode_tokens_per_s']:.1f} tokens/s"
    )
    if not args.skip_transformers:
        hf = load_hf(args.model)
        pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
        result["transformers"] = run_hf(hf, prompts, args.max_tokens, pad)
        result["transformers"]["batch1_decode_tokens_per_s"] = hf_decode_rate(
            hf, prompts[0][:32], args.max_tokens
        )
        result["throughput_ratio"] = result["shoal"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
        result["batch1_decode_ratio"] = (
            result["shoal"]["batch1_decode_tokens_per_s"]
            / result["transformers"]["batch1_decode_tokens_per_s"]
        )
        print(
            f"transformers: {result['transformers']['tokens_per_s']:8.1f} tokens/s  "
            f"({result['transformers']['seconds']:.1f} s)  batch-1 decode "
            f"{result['transformers']['batch1_decode_tokens_per_s']:.1f} tokens/s"
        )
        print(
            f"ratio shoal / transformers: throughput {result['throughput_ratio']:.2f}x, "
            f"batch-1 decode {result['batch1_decode_ratio']:.2f}x"
        )
    write_json(args.output, result)


if __name__ == "__main__":
    main()
