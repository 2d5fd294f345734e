"""AsyncLLM on a tiny random model: streaming deltas, cancel and abort freeing KV at once, error isolation."""

from __future__ import annotations

import asyncio
import random

import pytest

import shoal
from shoal.errors import InvalidRequestError

OPTIONS = {"kv_cache_memory": 16 << 20, "block_size": 16, "max_model_len": 256}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llm(model) -> shoal.LLM:
    return shoal.LLM(model, **OPTIONS)


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 400) for _ in range(n)]


async def collect(
    engine: shoal.AsyncLLM, prompt, params, request_id=None, on_output=None
) -> list[shoal.RequestOutput]:
    outs = []
    async for out in engine.generate(prompt, params, request_id):
        outs.append(out)
        if on_output is not None:
            on_output(out)
    return outs


async def wait_for(condition, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.001)


def test_deltas_join_to_the_final_text(model, llm):
    prompts = ["Hello, world! How are you", "Once upon a time", "The quick brown fox"]
    params = [
        shoal.SamplingParams(temperature=1.0, seed=1, max_tokens=40),
        shoal.SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=30, stop=["e"]),
        shoal.SamplingParams(temperature=0, max_tokens=25, logprobs=2),
    ]
    want = llm.generate(prompts, params, use_tqdm=False)

    async def main():
        engine = shoal.AsyncLLM(model, **OPTIONS)
        try:
            return await asyncio.gather(
                *(collect(engine, p, sp) for p, sp in zip(prompts, params, strict=True))
            )
        finally:
            await engine.shutdown()

    for outs, final in zip(asyncio.run(main()), want, strict=True):
        assert len(outs) > 1 and outs[-1].finished and not any(o.finished for o in outs[:-1])
        text = "".join(o.outputs[0].text for o in outs)
        ids = [t for o in outs for t in o.outputs[0].token_ids]
        assert text == final.outputs[0].text
        assert ids == final.outputs[0].token_ids
        assert outs[-1].outputs[0].finish_reason == final.outputs[0].finish_reason


def test_cancelling_one_of_eight_frees_its_blocks_at_once(model, llm):
    victim = 3
    prompts = [tokens(160 if i == victim else 60, i) for i in range(8)]
    params = [
        shoal.SamplingParams(temperature=1.0, seed=i, max_tokens=90 if i == victim else 150, ignore_eos=True)
        for i in range(8)
    ]
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    async def main():
        engine = shoal.AsyncLLM(model, **OPTIONS)
        started = asyncio.Event()
        received = [0] * 8

        def count(i):
            def on_output(out):
                received[i] += len(out.outputs[0].token_ids)
                if i == victim and received[i] >= 5:
                    started.set()

            return on_output

        tasks = [
            asyncio.create_task(collect(engine, p, sp, on_output=count(i)))
            for i, (p, sp) in enumerate(zip(prompts, params, strict=True))
        ]
        await started.wait()
        before = engine.stats()
        tasks[victim].cancel()
        with pytest.raises(asyncio.CancelledError):
            await tasks[victim]
        await wait_for(lambda: engine.stats().num_running == 7)
        after = engine.stats()
        others_busy = not any(t.done() for i, t in enumerate(tasks) if i != victim)
        results = await asyncio.gather(*(t for i, t in enumerate(tasks) if i != victim))
        await engine.shutdown()
        return before, after, others_busy, results

    before, after, others_busy, results = asyncio.run(main())
    assert before.num_running == 8 and others_busy
    assert after.num_free_blocks > before.num_free_blocks  # the victim's 11 blocks came back at once
    assert after.kv_cache_usage < before.kv_cache_usage
    others = [i for i in range(8) if i != victim]
    for i, outs in zip(others, results, strict=True):
        assert [t for o in outs for t in o.outputs[0].token_ids] == want[i]


