"""executor/kv_cache.py on its own: in-place batch rows, the prefix cache's tree and LRU, the memory plan."""

import pytest
import torch

from executor.kv_cache import BatchKV, LayerShape, PrefixCache, margin_for, parse_memory_size, plan_kv_memory
from executor.kv_pool import KVPool

SHAPES = [LayerShape(kv_heads=2, key_dim=3, value_dim=3, dtype=torch.float32)] * 2
CPU = torch.device("cpu")


def row_tokens(seed: int, length: int) -> list:
    """Per layer (keys, values) of [kv_heads, length, dim] whose values say which row and token they are."""
    base = torch.arange(length, dtype=torch.float32).view(1, length, 1).expand(2, length, 3)
    return [(base + 1000 * seed + 100_000 * layer, -(base + 1000 * seed + 100_000 * layer)) for layer in range(2)]


def row_contents(batch: BatchKV, row: int) -> torch.Tensor:
    keys, _ = batch.row_kv(row, 0, batch.lengths[row])[0]
    return keys[0, :, 0]


def step(batch: BatchKV, values: list) -> torch.Tensor:
    """One decode step through the cache's own update path: each row's new key is its value in ``values``."""
    mask = batch.start_step(1)
    states = torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 2, 1, 3)
    for index, layer in enumerate(batch.layers):
        keys, _ = batch.update(states + 100_000 * index, -states, index)
        assert keys.shape[2] == mask.shape[1]
    batch.end_step(1)
    return mask


def test_rows_are_right_aligned_and_a_step_writes_in_place_without_copying_the_cache():
    batch = BatchKV(SHAPES, max_rows=4, columns=64, device=CPU)
    storage = batch.layers[0].keys.data_ptr()
    batch.add_row(row_tokens(1, 5), 5)
    batch.add_row(row_tokens(2, 3), 3)
    mask = step(batch, [7.0, 8.0])
    assert mask.tolist() == [[1] * 6, [0, 0, 1, 1, 1, 1]]
    assert batch.layers[0].keys.data_ptr() == storage
    keys, _ = batch.update(torch.zeros(2, 2, 1, 3), torch.zeros(2, 2, 1, 3), 0)
    assert keys.data_ptr() == storage, "attention reads a view of the storage, not a copy"
    assert row_contents(batch, 0).tolist() == [1000, 1001, 1002, 1003, 1004, 7]
    assert row_contents(batch, 1).tolist() == [2000, 2001, 2002, 8]


def test_a_longer_row_joining_moves_the_live_columns_not_the_storage():
    batch = BatchKV(SHAPES, max_rows=4, columns=64, device=CPU)
    batch.add_row(row_tokens(1, 3), 3)
    step(batch, [9.0])
    batch.add_row(row_tokens(2, 10), 10)
    assert batch.column == 10
    assert row_contents(batch, 0).tolist() == [1000, 1001, 1002, 9]
    assert row_contents(batch, 1).tolist() == [2000 + i for i in range(10)]
    assert batch.mask[:2, :10].sum(dim=1).tolist() == [4, 10]


def test_a_leaving_row_is_replaced_by_the_last_one_and_the_order_is_reported():
    batch = BatchKV(SHAPES, max_rows=4, columns=64, device=CPU)
    for seed, length in ((1, 4), (2, 6), (3, 2)):
        batch.add_row(row_tokens(seed, length), length)
    order = batch.remove_rows([0])
    assert order == [2, 1]
    assert row_contents(batch, 0).tolist() == [3000, 3001]
    assert row_contents(batch, 1).tolist() == [2000 + i for i in range(6)]
    assert batch.remove_rows([0, 1]) == [] and batch.rows == 0 and batch.column == 0


