"""generate_batch and the step-wise BatchedGeneration on a tiny random model."""

from __future__ import annotations

import pytest

import shoal
from shoal.batch_generation import BatchedGeneration, batch_params, generate_batch

OPTIONS = {"kv_cache_memory": 16 << 20, "block_size": 16}
PROMPTS = [
    "Hello, world!",
    "Once upon a time",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llm(model) -> shoal.LLM:
    return shoal.LLM(model, **OPTIONS)


def test_generate_batch_is_reproducible_and_sequences_differ(llm):
    texts = generate_batch(llm, PROMPTS, max_tokens=12, temperature=1.0, top_p=0.95, seed=42)
    assert texts == generate_batch(llm, PROMPTS, max_tokens=12, temperature=1.0, top_p=0.95, seed=42)
    assert texts[0] != texts[2]  # same prompt, seeds 42 and 44
    assert texts != generate_batch(llm, PROMPTS, max_tokens=12, temperature=1.0, top_p=0.95, seed=7)
    # Sequence i is seeded seed + i, whatever else is in the batch.
    assert generate_batch(llm, PROMPTS[1:], max_tokens=12, temperature=1.0, top_p=0.95, seed=43) == texts[1:]


def reference(llm, max_tokens: int, seed: int) -> list[shoal.CompletionOutput]:
    params = batch_params(len(PROMPTS), max_tokens, 1.0, 0.95, seed, ignore_eos=True)
    return [o.outputs[0] for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def test_step_gives_one_token_per_active_sequence(llm):
    want = reference(llm, 10, 5)
    gen = BatchedGeneration(llm, PROMPTS, max_tokens=10, temperature=1.0, top_p=0.95, seed=5, ignore_eos=True)
    steps = 0
    while not gen.done:
        results = gen.step()
        steps += 1
        assert all(r is not None for r in results)
        assert all(done == (steps == 10) for _, _, done in results)
    assert steps == 10 and gen.active == [False] * 4
    assert gen.token_ids == [c.token_ids for c in want]
    assert gen.texts == [c.text for c in want]
    assert gen.finish_reasons == ["length"] * 4
    assert gen.step() == [None] * 4


def test_clearing_a_flag_stops_that_sequence(model, llm):
    want = reference(llm, 12, 9)
    gen = BatchedGeneration(
        model,
        PROMPTS,
        max_tokens=12,
        temperature=1.0,
        top_p=0.95,
        seed=9,
        ignore_eos=True,
        engine_options=OPTIONS,
    )
    for _ in range(3):
        gen.step()
    blocks = gen.engine.block_manager
    gen.active[1] = False
    results = gen.step()
    assert results[1] is None and all(r is not None for i, r in enumerate(results) if i != 1)
    running = gen.engine.scheduler.running
    held = {b for seq in running for b in seq.block_table}
    assert len(running) == 3 and blocks.num_free_blocks == blocks.num_blocks - len(
        held
    )  # its blocks are free
    texts = gen.run()
    assert gen.token_ids[1] == want[1].token_ids[:3] and gen.finish_reasons[1] == "abort"
    for i in (0, 2, 3):
        assert gen.token_ids[i] == want[i].token_ids and texts[i] == want[i].text
    gen.close()
    assert blocks.num_free_blocks == blocks.num_blocks and not gen.engine.has_unfinished_requests()


def test_long_prompts_prefill_in_chunks(model):
    prompts = [list(range(3, 3 + 60)), [5, 6, 7]]
    gen = BatchedGeneration(
        model,
        prompts,
        max_tokens=5,
        temperature=0,
        ignore_eos=True,
        engine_options={**OPTIONS, "max_num_batched_tokens": 16},
    )
    first = gen.step()  # several engine steps: the 60-token prompt needs 4 chunks
    assert all(r is not None for r in first)
    gen.run()
    want = shoal.LLM(model, **OPTIONS).generate(
        prompts, shoal.SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False
    )
    assert gen.token_ids == [o.outputs[0].token_ids for o in want]