def test_abort_by_request_id(model, llm):
    params = shoal.SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
    prompts = [tokens(20, 10), tokens(20, 11)]
    want = llm.generate(prompts[1], params, use_tqdm=False)[0].outputs[0].token_ids

    async def main():
        engine = shoal.AsyncLLM(model, **OPTIONS)
        first = asyncio.Event()
        task = asyncio.create_task(
            collect(engine, prompts[0], params, "victim", on_output=lambda _: first.set())
        )
        other = asyncio.create_task(collect(engine, prompts[1], params, "other"))
        await first.wait()
        await engine.abort("victim")
        outs = await task
        kept = await other
        await engine.shutdown()
        return outs, kept

    outs, kept = asyncio.run(main())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert sum(len(o.outputs[0].token_ids) for o in outs) < 120
    assert [t for o in kept for t in o.outputs[0].token_ids] == want


def test_an_error_reaches_only_its_request(model, llm):
    params = shoal.SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    good = [tokens(10, 20), tokens(12, 21)]
    want = [o.outputs[0].token_ids for o in llm.generate(good, params, use_tqdm=False)]

    async def main():
        engine = shoal.AsyncLLM(model, **OPTIONS)
        results = await asyncio.gather(
            collect(engine, good[0], params),
            collect(engine, [1, 2, 10_000], params),  # a token id outside the vocabulary
            collect(engine, tokens(250, 22), params),  # over max_model_len
            collect(engine, good[1], params),
            return_exceptions=True,
        )
        await engine.shutdown()
        return results

    ok0, bad_token, too_long, ok1 = asyncio.run(main())
    assert isinstance(bad_token, InvalidRequestError) and isinstance(too_long, InvalidRequestError)
    for outs, ids in zip((ok0, ok1), want, strict=True):
        assert [t for o in outs for t in o.outputs[0].token_ids] == ids


def test_clean_shutdown(model):
    async def main():
        engine = shoal.AsyncLLM(model, **OPTIONS)
        outs = await collect(engine, "Hello", shoal.SamplingParams(max_tokens=3, seed=0))
        await engine.shutdown()
        return engine, outs

    engine, outs = asyncio.run(main())
    assert outs[-1].finished
    assert not engine._thread.is_alive()
    assert (
        engine.stats().num_running == 0 and engine.stats().num_free_blocks == engine.stats().num_total_blocks
    )


def test_shutdown_ends_waiting_streams_and_later_calls_fail_clearly(model):
    from shoal.errors import EngineDeadError

    async def main():
        engine = shoal.AsyncLLM(model, kv_cache_memory=16 << 20)
        params = shoal.SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        stream = engine.generate(tokens(8, 1), params)
        await stream.__anext__()  # the request is running
        await engine.shutdown()
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError, match="not running"):
            async for _ in engine.generate(tokens(8, 2), params):
                pass

    asyncio.run(asyncio.wait_for(main(), timeout=60))


def test_started_and_final_reports_the_first_token_then_the_whole_answer(model, llm):
    """What the server asks for non-streaming requests: no deltas to join, and still a first-token signal."""
    from shoal.engine.request import OutputKind

    params = shoal.SamplingParams(temperature=0.8, seed=5, max_tokens=12, ignore_eos=True, n=2, logprobs=1)
    prompt = tokens(20, 3)

    async def main() -> list[shoal.RequestOutput]:
        engine = shoal.AsyncLLM(model, **OPTIONS)
        try:
            kind = OutputKind.STARTED_AND_FINAL
            return [out async for out in engine.generate(prompt, params, output_kind=kind)]
        finally:
            await engine.shutdown()

    started, final = asyncio.run(main())
    assert not started.finished and 1 <= len(started.outputs[0].token_ids) < 12
    assert final.finished
    reference = llm.generate([prompt], params, use_tqdm=False)[0]
    for ours, want in zip(final.outputs, reference.outputs, strict=True):
        assert (ours.text, ours.token_ids, ours.finish_reason) == (
            want.text,
            want.token_ids,
            want.finish_reason,
        )
        assert len(ours.logprobs) == 12