def test_reaching_the_end_of_the_storage_moves_the_live_tokens_back_and_keeps_them():
    batch = BatchKV(SHAPES, max_rows=2, columns=16, device=CPU)
    expected = [[1000 + i for i in range(4)], [2000, 2001]]  # what each row must hold, in row order
    batch.add_row(row_tokens(1, 4), 4)
    batch.add_row(row_tokens(2, 2), 2)
    for value in range(100, 160):
        step(batch, [float(value), float(value)])
        for tokens in expected:
            tokens.append(value)
        for row in range(2):
            assert row_contents(batch, row).tolist() == expected[row]
        if len(expected[0]) >= 10:  # the older row leaves and a new one joins, as requests come and go
            assert batch.remove_rows([0]) == [1]
            expected = [expected[1], [3000, 3001, 3002]]
            batch.add_row(row_tokens(3, 3), 3)
        assert batch.column <= batch.columns
    assert batch.moves > 0, "the write column reached the end of the storage"


def test_prompts_are_prefilled_in_free_rows_of_the_same_storage_and_join_without_losing_anyone():
    batch = BatchKV(SHAPES, max_rows=3, columns=64, device=CPU)
    batch.add_row(row_tokens(1, 4), 4)
    first, second = batch.stage(), batch.stage()
    assert {first.row, second.row} == {1, 2}, "prefilled inside the budget: rows of the batch's own storage"
    low = first if first.row == 1 else second
    high = second if low is first else first
    high.write([(k[:, :5], v[:, :5]) for k, v in row_tokens(2, 5)], 0)
    low.write([(k[:, :3], v[:, :3]) for k, v in row_tokens(3, 3)], 0)
    assert batch.join(high, 5) == 1, "the next running row is the one the other prompt is prefilled in"
    assert row_contents(batch, 1).tolist() == [2000 + i for i in range(5)]
    assert low.row == 2 and low.tokens(0, 3)[0][0][0, :, 0].tolist() == [3000, 3001, 3002], "it moved, intact"
    assert batch.join(low, 3) == 2
    assert row_contents(batch, 2).tolist() == [3000, 3001, 3002]
    assert row_contents(batch, 0).tolist() == [1000, 1001, 1002, 1003]
    with pytest.raises(RuntimeError, match="no free row"):
        batch.stage()
    batch.remove_rows([1])
    batch.unstage(batch.stage())
    assert batch.stage().row == 2, "an unstaged row is free again"


# Keys and values of one token in SHAPES: 2 layers x 2 kv_heads x (3 key + 3 value dims) x 4 bytes (float32).
TOKEN = 2 * 2 * (3 + 3) * 4


