"""The scheduler alone, driven with a fake model step: budgets, chunking, caps, priorities, preemption."""

from shoal.core.block_manager import BlockManager
from shoal.core.scheduler import Scheduler
from shoal.core.sequence import Sequence
from shoal.sampling_params import SamplingParams


def make(num_blocks=64, block_size=4, budget=16, max_seqs=8) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size), budget, max_seqs)


def seq(name, prompt_len, priority=0, max_tokens=4, first_token=None) -> Sequence:
    """Distinct prompts per name unless first_token is given (no accidental prefix-cache hits)."""
    start = first_token if first_token is not None else 1000 * (sum(map(ord, name)) % 97)
    tokens = list(range(start, start + prompt_len))
    return Sequence(name, tokens, prompt_len, SamplingParams(max_tokens=max_tokens), priority)


def fake_step(sched: Scheduler) -> dict[str, int]:
    """Schedule, 'compute', append a token to every sequence that finished its pending tokens; finish at max_tokens."""
    plan = sched.schedule()
    for s, n in plan.scheduled:
        s.num_computed_tokens += n
        sched.block_manager.register_computed(s)
        if s.num_computed_tokens == s.num_tokens:
            s.token_ids.append(7)
            if s.num_output_tokens >= s.params.max_tokens:
                sched.remove(s)
    return {s.seq_id: n for s, n in plan.scheduled}


def test_budget_is_spent_on_decodes_first_then_prefill_chunks():
    sched = make(budget=16)
    a = seq("a", 10)
    sched.add(a)
    assert fake_step(sched) == {"a": 10}
    b = seq("b", 40)
    sched.add(b)
    assert fake_step(sched) == {"a": 1, "b": 15}  # a decodes, b's long prompt is chunked
    assert fake_step(sched) == {"a": 1, "b": 15}
    assert fake_step(sched) == {"a": 1, "b": 10}


def test_max_num_seqs_caps_running_and_new_requests_join_when_others_finish():
    sched = make(budget=64, max_seqs=2)
    for name in "abc":
        sched.add(seq(name, 3, max_tokens=2))
    assert set(fake_step(sched)) == {"a", "b"}
    assert set(fake_step(sched)) == {"a", "b"}  # both finish here
    assert set(fake_step(sched)) == {"c"}


def test_priority_orders_admission_and_fcfs_within_a_level():
    sched = make(budget=4, max_seqs=8)
    sched.add(seq("late-low", 4, priority=5))
    sched.add(seq("first", 4, priority=0))
    sched.add(seq("second", 4, priority=0))
    assert fake_step(sched) == {"first": 4}
    assert fake_step(sched) == {"first": 1, "second": 3}


def test_preempts_the_lowest_priority_newest_when_blocks_run_out_and_everyone_finishes():
    sched = make(num_blocks=6, block_size=4, budget=64, max_seqs=8)
    seqs = [
        seq("hi", 6, priority=0, max_tokens=10),
        seq("old", 6, priority=1, max_tokens=10),
        seq("new", 6, priority=1, max_tokens=10),
    ]
    for s in seqs:
        sched.add(s)
    preempted = []
    for _ in range(200):
        if not sched.has_work():
            break
        plan_before = {s.seq_id for s in sched.running}
        fake_step(sched)
        preempted += [
            name
            for name in plan_before
            if name not in {s.seq_id for s in sched.running}
            and not next(s for s in seqs if s.seq_id == name).is_finished
        ]
    assert all(s.is_finished and s.num_output_tokens == 10 for s in seqs)
    assert sched.num_preemptions > 0
    assert preempted[0] == "new"
    assert "hi" not in preempted
    assert sched.block_manager.num_free_blocks == 6


def test_prefix_cache_hit_skips_cached_prompt_tokens():
    sched = make(budget=64)
    a = seq("a", 9, max_tokens=1, first_token=1)
    sched.add(a)
    fake_step(sched)
    b = seq("b", 9, first_token=1)
    sched.add(b)
    assert fake_step(sched) == {"b": 1}  # 8 of 9 prompt tokens were cached
    assert b.num_cached_tokens == 8
