"""The KV pool: one budget of keys and values that the running batch and the prefix cache share.

Each layer's keys (and values) are one flat buffer of ``tokens`` token slots, cut into blocks of
``block_size`` tokens. The running batch (``kv_cache.BatchKV``) takes the pool's first blocks, as many as its
rows hold now (rows x the columns of its longest row, not of the longest request it may ever serve), and lays
its rows out there as ``[rows, kv_heads, columns, dim]`` views, so that attention reads the cached tokens in
place as before. The prefix cache (``kv_cache.PrefixCache``) keeps its blocks anywhere above, highest first.
When the batch grows into blocks the prefix cache holds, those blocks move to free blocks above it, or, when
none are free, the least recently used cached blocks are evicted: a cached block is worth less than a running
request's next token. When the batch shrinks, its blocks go back to the prefix cache.

So the split between the two follows the tokens held: a few short chats leave almost all of the budget to the
prefix cache, a burst of long prompts takes it back. Nothing here is allocated after start: the buffers are
zeroed once (masked columns are still read by attention, and 0 x NaN would be NaN) and every tensor the batch
and the prefix cache use is a view of them.
"""

import torch


class KVPool:
    """``tokens`` token slots of keys and values per layer (``shapes``: kv_cache.LayerShape per layer)."""

    def __init__(self, shapes: list, tokens: int, block_size: int, device):
        self.shapes, self.block_size = shapes, block_size
        self.blocks = max(1, tokens // block_size)
        self.tokens = self.blocks * block_size
        # Each layer's on its own device (a model split over devices: LayerShape.device), else ``device``.
        self.keys = [torch.zeros(self.tokens * s.kv_heads * s.key_dim, dtype=s.dtype, device=s.device or device)
                     for s in shapes]
        self.values = [torch.zeros(self.tokens * s.kv_heads * s.value_dim, dtype=s.dtype, device=s.device or device)
                       for s in shapes]
        self.token_bytes = sum(s.bytes_per_token for s in shapes)
        self.batch_blocks = 0  # blocks [0, batch_blocks) hold the running batch's rows
        self.tenant = None  # the prefix cache in the other blocks: moves its blocks out of the batch's way

    @property
    def bytes(self) -> int:
        return self.tokens * self.token_bytes

    def rows_view(self, layer: int, rows: int, columns: int) -> tuple:
        """Keys and values of ``rows`` rows of ``columns`` tokens from the pool's start, ``[rows, kv_heads,
        columns, dim]`` (the layout of a contiguous tensor of that shape)."""
        shape = self.shapes[layer]
        return (self.keys[layer][:rows * shape.kv_heads * columns * shape.key_dim].view(
                    rows, shape.kv_heads, columns, shape.key_dim),
                self.values[layer][:rows * shape.kv_heads * columns * shape.value_dim].view(
                    rows, shape.kv_heads, columns, shape.value_dim))

    def blocks_view(self, layer: int) -> tuple:
        """Keys and values of every block, ``[blocks, kv_heads, block_size, dim]``: block i is contiguous."""
        shape, size = self.shapes[layer], self.block_size
        return (self.keys[layer].view(self.blocks, shape.kv_heads, size, shape.key_dim),
                self.values[layer].view(self.blocks, shape.kv_heads, size, shape.value_dim))

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def batch_room(self) -> int:
        """Token slots the batch may hold: all but the cached blocks that running rows read in place (pinned:
        they may move out of the batch's way, never be evicted)."""
        return (self.blocks - (self.tenant.pinned_blocks if self.tenant is not None else 0)) * self.block_size

    def claim_for_batch(self, tokens: int) -> bool:
        """Let the batch hold ``tokens`` token slots from the pool's start (more or fewer than now). False,
        with nothing changed, when the pool (less its pinned blocks) is smaller; otherwise the prefix cache's
        blocks in the way move up or are evicted first."""
        blocks = self.blocks_for(tokens)
        if blocks > self.batch_room() // self.block_size:
            return False
        if self.tenant is not None:
            self.tenant.vacate_below(blocks)
        self.batch_blocks = blocks
        return True