def copied(batch: BatchKV) -> dict:
    """The byte counters, in tokens' worth (exact: every count is a whole number of tokens)."""
    assert all(value % TOKEN == 0 for value in batch.copied_bytes.values()), batch.copied_bytes
    return {cause: value // TOKEN for cause, value in batch.copied_bytes.items()}


def test_copy_counters_a_join_into_an_empty_batch_copies_its_own_tokens_only():
    batch = BatchKV(SHAPES, max_rows=4, columns=64, device=CPU)
    assert batch.token_bytes == TOKEN == 96
    batch.add_row(row_tokens(1, 5), 5)
    assert batch.copied_bytes == {"join": 5 * 96, "staged": 0, "leave": 0, "move": 0, "resize": 0, "hit": 0}
    batch.add_row(row_tokens(2, 3), 3)  # shorter than the write column: no move
    assert batch.copied_bytes == {"join": 8 * 96, "staged": 0, "leave": 0, "move": 0, "resize": 0, "hit": 0}
    step(batch, [7.0, 8.0])  # a decode step copies nothing already cached
    assert batch.copied_bytes["join"] == 768 and sum(batch.copied_bytes.values()) == 768
    assert (batch.joins, batch.leaves, batch.moves, batch.step_moves) == (2, 0, 0, 0)
    assert batch.copy_stats() == {"copied_bytes": {"join": 768, "staged": 0, "leave": 0, "move": 0, "resize": 0, "hit": 0}, "joins": 2,
                                  "leaves": 0, "moves": 0, "step_moves": 0, "join_moved_bytes": 0, "token_bytes": 96}


def test_copy_counters_a_longer_row_joining_pays_for_moving_every_running_row():
    batch = BatchKV(SHAPES, max_rows=4, columns=64, device=CPU)
    batch.add_row(row_tokens(1, 3), 3)
    step(batch, [9.0])
    batch.add_row(row_tokens(2, 4), 4)  # as long as the write column: no move
    assert copied(batch) == {"join": 3 + 4, "staged": 0, "leave": 0, "move": 0, "resize": 0, "hit": 0} and batch.moves == 0
    batch.add_row(row_tokens(3, 10), 10)  # the live columns (2 rows x 4 tokens) move right first
    assert copied(batch) == {"join": 3 + 4 + 2 * 4 + 10, "staged": 0, "leave": 0, "move": 0, "resize": 0, "hit": 0}
    assert batch.copied_bytes["join"] == 25 * 96 == 2400 and batch.join_moved_bytes == 2 * 4 * 96
    assert (batch.joins, batch.moves, batch.step_moves) == (3, 1, 0), "a move forced by a join is no step move"


def test_copy_counters_a_leave_copies_the_last_row_up_to_the_write_column_the_last_row_nothing():
    batch = BatchKV(SHAPES, max_rows=4, columns=64, device=CPU)
    for seed, length in ((1, 4), (2, 6), (3, 2)):
        batch.add_row(row_tokens(seed, length), length)
    assert copied(batch) == {"join": 4 + 1 * 4 + 6 + 2, "staged": 0, "leave": 0, "move": 0, "resize": 0, "hit": 0}
    assert batch.column == 6
    batch.remove_rows([0])  # the 2-token last row fills the hole: copied up to column 6, padding included
    assert copied(batch)["leave"] == 6 and batch.copied_bytes["leave"] == 576
    batch.remove_rows([0, 1])  # 1 is the last row, then 0 is: nothing to move
    assert copied(batch) == {"join": 16, "staged": 0, "leave": 6, "move": 0, "resize": 0, "hit": 0}
    assert (batch.joins, batch.leaves) == (3, 3)


def test_copy_counters_compaction_and_the_end_of_the_storage_are_step_moves_of_every_row():
    batch = BatchKV(SHAPES, max_rows=4, columns=64, device=CPU)
    batch.add_row(row_tokens(1, 30), 30)
    batch.add_row(row_tokens(2, 4), 4)
    batch.add_row(row_tokens(3, 6), 6)
    batch.remove_rows([0])  # the longest row leaves: row 2 (6 tokens) is copied up to column 30
    assert copied(batch) == {"join": 40, "staged": 0, "leave": 30, "move": 0, "resize": 0, "hit": 0}
    step(batch, [1.0, 2.0])  # 24 leading columns > max(16, 6 // 4): compaction, 2 rows x 6 live tokens
    assert copied(batch) == {"join": 40, "staged": 0, "leave": 30, "move": 2 * 6, "resize": 0, "hit": 0}
    assert batch.column == 7 and (batch.moves, batch.step_moves) == (1, 1)

    end = BatchKV(SHAPES, max_rows=2, columns=16, device=CPU)
    end.add_row(row_tokens(1, 6), 6)
    end.add_row(row_tokens(2, 2), 2)
    for value in range(10):
        step(end, [float(value)] * 2)
    assert end.column == 16 and end.lengths[:2] == [16, 12] and end.copied_bytes["move"] == 0
    end.remove_rows([0])  # row 1 (12 tokens) fills the hole: 16 columns; 4 leading columns stay
    step(end, [5.0])  # the write column is at the end of the storage: 1 row x 12 live tokens move back
    assert copied(end) == {"join": 8, "staged": 0, "leave": 16, "move": 12, "resize": 0, "hit": 0}
    assert end.column == 13 and (end.moves, end.step_moves) == (1, 1)


def test_copy_counters_a_join_into_the_row_of_a_prompt_being_prefilled_moves_that_prompt():
    batch = BatchKV(SHAPES, max_rows=3, columns=64, device=CPU)
    batch.add_row(row_tokens(1, 4), 4)
    low, high = batch.stage(), batch.stage()  # the lowest free row first
    assert (high.row, low.row) == (2, 1)
    high.write([(k[:, :5], v[:, :5]) for k, v in row_tokens(2, 5)], 0)
    low.write([(k[:, :3], v[:, :3]) for k, v in row_tokens(3, 3)], 0)
    assert copied(batch) == {"join": 4, "staged": 0, "leave": 0, "move": 0, "resize": 0, "hit": 0}, "prefilling in place is no copy"
    batch.join(high, 5)
    # Row 1 is low's: high's 5 tokens go to a temporary, low's 3 move to row 2, the running row (4 tokens)
    # moves right for the longer one, then high's 5 tokens land in row 1.
    assert copied(batch) == {"join": 4 + 5 + 4 + 5, "staged": 3, "leave": 0, "move": 0, "resize": 0, "hit": 0}
    batch.join(low, 3)  # row 2 is its own: a temporary again, then its 3 tokens
    assert copied(batch) == {"join": 18 + 3 + 3, "staged": 3, "leave": 0, "move": 0, "resize": 0, "hit": 0}
    assert batch.copied_bytes == {"join": 2304, "staged": 288, "leave": 0, "move": 0, "resize": 0, "hit": 0}
    assert batch.join_moved_bytes == 4 * 96
    assert (batch.joins, batch.moves) == (3, 1)


def test_prefix_cache_finds_the_longest_cached_whole_blocks_behind_the_same_tokens():
    cache = PrefixCache(SHAPES, blocks=8, block_size=4, device=CPU)
    tokens = list(range(100, 110))  # two whole blocks and a part

    def source(start, end):
        return [(k[:, start:end], v[:, start:end]) for k, v in row_tokens(5, 10)]

    assert cache.insert(tokens, len(tokens), source) == 2
    assert len(cache.match(tokens + [1, 2, 3], limit=13)) == 2
    assert len(cache.match(tokens, limit=7)) == 1, "a hit never covers the token whose logits are needed"
    assert cache.match([100, 101, 102, 999] + tokens[4:], limit=10) == [], "a block is found only behind its parent"
    path = cache.match(tokens[:6] + [7, 7], limit=8)
    assert len(path) == 1
    batch = BatchKV(SHAPES, max_rows=1, columns=16, device=CPU)
    staged = batch.stage()
    cache.read_into(cache.match(tokens, 10), 0, staged)
    assert staged.filled == 8
    keys, values = staged.tokens(0, 8)[1]
    assert keys[0, :, 0].tolist() == [5000 + 100_000 + i for i in range(8)]
    assert torch.equal(values, -keys)
    assert cache.insert(tokens, len(tokens), source) == 0, "blocks already cached are not written again"


def test_prefix_cache_evicts_the_least_recently_used_leaf_first_and_never_the_path_it_extends():
    cache = PrefixCache(SHAPES, blocks=3, block_size=2, device=CPU)

    def source(start, end):
        return [(k[:, start:end], v[:, start:end]) for k, v in row_tokens(0, 8)]

    cache.insert([1, 2, 3, 4], 4, source)  # blocks (1,2) -> (3,4)
    cache.insert([9, 9], 2, source)  # block (9,9)
    cache.match([1, 2, 3, 4, 0], 5)  # (1,2,3,4) used more recently than (9,9)
    cache.insert([1, 2, 5, 6], 4, source)  # needs a block: (9,9) is the LRU leaf
    assert cache.evictions == 1
    assert cache.match([9, 9, 0], 3) == []
    assert len(cache.match([1, 2, 3, 4, 0], 5)) == 2
    assert len(cache.match([1, 2, 5, 6, 0], 5)) == 2
    cache.insert([1, 2, 7, 8, 9, 9], 6, source)  # the path's own parent (1,2) is never evicted
    assert len(cache.match([1, 2, 0], 3)) == 1
    assert len(cache) == 3


def test_prefix_cache_never_evicts_the_leaf_it_is_extending():
    cache = PrefixCache(SHAPES, blocks=2, block_size=2, device=CPU)

    def source(start, end):
        return [(k[:, start:end], v[:, start:end]) for k, v in row_tokens(0, 8)]

    cache.insert([1, 2, 3, 4], 4, source)  # (1,2) -> (3,4): the cache is full, (3,4) is its only leaf
    assert cache.insert([1, 2, 3, 4, 5, 6], 6, source) == 0, "no room without evicting its own path"
    assert len(cache.match([1, 2, 3, 4, 0], 5)) == 2
    assert cache.evictions == 0


@pytest.mark.parametrize("text, expected", [
    ("auto", None), ("0.5", 0.5), ("1", 1.0), ("4GiB", 4 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000),
    ("2000000", 2_000_000), (" 64 kib ", 64 * 1024),
])
def test_memory_sizes(text, expected):
    assert parse_memory_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "-1GiB", "0", "1.5x", "0GiB", ""])
def test_bad_memory_sizes_name_the_setting_and_the_accepted_forms(text):
    with pytest.raises(ValueError, match="kv_cache_memory"):
        parse_memory_size(text)


def test_the_plan_is_one_pool_that_holds_at_least_one_row_of_the_longest_request():
    columns = 1000 + margin_for(1000)
    plan = plan_kv_memory(10 * columns * 100, bytes_per_token=100, max_rows=4, max_context=1000, device=CPU)
    assert (plan.rows, plan.columns, plan.max_context) == (4, columns, 1000)
    assert plan.pool_tokens == 10 * columns // 16 * 16, "the whole budget, in whole blocks"
    small = plan_kv_memory(2 * columns * 100 + 50, bytes_per_token=100, max_rows=4, max_context=1000, device=CPU)
    assert small.rows == 4 and small.max_context == 1000, "rows hold the tokens they have: all four may run"
    tiny = plan_kv_memory(300 * 100, bytes_per_token=100, max_rows=4, max_context=1000, device=CPU)
    assert tiny.max_context < 300 <= tiny.pool_tokens + 16, "too small for one full row: shorter requests"
    assert plan.pool_bytes <= plan.budget and tiny.pool_bytes <= tiny.budget
    assert f"{plan.pool_tokens} tokens in blocks of 16" in plan.describe()


