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
zeros (masked columns are still read by attention, and 0 x NaN would be NaN) and every tensor the batch and
the prefix cache use is a view of them.

On a CPU each buffer is an anonymous memory map (``lazy_zeros``): the kernel gives a page of zeros when it is
first written, so the process's resident memory grows with the tokens the pool has held, not with its
budget (the default model's 5.6 GiB pool was 5.6 GiB of RSS at start). ``KVPool.resident_bytes`` says how much
of it is in memory, for the metric and for the leak checks that read RSS.
"""

import bisect
import ctypes
import mmap

import torch

_libc = ctypes.CDLL(None, use_errno=True)
PROT_NONE = 0  # <sys/mman.h>; Python's mmap names only PROT_READ, PROT_WRITE and PROT_EXEC


def lazy_zeros(elements: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``elements`` zeros; on a CPU in an anonymous map whose pages arrive as they are first written (reading
    an unwritten page maps the kernel's one page of zeros: no memory)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(elements, dtype=dtype, device=device)
    page = mmap.PAGESIZE
    size = -(-max(1, elements * dtype.itemsize) // page) * page
    anonymous = mmap.mmap(-1, size + 2 * page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # A page on each side that nothing may touch: the kernel cannot merge the map with a neighbour (another
    # pool's, malloc's), so /proc/self/smaps lists it alone and resident_bytes reads its own Rss.
    start = ctypes.addressof(ctypes.c_char.from_buffer(anonymous))
    for guard in (start, start + page + size):
        if _libc.mprotect(ctypes.c_void_p(guard), ctypes.c_size_t(page), PROT_NONE) != 0:
            raise OSError(ctypes.get_errno(), "mprotect failed on the KV pool's guard page")
    return torch.frombuffer(anonymous, dtype=dtype, count=elements, offset=page)  # the tensor keeps the map alive


def resident_bytes(buffers: list) -> int:
    """Resident bytes (Rss in /proc/self/smaps) of the maps that hold ``buffers`` (lazy_zeros' CPU tensors).
    Rss, not mincore: a page only read is the shared page of zeros, which mincore counts and RSS does not."""
    ranges = sorted((b.data_ptr(), b.data_ptr() + b.numel() * b.element_size()) for b in buffers)
    starts = [start for start, _ in ranges]
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                vma_start = int(line.split("-", 1)[0], 16)
                index = bisect.bisect_right(starts, vma_start) - 1
                inside = index >= 0 and vma_start < ranges[index][1]
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


class KVPool:
    """``tokens`` token slots of keys and values per layer (``shapes``: kv_cache.LayerShape per layer)."""

    def __init__(self, shapes: list, tokens: int, block_size: int, device):
        self.shapes, self.block_size = shapes, block_size
        self.blocks = max(1, tokens // block_size)
        self.tokens = self.blocks * block_size
        # Each layer's on its own device (a model split over devices: LayerShape.device), else ``device``.
        self.keys = [lazy_zeros(self.tokens * s.kv_heads * s.key_dim, s.dtype, s.device or device) for s in shapes]
        self.values = [lazy_zeros(self.tokens * s.kv_heads * s.value_dim, s.dtype, s.device or device) for s in shapes]
        self.token_bytes = sum(s.bytes_per_token for s in shapes)
        self.batch_blocks = 0  # blocks [0, batch_blocks) hold the running batch's rows
        self.tenant = None  # the prefix cache in the other blocks: moves its blocks out of the batch's way

    @property
    def bytes(self) -> int:
        return self.tokens * self.token_bytes

    def resident_bytes(self) -> int:
        """Bytes of the pool's CPU buffers in memory now (pages written at least once); device memory is not
        counted (it is all allocated at start)."""
        cpu = [buffer for buffer in self.keys + self.values if buffer.device.type == "cpu"]
        return resident_bytes(cpu) if cpu else 0

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
