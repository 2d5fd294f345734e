"""Contexts, sequences and chat sessions on a tiny random model."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import shoal
from shoal.errors import InvalidRequestError, ShoalError
from shoal.executor import DisposedError
from shoal.sessions import ChatSession, Context, NoSequenceAvailableError

BLOCK = 16
OPTIONS = {"kv_cache_memory": 16 << 20, "block_size": BLOCK}
# A random model may emit any token; keeping special tokens out of its answers keeps them plain text.
TURN = {"max_tokens": 8, "min_tokens": 8, "stop_token_ids": [0, 1]}
QUESTIONS = [
    ["Hi there, how are you?", "And today?"],
    ["How much is 6+6?", "Why?"],
    ["Hello, world!", "Once more"],
]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_sequences_are_handed_out_and_given_back(model):
    ctx = shoal.Context(model, sequences=2, **OPTIONS)
    a, b = ctx.get_sequence(), ctx.get_sequence()
    assert ctx.sequences_left == 0
    with pytest.raises(NoSequenceAvailableError, match="all 2 sequences"):
        ctx.get_sequence()
    a.dispose()
    a.dispose()  # idempotent
    assert ctx.sequences_left == 1
    c = ctx.get_sequence()
    assert c.index == a.index
    with pytest.raises(DisposedError):
        ChatSession(a)
    with pytest.raises(DisposedError):
        asyncio.run(a.evaluate([5, 6], shoal.SamplingParams(max_tokens=2)))
    assert b is not c
    ctx.close()
    with pytest.raises(DisposedError):
        ctx.get_sequence()


async def chat(model, schedule: str, running: list[int] | None = None) -> list[list[str]]:
    """Every session's answers, asking turn by turn all together ('gather') or one session at a time.
    `running` collects how many requests each engine step advanced."""
    async with Context(model, sequences=len(QUESTIONS), **OPTIONS) as ctx:
        if running is not None:
            _step_turns_together(ctx, len(QUESTIONS), running)
        sessions = [
            ChatSession(ctx.get_sequence(), system_prompt=f"Agent {i}.") for i in range(len(QUESTIONS))
        ]
        if schedule == "gather":
            for turn in range(2):
                await asyncio.gather(
                    *(s.prompt(q[turn], **TURN) for s, q in zip(sessions, QUESTIONS, strict=True))
                )
        else:
            for s, q in zip(sessions, QUESTIONS, strict=True):
                for text in q:
                    await s.prompt(text, **TURN)
        return [[m["content"] for m in s.messages if m["role"] == "assistant"] for s in sessions]


def _step_turns_together(ctx: Context, parties: int, batch_sizes: list[int]) -> None:
    """Hold the engine at the start of each gathered turn until all its prompts are queued, and record
    how many requests each step advanced. Concurrent prompts are tokenized on worker threads: on a
    loaded machine one can reach the engine after another has finished, which is the thread scheduler's
    doing, not the batching this test checks."""
    engine = ctx.engine.engine
    step = engine.step
    deadline = time.monotonic() + 60
    gathering = True

    def step_together() -> list:
        nonlocal gathering
        if gathering and len(engine.requests) < parties and time.monotonic() < deadline:
            time.sleep(0.001)
            return []
        gathering = False
        outputs = step()
        batch_sizes.append(len(outputs))
        gathering = not engine.has_unfinished_requests()
        return outputs

    engine.step = step_together


def test_concurrent_sessions_answer_as_one_at_a_time(model):
    running: list[int] = []
    together = asyncio.run(chat(model, "gather", running))
    alone = asyncio.run(chat(model, "sequential"))
    assert together == alone
    # Every step advanced all the sessions: 2 turns of 8 tokens in 16 steps.
    assert running == [len(QUESTIONS)] * 2 * TURN["max_tokens"]
    assert all(len(answers) == 2 and all(answers) for answers in together)


def test_second_turn_computes_only_the_new_tokens(model):
    async def main():
        async with Context(model, **OPTIONS) as ctx:
            seq = ctx.get_sequence()
            session = ChatSession(seq, system_prompt="You are terse.")
            await session.prompt("Hi there, how are you?", **TURN)
            first = list(seq.token_ids)
            await session.prompt("How much is 6+6?", **TURN)
            second = session.last_turn
            again = list(seq.token_ids)
        async with Context(model, **OPTIONS) as fresh:  # the same tokens computed from scratch
            prompt = again[: second.num_prompt_tokens]
            recomputed = await fresh.get_sequence().evaluate(
                prompt, shoal.SamplingParams(temperature=0, **TURN)
            )
        return first, second, again, recomputed

    first, second, again, recomputed = asyncio.run(main())
    assert again[: len(first)] == first  # the history's exact tokens are kept
    new_tokens = second.num_prompt_tokens - len(first)
    assert 0 < new_tokens < 30
    # Every full block of computed history is found in the cache; the history's last token (just sampled)
    # and the rest of its partial block are computed again with the new tokens.
    assert second.num_cached_tokens == (len(first) - 1) // BLOCK * BLOCK
    assert second.num_computed_prompt_tokens == new_tokens + len(first) - second.num_cached_tokens
    assert second.num_computed_prompt_tokens < new_tokens + BLOCK
    assert recomputed.num_cached_tokens == 0 and recomputed.token_ids == second.token_ids


def test_on_token_streams_the_answer(model):
    chunks: list[str] = []
    async_chunks: list[str] = []

    async def record(text: str) -> None:
        async_chunks.append(text)

    async def main():
        async with Context(model, sequences=2, **OPTIONS) as ctx:
            a, b = ChatSession(ctx.get_sequence()), ChatSession(ctx.get_sequence())
            return await asyncio.gather(
                a.prompt("Hello", max_tokens=12, temperature=1.0, seed=3, on_token=chunks.append),
                b.prompt("Hello", max_tokens=12, temperature=1.0, seed=3, on_token=record),
            )

    x, y = asyncio.run(main())
    assert x == y == "".join(chunks) == "".join(async_chunks) and len(chunks) > 1


def test_sync_sessions(model):
    with Context(model, sequences=2, **OPTIONS) as ctx:
        sessions = [ChatSession(ctx.get_sequence(), system_prompt=f"Agent {i}.") for i in range(2)]
        answers: dict[int, str] = {}
        threads = [
            threading.Thread(
                target=lambda i=i: answers.__setitem__(i, sessions[i].prompt_sync(QUESTIONS[i][0], **TURN))
            )
            for i in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        second = sessions[0].prompt_sync(QUESTIONS[0][1], **TURN)
    want = asyncio.run(chat(model, "sequential"))
    assert ctx.closed and [answers[0], second] == want[0] and answers[1] == want[1][0]


def test_cancel_keeps_history_and_close_aborts(model):
    async def main():
        ctx = Context(model, sequences=2, **OPTIONS)
        session = ChatSession(ctx.get_sequence())
        await session.prompt("Hello", **TURN)
        history, messages = list(session.sequence.token_ids), list(session.messages)
        started = asyncio.Event()
        task = asyncio.create_task(session.prompt("Go on", max_tokens=200, on_token=lambda _: started.set()))
        await started.wait()
        with pytest.raises(ShoalError, match="already generating"):
            await session.sequence.evaluate([5], shoal.SamplingParams())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert session.sequence.token_ids == history and session.messages == messages
        await session.prompt("Go on", **TURN)  # usable after a cancel
        other = ChatSession(ctx.get_sequence())
        pending = asyncio.create_task(other.prompt("Hello", max_tokens=200, on_token=lambda _: started.set()))
        started.clear()
        await started.wait()
        await ctx.aclose()
        with pytest.raises(ShoalError, match="aborted"):
            await pending
        with pytest.raises(DisposedError):
            await session.prompt("Hi")

    asyncio.run(main())


def test_a_full_context_drops_the_oldest_exchanges_and_keeps_the_system_prompt(model):
    with Context(model, sequences=2, max_model_len=120, **OPTIONS) as ctx:
        session = ChatSession(ctx.get_sequence(), system_prompt="Agent 0.")
        for turn in range(12):
            before = session.num_shifted_messages
            answer = session.prompt_sync(f"Question number {turn}?", **TURN)
            assert len(session.sequence.token_ids) <= ctx.context_size
            if session.num_shifted_messages > before:
                break
        assert session.num_shifted_messages >= 2 and turn > 1
        assert session.messages[0] == {"role": "system", "content": "Agent 0."}
        assert session.messages[-2]["content"] == f"Question number {turn}?"
        assert "Question number 0?" not in [m["content"] for m in session.messages]
        # The shifted turn answers as a fresh session holding the same (shortened) conversation.
        fresh = ChatSession(ctx.get_sequence())
        fresh.messages = session.messages[:-2]
        assert fresh.prompt_sync(f"Question number {turn}?", **TURN) == answer
        with pytest.raises(shoal.InvalidRequestError, match="max_tokens"):  # no room even after shifting
            session.prompt_sync("One more?", max_tokens=500)


def test_a_session_message_that_is_not_valid_unicode_is_refused_clearly(model):
    async def ask() -> None:
        async with Context(model, kv_cache_memory=8 << 20) as context:
            with pytest.raises(InvalidRequestError, match="lone surrogate"):
                await ChatSession(context.get_sequence()).prompt("bad \ud800", max_tokens=2)

    asyncio.run(ask())