# ---- one pool for the batch and the prefix cache (kv_pool.py) ------------------------------------------
def pooled(tokens: int, max_rows: int = 4, columns: int = 8, max_columns: int = 64):
    pool = KVPool(SHAPES, tokens, block_size=4, device=CPU)
    return pool, BatchKV(SHAPES, max_rows, columns, CPU, pool, max_columns=max_columns), \
        PrefixCache(SHAPES, 0, 4, CPU, pool)


def block_source(seed: int, length: int):
    return lambda start, end: [(k[:, start:end], v[:, start:end]) for k, v in row_tokens(seed, length)]


def test_rows_hold_blocks_as_their_tokens_arrive_and_give_them_back_when_they_leave():
    pool, batch, cache = pooled(tokens=64)
    assert pool.batch_blocks == 0 and cache.capacity == 16, "an idle batch holds nothing: all for the cache"
    batch.add_row(row_tokens(1, 5), 5)
    assert (batch.columns, pool.batch_blocks) == (8, 2), "one row of 8 columns: 2 blocks of 4"
    values = list(range(20))
    for value in values:  # the row grows past its 8 columns: it gets longer, its tokens stay
        step(batch, [value])
    assert batch.columns >= 26 and pool.batch_blocks == -(-batch.columns // 4) and batch.resizes >= 1
    assert row_contents(batch, 0).tolist() == [1000 + i for i in range(5)] + values
    batch.remove_rows([0])
    assert pool.batch_blocks == 0 and batch.columns == 8, "an empty batch gives every block back"


def test_a_growing_batch_moves_cached_blocks_out_of_its_way_and_evicts_only_when_the_pool_is_full():
    pool, batch, cache = pooled(tokens=32)  # 8 blocks of 4
    for number in range(4):
        cache.insert([10 * number + i for i in range(4)], 4, block_source(number, 4))
    assert sorted(cache._by_index) == [4, 5, 6, 7], "cached blocks take the highest blocks first"
    batch.add_row(row_tokens(9, 5), 5)
    batch.add_row(row_tokens(8, 3), 3)  # 2 rows x 8 columns: blocks 0-3
    assert pool.batch_blocks == 4 and cache.relocations == 0 and cache.evictions == 0
    batch.add_row(row_tokens(7, 4), 4)  # a third row: blocks 4-5 were cached, nowhere to go but away
    assert pool.batch_blocks == 6 and cache.evictions == 2 and len(cache) == 2
    for number in range(4):  # what is left is intact, wherever it is now
        path = cache.match([10 * number + i for i in range(4)] + [0], 5)
        if path:
            keys, _ = cache.block_views[1]
            assert keys[path[0].index][0, :, 0].tolist() == [1000 * number + 100_000 + i for i in range(4)]
    assert row_contents(batch, 2).tolist() == [7000 + i for i in range(4)]
    assert not pool.claim_for_batch(33) and pool.batch_blocks == 6, "never more than the pool"


def test_cached_blocks_move_up_when_there_is_room_instead_of_being_evicted():
    pool, batch, cache = pooled(tokens=64)  # 16 blocks
    for number in range(3):  # three one-block chains: blocks 15, 14, 13
        cache.insert([number] * 4, 4, block_source(number, 4))
    cache._evict(cache.match([0] * 4 + [9], 5)[0])  # block 15 is free again
    cache.vacate_below(14)  # as a batch of 14 blocks would: block 13 is in its way, block 15 is free
    assert (cache.relocations, cache.evictions) == (1, 1)
    path = cache.match([2] * 4 + [9], 5)
    assert [node.index for node in path] == [15]
    cache.vacate_below(0)
    staged = batch.stage(4)
    cache.read_into(path, 0, staged)
    keys, values = staged.tokens(0, 4)[0]
    assert keys[0, :, 0].tolist() == [2000 + i for i in range(4)] and torch.equal(values, -keys)


def test_admission_and_step_room_count_the_pool_s_tokens():
    pool, batch, cache = pooled(tokens=32, max_rows=8)
    assert batch.room_for_row(20) and not batch.room_for_row(40), "longer than the pool"
    batch.add_row(row_tokens(1, 12), 12)
    assert batch.room_for_row(12) and not batch.room_for_row(16), "2 rows of 17 columns pass 32 tokens"
    for value in range(2):
        assert batch.room_for_step(1)
        step(batch, [value])
    assert batch.held(0) == 14 and batch.room_for_row(4) and not batch.room_for_row(16)
    batch.add_row(row_tokens(2, 4), 4)  # two rows of 15 columns: the first row's 32 columns shrink
    assert batch.columns * 2 <= pool.tokens and row_contents(batch, 0).tolist()[-2:] == [0, 1]
    while batch.room_for_step(1):
        step(batch, [0, 0])
    assert batch.owned_rows() * (batch._live_width() + 1) > pool.tokens, "out of room only when it is"


def test_a_spilled_row_reads_its_head_from_the_cache_and_keeps_its_later_tokens_around_its_holes():
    """``spill``: a row's first blocks (here 8 tokens, cached) are read in place from then on; its columns up to
    them are masked, the holes of rejected drafts among them leave its count, and what follows stays exact."""
    pool, batch, cache = pooled(tokens=128, columns=32)
    batch.add_row(row_tokens(1, 6), 6)
    batch.add_row(row_tokens(2, 2), 2)
    batch.start_step(3)
    states = torch.tensor([[6.0, 7.0, 8.0], [2.0, 3.0, 4.0]]).view(2, 1, 3, 1).expand(2, 2, 3, 3)
    for index in range(len(batch.layers)):
        batch.update(states + 1000 + 100_000 * index, -states, index)
    batch.commit_step(3, [1, 3])  # row 0 keeps 1000+6 only: two holes after it
    step(batch, [1007.0, 2005.0])
    step(batch, [1008.0, 2006.0])
    held = [1000 + i for i in range(9)]
    assert batch.holes[0] == 2 and batch.held(0) == 9 and row_contents_held(batch, 0) == held
    cache.insert(list(range(9)), 8, lambda start, end: batch.row_kv(0, start, end))
    before = batch.column, batch.lengths[0]
    assert batch.spill(0, cache.share(cache.match(list(range(9)), 8))) == 10, "8 tokens and the 2 holes among them"
    assert (batch.shared_tokens(0), batch.held(0), batch.holes[0]) == (8, 9, 0)
    assert batch.column == before[0] and batch.lengths[0] == before[1] - 10
    assert batch.row_kv(0, 8, 9)[0][0][0, :, 0].tolist() == [1008]
    assert int(batch.mask[0].sum()) == 1 and batch._live_width() == 7, "row 1 sets the live width now"
    again = cache.share(cache.match(list(range(9)), 8))
    with pytest.raises(ValueError):
        batch.spill(0, again)  # nothing more to give up
    again.release()
    batch.remove_rows([0])
    assert cache.pinned_blocks == 0


def row_contents_held(batch: BatchKV, row: int) -> list:
    keys, _ = batch.row_kv(row, batch.shared_tokens(row), batch.held(row))[0]
    return keys[0, :, 0].tolist()


def test_each_layer_keeps_its_keys_on_its_own_device():
    """A model split over devices (accelerate's device_map: layers on GPUs, some offloaded to the CPU) keeps each
    layer's keys and values where that layer computes: LayerShape.device, read by probing the model. The
    "meta" device stands in for a second device here; indexes made beside the batch's mask follow the layer."""
    from executor.kv_cache import on
    from executor.kv_pool import KVPool

    meta = torch.device("meta")
    shapes = [LayerShape(2, 3, 3, torch.float32, torch.device("cpu")), LayerShape(2, 3, 3, torch.float32, meta)]
    pool = KVPool(shapes, 64, 16, torch.device("cpu"))
    assert [keys.device.type for keys in pool.keys] == ["cpu", "meta"]
    assert [values.device.type for values in pool.values] == ["cpu", "meta"]
    assert [view[0].device.type for view in (pool.blocks_view(0), pool.blocks_view(1))] == ["cpu", "meta"]
    batch = BatchKV(shapes, 2, 16, torch.device("cpu"), pool)
    assert [layer.keys.device.type for layer in batch.layers] == ["cpu", "meta"]
    index = torch.tensor([0, 2])
    assert on(index, pool.keys[0]) is index and on(index, pool.keys[1]).device == meta
    from executor.attention import PrefixGroup

    group = PrefixGroup(index, [slice(0, 2)], 32)
    assert group.on(torch.device("cpu")) is group
    moved = group.on(meta)
    assert moved.rows.device == meta and moved.blocks == [slice(0, 2)] and moved.tokens == 32


def test_probing_a_model_reads_each_layers_device(tiny_models):
    from executor.kv_cache import probe_layer_shapes
    from executor.model import load

    lm = load(str(tiny_models["chat"]))
    assert {shape.device for shape in probe_layer_shapes(lm.model, torch.device("cpu"))} == {torch.device("cpu")}


def test_the_pool_takes_memory_as_its_blocks_are_written_not_at_start():
    """A CPU pool is an anonymous map (kv_pool.lazy_zeros): zeros that cost nothing until written, so RSS follows
    the tokens held; reading an unwritten block costs nothing either, and resident_bytes counts what is there."""
    import psutil

    from executor.kv_pool import KVPool

    process = psutil.Process()
    before = process.memory_info().rss
    pool = KVPool([LayerShape(2, 64, 64, torch.float32)] * 4, 65536, block_size=16, device=torch.device("cpu"))
    assert pool.bytes == 256 << 20 and pool.resident_bytes() == 0
    assert process.memory_info().rss - before < 16 << 20
    keys, values = pool.blocks_view(0)
    assert float(keys[:1024].sum()) == 0.0 and pool.resident_bytes() == 0  # read only: the kernel's page of zeros
    keys[:256].fill_(1.0)  # 256 blocks of 16 tokens x 2 heads x 64 floats: 2 MiB
    # (Where transparent huge pages are always on, a write may bring a whole 2 MiB page on each side.)
    assert 2 << 20 <= pool.resident_bytes() <= 6 << 20
    assert 2 << 20 <= process.memory_info().rss - before < 24 << 20
