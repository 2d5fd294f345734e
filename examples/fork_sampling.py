"""Fork-and-compare sampling with the BatchedExecutor: the prompt is computed once, then forked into
branches that share its KV blocks and sample at different temperatures, all decoded in the same passes.

    python examples/fork_sampling.py [--model PATH] [--max-tokens N]
"""

from __future__ import annotations

import argparse
import os

import shoal
from shoal import BatchedExecutor, DecodeResult

QUESTION = "Write one sentence about the sea."
TEMPERATURES = [0.0, 0.5, 1.0, 1.5]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="HF directory or .gguf file (default: SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--max-tokens", type=int, default=int(os.environ.get("SHOAL_EXAMPLE_MAX_TOKENS", 48)))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    model = shoal.load_model(args.model)
    executor = BatchedExecutor(model, kv_cache_memory=64 << 20)
    blocks = executor.block_manager

    root = executor.create(seed=0)
    root.prompt(model.apply_chat_template([{"role": "user", "content": QUESTION}]), add_special_tokens=False)
    assert executor.infer() == DecodeResult.OK
    used = blocks.num_blocks - blocks.num_free_blocks
    branches = [root.fork(seed=i) for i in range(len(TEMPERATURES))]
    print(
        f"prompt: {root.token_count} tokens in {used} KV blocks, shared by {len(branches)} forks "
        f"(blocks in use after forking: {blocks.num_blocks - blocks.num_free_blocks})"
    )
    root.dispose()

    outputs: list[list[int]] = [[] for _ in branches]
    live = set(range(len(branches)))
    for _ in range(args.max_tokens):
        for i in sorted(live):
            token = branches[i].sample(shoal.SamplingParams(temperature=TEMPERATURES[i], top_p=0.95))
            outputs[i].append(token)
            if token in model.eos_token_ids:
                live.discard(i)
        if not live or executor.infer() != DecodeResult.OK:
            break
    texts = [model.tokenizer.decode(ids, skip_special_tokens=True) for ids in outputs]
    for temperature, text in zip(TEMPERATURES, texts, strict=True):
        print(f"\ntemperature {temperature}: {text.strip()}")
    for branch in branches:
        branch.dispose()
    return texts


if __name__ == "__main__":
    main()
