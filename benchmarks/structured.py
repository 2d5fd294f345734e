"""What structured outputs cost the batch: 64 concurrent chat requests all constrained to a JSON schema,
against the same 64 unconstrained, same prompts and the same number of tokens each, in one run.

The constrained batch runs first; each unconstrained request then generates exactly as many tokens as its
constrained twin did (ignore_eos), so both batches do the same work apart from the masks. Prints tokens/s of
both, their ratio (target: at least 0.85) and the mask cost per constrained row per step; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from machine import cpu_isa, cpu_name, write_json

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 24},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "hobbies"],
    "additionalProperties": False,
}


class MaskTimer:
    """Counts the time and rows of every mask fill (on the worker thread or not)."""

    def __init__(self, filler) -> None:
        self.seconds, self.rows, self.calls = 0.0, 0, 0
        inner = filler.masks

        def timed(matchers):
            start = time.perf_counter()
            try:
                return inner(matchers)
            finally:
                self.seconds += time.perf_counter() - start
                self.rows += len(matchers)
                self.calls += 1

        filler.masks = timed


def run(llm, conversations, params) -> dict:
    start = time.perf_counter()
    outputs = llm.chat(conversations, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = [len(o.outputs[0].token_ids) for o in outputs]
    return {
        "seconds": seconds,
        "generated_tokens": sum(tokens),
        "tokens_per_s": sum(tokens) / seconds,
    }, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct GGUF")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--output", default="benchmarks/results/structured.json")
    args = parser.parse_args()

    from shoal import LLM, SamplingParams, StructuredOutputsParams, load_model

    model = load_model(args.model)
    llm = LLM(model, kv_cache_memory=1 << 30, max_num_seqs=args.num_requests)
    conversations = [
        [
            {
                "role": "user",
                "content": f"Invent person number {i}: give their name, age, city and hobbies as JSON.",
            }
        ]
        for i in range(args.num_requests)
    ]
    spec = StructuredOutputsParams(json=SCHEMA)
    constrained = [
        SamplingParams(temperature=0.7, seed=i, max_tokens=args.max_tokens, structured_outputs=spec)
        for i in range(args.num_requests)
    ]
    llm.chat(conversations[:4], constrained[:4], use_tqdm=False)  # warm-up, and the grammar compiled once
    touch = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    llm.chat(conversations, [touch] * args.num_requests, use_tqdm=False)  # the KV pages, so neither run pays
    timer = MaskTimer(llm.engine.core.masks)
    result_constrained, outputs = run(llm, conversations, constrained)
    mask = {"seconds": timer.seconds, "rows": timer.rows, "calls": timer.calls}
    lengths = [len(o.outputs[0].token_ids) for o in outputs]
    parsed = sum(1 for o in outputs if o.outputs[0].finish_reason == "stop" and json.loads(o.outputs[0].text))
    free = [
        SamplingParams(temperature=0.7, seed=i, max_tokens=n, ignore_eos=True) for i, n in enumerate(lengths)
    ]
    result_free, _ = run(llm, conversations, free)
    ratio = result_constrained["tokens_per_s"] / result_free["tokens_per_s"]
    per_row_us = 1e6 * mask["seconds"] / max(mask["rows"], 1)
    result = {
        "cpu": cpu_name(),
        "isa": cpu_isa(),
        "threads": torch.get_num_threads(),
        "model": model.name,
        "weights": model.describe_weights(),
        "num_requests": args.num_requests,
        "max_tokens": args.max_tokens,
        "constrained": result_constrained,
        "unconstrained": result_free,
        "throughput_ratio": ratio,
        "mask": {**mask, "microseconds_per_row_step": per_row_us},
        "constrained_outputs_valid_json": parsed,
    }
    overlap = "overlapping the forward pass" if llm.engine.core.masks.overlaps else "after the forward pass"
    result["masks_filled"] = overlap
    print(
        f"CPU: {result['cpu']} ({result['isa']}), {result['threads']} threads; {model.describe_weights()}; masks {overlap}"
    )
    print(
        f"json_schema:   {result_constrained['tokens_per_s']:8.1f} tokens/s ({result_constrained['seconds']:.1f} s)"
    )
    print(f"unconstrained: {result_free['tokens_per_s']:8.1f} tokens/s ({result_free['seconds']:.1f} s)")
    print(
        f"ratio {ratio:.3f} (target >= 0.85); masks {per_row_us:.0f} us per row per step ({mask['rows']} rows)"
    )
    print(f"{parsed}/{args.num_requests} constrained answers ended and parsed")
    write_json(args.output, result)


if __name__ == "__main__":
    main()
