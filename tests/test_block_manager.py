"""The block manager alone: allocation, reference counts, prefix caching, forks with copy-on-write."""

from shoal.core.block_manager import BlockManager
from shoal.core.sequence import Sequence
from shoal.sampling_params import SamplingParams


def seq(tokens, name="s") -> Sequence:
    return Sequence(name, list(tokens), len(tokens), SamplingParams())


def compute(bm: BlockManager, s: Sequence, n: int) -> None:
    assert bm.can_grow(s, n)
    bm.grow(s, n)
    s.num_computed_tokens += n
    bm.register_computed(s)


def test_allocates_blocks_as_tokens_grow_and_frees_them():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq(range(10))
    compute(bm, s, 6)
    assert len(s.block_table) == 2 and bm.num_free_blocks == 6
    compute(bm, s, 4)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5
    bm.free_seq(s)
    assert bm.num_free_blocks == 8 and s.block_table == [] and s.num_computed_tokens == 0


def test_cannot_grow_past_the_pool():
    bm = BlockManager(num_blocks=2, block_size=4)
    s = seq(range(12))
    assert bm.can_grow(s, 8) and not bm.can_grow(s, 9)


def test_prefix_cache_shares_full_blocks_and_leaves_a_token_to_compute():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "a")
    compute(bm, a, 9)
    b = seq([1, 2, 3, 4, 5, 6, 7, 8, 42, 43], "b")
    assert bm.match_prefix(b) == 8
    assert b.block_table == a.block_table[:2]
    assert all(bm.blocks[i].ref_count == 2 for i in b.block_table)
    same = seq([1, 2, 3, 4, 5, 6, 7, 8], "same")  # fully cached prompt still computes its last token
    assert bm.match_prefix(same) == 4


def test_prefix_cache_misses_on_a_different_earlier_block():
    bm = BlockManager(num_blocks=16, block_size=4)
    compute(bm, seq([1, 2, 3, 4, 5, 6, 7, 8, 9]), 9)
    other = seq([0, 2, 3, 4, 5, 6, 7, 8, 9])
    assert bm.match_prefix(other) == 0


def test_freed_blocks_stay_cached_until_reused():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq([1, 2, 3, 4, 5], "a")
    compute(bm, a, 5)
    bm.free_seq(a)
    b = seq([1, 2, 3, 4, 9], "b")
    assert bm.match_prefix(b) == 4
    bm.free_seq(b)
    filler = seq(range(100, 116), "filler")  # takes every block: the cached one is evicted
    compute(bm, filler, 16)
    bm.free_seq(filler)
    assert bm.match_prefix(seq([1, 2, 3, 4, 9])) == 0


def test_disabled_prefix_cache_never_matches():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    compute(bm, seq([1, 2, 3, 4, 5]), 5)
    assert bm.match_prefix(seq([1, 2, 3, 4, 5])) == 0


def test_fork_shares_blocks_and_copies_a_shared_partial_block_on_write():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = seq([1, 2, 3, 4, 5, 6], "p")
    compute(bm, parent, 6)
    child = seq(parent.token_ids, "c")
    bm.fork(parent, child)
    assert child.block_table == parent.block_table
    assert [bm.blocks[i].ref_count for i in parent.block_table] == [2, 2]
    assert bm.num_free_blocks == 6
    child.token_ids.append(7)
    shared_partial = child.block_table[1]
    compute(bm, child, 1)
    assert child.block_table[0] == parent.block_table[0]
    assert child.block_table[1] != shared_partial
    assert bm.take_copies() == [(shared_partial, child.block_table[1])]
    assert bm.blocks[shared_partial].ref_count == 1


def test_truncate_releases_blocks_and_uncaches_a_block_to_be_rewritten():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq(range(12))
    compute(bm, s, 12)
    bm.truncate(s, 6)
    assert len(s.block_table) == 2 and s.num_computed_tokens == 6 and bm.num_free_blocks == 6
    assert bm.blocks[s.block_table[1]].hash is None
