"""Paged KV-cache blocks: allocation, reference counts, prefix caching, copy-on-write for forks."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from shoal.core.sequence import Sequence

InFlight = dict[int, tuple[int, tuple[int, ...]]]  # block hash -> (block id, its tokens)


@dataclass(eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and its KV computed
    tokens: tuple[int, ...] = ()


@dataclass
class BlockManager:
    """Owns num_blocks blocks of block_size tokens.

    Full, computed blocks are hashed (chained with the previous block's hash) so a later sequence with the
    same prefix reuses them. A freed block keeps its hash and KV until it is handed out again, least
    recently freed first, so cached prefixes outlive the requests that made them.
    """

    num_blocks: int
    block_size: int
    enable_prefix_caching: bool = True
    blocks: list[Block] = field(init=False)
    free: OrderedDict[int, None] = field(init=False)  # ref_count 0, oldest first
    cached: dict[int, int] = field(init=False)  # hash -> block id
    pending_copies: list[tuple[int, int]] = field(init=False)  # (src, dst) copy-on-write for the runner

    def __post_init__(self) -> None:
        self.blocks = [Block(i) for i in range(self.num_blocks)]
        self.free = OrderedDict.fromkeys(range(self.num_blocks))
        self.cached = {}
        self.pending_copies = []

    # -- accounting ---------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache -------------------------------------------------------------------------------
    def _chain_hash(self, parent: int | None, tokens: tuple[int, ...]) -> int:
        return hash((parent, tokens))

    def _block_hashes(self, token_ids: list[int], num_full: int) -> list[tuple[int, tuple[int, ...]]]:
        hashes, parent = [], None
        for i in range(num_full):
            tokens = tuple(token_ids[i * self.block_size : (i + 1) * self.block_size])
            parent = self._chain_hash(parent, tokens)
            hashes.append((parent, tokens))
        return hashes

    def match_prefix(self, seq: Sequence, in_flight: InFlight | None = None) -> int:
        """Give a fresh sequence the cached blocks of its longest cached prefix; returns tokens reused.

        in_flight: blocks that the step being scheduled fills (see filled_blocks); a sequence admitted in
        that step may share them too, as each layer writes every row's K/V before any row attends.
        At least one token is always left to compute, so the last position yields logits.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return 0  # prompt logprobs need every prompt position computed
        for h, tokens in self._block_hashes(seq.token_ids, (seq.num_tokens - 1) // self.block_size):
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].tokens != tokens:
                block_id, filled_tokens = (in_flight or {}).get(h, (None, ()))
                if block_id is None or filled_tokens != tokens:
                    break
            self._take(block_id)
            seq.block_table.append(block_id)
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        return seq.num_computed_tokens

    def filled_blocks(self, seq: Sequence, num_new_tokens: int) -> InFlight:
        """The blocks that computing seq's next num_new_tokens tokens fills, by hash (not yet in the cache)."""
        bs = self.block_size
        first, end = seq.num_computed_tokens // bs, (seq.num_computed_tokens + num_new_tokens) // bs
        if not self.enable_prefix_caching or end <= first:
            return {}
        parent = self.blocks[seq.block_table[first - 1]].hash if first else None
        if first and parent is None:
            return {}
        filled: InFlight = {}
        for i in range(first, end):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            parent = self._chain_hash(parent, tokens)
            filled[parent] = (seq.block_table[i], tokens)
        return filled

    def register_computed(self, seq: Sequence) -> None:
        """Hash the sequence's blocks that became full and computed."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        parent = None
        for i in range(num_full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is not None:
                parent = block.hash
                continue
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            block.hash = self._chain_hash(parent, tokens)
            block.tokens = tokens
            self.cached.setdefault(block.hash, block.block_id)
            parent = block.hash

    # -- allocation ---------------------------------------------------------------------------------
    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def _new_block(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]
        block.hash, block.tokens, block.ref_count = None, (), 1
        return block_id

    def _cow_needed(self, seq: Sequence) -> bool:
        """The next token lands in a partly filled block that other sequences share."""
        offset = seq.num_computed_tokens % self.block_size
        if offset == 0 or not seq.block_table:
            return False
        return self.blocks[seq.block_table[seq.num_computed_tokens // self.block_size]].ref_count > 1

    def blocks_to_grow(self, seq: Sequence, num_new_tokens: int) -> int:
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return max(needed, 0) + int(self._cow_needed(seq))

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_to_grow(seq, num_new_tokens) <= len(self.free)

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        """Make room for num_new_tokens more computed tokens (caller checked can_grow)."""
        if self._cow_needed(seq):
            index = seq.num_computed_tokens // self.block_size
            src = seq.block_table[index]
            dst = self._new_block()
            self.blocks[src].ref_count -= 1
            seq.block_table[index] = dst
            self.pending_copies.append((src, dst))
        while len(seq.block_table) < self.blocks_needed(seq.num_computed_tokens + num_new_tokens):
            seq.block_table.append(self._new_block())

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child shares every block of the parent; writes into a shared partial block copy it first."""
        for block_id in parent.block_table:
            self._take(block_id)
        child.block_table = list(parent.block_table)
        child.num_computed_tokens = parent.num_computed_tokens

    def free_seq(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Keep only the first num_tokens computed tokens (rewind)."""
        keep = self.blocks_needed(num_tokens)
        for block_id in seq.block_table[keep:]:
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = seq.block_table[:keep]
        seq.num_computed_tokens = min(seq.num_computed_tokens, num_tokens)
        if num_tokens % self.block_size and seq.block_table:
            self._unhash_if_private(seq.block_table[-1])

    def _unhash_if_private(self, block_id: int) -> None:
        """A cached block about to be overwritten by its only owner leaves the prefix cache."""
        block = self.blocks[block_id]
        if block.ref_count == 1 and block.hash is not None:
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash, block.tokens = None, ()

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies
