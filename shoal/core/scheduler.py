"""Continuous batching: each step spends a token budget over running sequences, then waiting ones.

There are no prefill and decode phases: a sequence is scheduled for min(pending tokens, budget left),
so long prompts are chunked and decodes ride along. When blocks run out, the lowest-priority, newest
running sequence is preempted (blocks freed, recomputed later) instead of failing.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from shoal.core.block_manager import BlockManager, InFlight
from shoal.core.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]]  # (sequence, tokens to compute this step)
    copies: list[tuple[int, int]]  # copy-on-write (src block, dst block) before the forward pass
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class Scheduler:
    block_manager: BlockManager
    max_num_batched_tokens: int
    max_num_seqs: int
    waiting: list[Sequence] = field(default_factory=list)  # sorted by (priority, arrival)
    running: list[Sequence] = field(default_factory=list)
    num_preemptions: int = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=Sequence.sort_key)

    def add_running(self, seq: Sequence) -> None:
        """A sequence that already holds blocks (a fork) joins the running set directly."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting) or any(s.num_pending_tokens for s in self.running)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free_seq(seq)
        seq.status = SequenceStatus.FINISHED

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []
        self.running.sort(key=Sequence.sort_key)
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status != SequenceStatus.RUNNING or seq.num_pending_tokens == 0:
                continue
            n = min(seq.num_pending_tokens, budget)
            if not self._make_room(seq, n, preempted):
                continue
            self.block_manager.grow(seq, n)
            scheduled.append((seq, n))
            budget -= n
        if not preempted:
            budget = self._admit(budget, scheduled)
        return SchedulerOutput(scheduled, self.block_manager.take_copies(), preempted)

    def _make_room(self, seq: Sequence, n: int, preempted: list[Sequence]) -> bool:
        """Preempt from the back of the running list until seq can grow; False if seq itself went."""
        while not self.block_manager.can_grow(seq, n):
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _admit(self, budget: int, scheduled: list[tuple[Sequence, int]]) -> int:
        """Admit waiting sequences in order while budget, sequence slots and blocks allow.

        A sequence may share the prefix blocks that sequences scheduled before it fill in this same step
        (many requests sent at once with one system prompt compute it once)."""
        bm = self.block_manager
        in_flight: InFlight = {}
        if self.waiting:
            for seq, n in scheduled:
                in_flight.update(bm.filled_blocks(seq, n))
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cached = bm.match_prefix(seq, in_flight)
            if seq.num_preemptions == 0 and seq.num_output_tokens == 0:
                seq.num_cached_tokens = cached
            n = min(seq.num_pending_tokens, budget)
            if not bm.can_grow(seq, n):
                bm.free_seq(seq)
                break
            bm.grow(seq, n)
            in_flight.update(bm.filled_blocks(seq, n))
            self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n
        return budget

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free_seq(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)
