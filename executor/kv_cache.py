"""KV storage: the running batch's cache written in place, the prefix cache, and the memory plan for both.

No Jina and no scheduling in here; the engine decides who gets a row, this module decides where its keys and
values live.

``BatchKV`` is the running batch's cache: one ``[rows, kv_heads, columns, head_dim]`` view per layer for
keys and one for values, over the first blocks of the KV pool (kv_pool.py), which it shares with the prefix
cache. ``columns`` follows the longest row (``resize``: rows get longer as they need, shorter when the pool
must hold more of them; the blocks they no longer cover go back to the prefix cache), and the engine admits a
row only when the pool holds it (``room_for_row``) and runs a step only when it holds the step
(``room_for_step``), preempting the newest row otherwise. The rows of the batch share a write column: a
decode step writes every row's new key and value at that column, in place, and attention reads a view of the
columns written so far (no copy of what is cached). Each row's tokens are right-aligned to the write column
(left padding, masked out by the 2D attention mask), so the model's own mask code (causal, sliding window,
ALiBi from the padding mask) works unchanged for every architecture.

A decode step copies nothing already cached; rows joining and leaving do, and so do the moves of the live
columns (the columns from the longest row's first token to the write column), which copy every row.
``copied_bytes`` counts it all by cause, in bytes of keys and values (a token is ``token_bytes``: keys and
values of every layer; the attention mask's 8 bytes a column are left out), with ``joins``, ``leaves``,
``moves`` (``step_moves`` of them at a step) and ``join_moved_bytes`` beside it (``copy_stats()``):

- ``join``: a row joining copies its own tokens in from the row it was prefilled in (once more, into a
  temporary, when that row or the one it takes is about to be overwritten). A row longer than the write
  column, or one joining when the write column is at the end of the storage, first moves the live columns
  of every running row (rows x live width tokens), counted here too.
- ``staged``: a prompt still being prefilled in the row a joining one takes moves to the freed row (its
  tokens so far).
- ``leave``: a row leaving is replaced by the last row, copied up to the write column, its padding
  included (one row x the write column); the last row leaving copies nothing.
- ``move``: at a step, the live columns move back to the start when the write column reaches the end of
  the storage (at most once every ``margin`` steps: a move leaves at least ``margin`` columns free, as no
  row is longer than ``max_context``), and also when the columns before the longest row, which every row
  attends to masked, pass a quarter of the live width and 16 columns (after the longest row left, say):
  rows x live width tokens, whatever the cause.
- ``resize``: the rows laid out longer (the longest outgrew them) or shorter (the pool must hold another
  row): every held row's columns up to the shorter of the two lengths, through a temporary per row.
- ``hit``: cached blocks copied into a prompt's row, for a model whose attention cannot read them in place
  (with one that can, a hit copies nothing: the row reads the prefix cache's blocks).

A move reads its source through a temporary clone, so its memory traffic is twice what it counts. The
README ("Long prompts") has what ``make bench`` measured on its RAG-shaped burst.

``PrefixCache`` keeps the keys and values of whole blocks of tokens after their requests are gone, in the
pool's blocks above the batch's, in a tree of blocks keyed by their tokens under their parent block (SGLang's
radix cache, at vLLM's block granularity); blocks in the way of a growing batch move up or are evicted. A
request reads the blocks of its longest cached prefix in place (``SharedPrefix``: pinned while a row reads
them; attention.py attends to them and to the row's own columns) and computes only the rest; for a model whose
attention cannot read them there, it copies them into its own row (``read_into``, counted as ``hit``).
Blocks are only ever written once, when they are added, so a reader can never see them change. Leaves are
evicted least recently used first; pinned blocks may move, never be evicted.
"""

import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .kv_pool import KVPool

log = logging.getLogger("jina_llm_stream.kv_cache")


# ---- the memory plan ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerShape:
    """What one layer stores per token: keys ``[kv_heads, key_dim]``, values ``[kv_heads, value_dim]``, and the
    device its keys come out on (a model split over devices, accelerate's ``device_map``: each layer's own; None:
    the engine's)."""

    kv_heads: int
    key_dim: int
    value_dim: int
    dtype: torch.dtype
    device: torch.device | None = None

    @property
    def bytes_per_token(self) -> int:
        element = torch.tensor([], dtype=self.dtype).element_size()
        return self.kv_heads * (self.key_dim + self.value_dim) * element


def probe_layer_shapes(model, device, cache_kwarg: str = "cache") -> list:
    """The cache layout of ``model``, found by running it on one token (works for any architecture whose
    attention uses a transformers cache)."""
    from transformers import DynamicCache

    probe = DynamicCache()
    with torch.inference_mode():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=True, **{cache_kwarg: probe})
    shapes = []
    for layer in probe.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or keys.dim() != 4:
            raise ValueError(f"cache layer {type(layer).__name__} holds no [batch, heads, tokens, dim] keys: "
                             "this architecture's cache cannot be stored by this server")
        shapes.append(LayerShape(keys.shape[1], keys.shape[3], values.shape[3], keys.dtype, keys.device))
    return shapes


def _gathered(layer, row: int, columns: torch.Tensor) -> tuple:
    """``(keys, values)`` of ``row``'s ``columns`` in ``layer`` (copies: an index gathers)."""
    return layer.keys[row, :, columns], layer.values[row, :, columns]


def on(index: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """``index`` (made on the engine's device, beside the batch's mask) on ``tensor``'s device: a layer of a model
    split over devices keeps its keys on its own (a CUDA index cannot read a CPU tensor). No copy when they agree."""
    return index if index.device == tensor.device else index.to(tensor.device)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_memory_size(text) -> float | int | None:
    """``auto`` -> None; ``0.25`` -> a fraction of free memory (a float in (0, 1]); ``4GiB``/``512MB``/a
    byte count -> bytes (an int). ValueError with the accepted forms otherwise."""
    if text is None or str(text).strip().lower() == "auto":
        return None
    text = str(text).strip()
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is not None and 0 < value <= 1:
        return value
    match = _SIZE.match(text)
    if not match or (value is not None and value < 1):
        raise ValueError(f"kv_cache_memory={text!r} is not a size: use auto, a fraction of free memory in (0, 1] "
                         "such as 0.5, or a size such as 4GiB, 512MiB or 2000000000")
    size = int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])
    if size < 1:
        raise ValueError(f"kv_cache_memory={text!r} must be more than 0 bytes")
    return size


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device`` now: the GPU's free memory, or the machine's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class KVPlan:
    """How a budget is spent: one pool of ``pool_tokens`` token slots in blocks of ``block_size``, shared by
    the running batch (up to ``rows`` rows, each as long as its longest row needs, at most ``columns``) and the
    prefix cache (kv_pool.py). ``max_context`` is the longest prompt + answer a row holds."""

    budget: int
    bytes_per_token: int
    rows: int
    columns: int
    max_context: int
    block_size: int
    pool_tokens: int
    source: str

    TYPICAL_REQUEST = 512  # prompt + answer tokens of the request the start-up line prices

    @property
    def pool_bytes(self) -> int:
        return self.pool_tokens * self.bytes_per_token

    def describe(self) -> str:
        gib, mib = 2**30, 2**20
        return (f"KV cache pool {self.pool_bytes / gib:.2f} GiB ({self.source}): {self.pool_tokens} tokens in "
                f"blocks of {self.block_size}, shared by the running batch (up to {self.rows} rows, prompt + "
                f"answer up to {self.max_context} tokens each) and the prefix cache; {self.bytes_per_token} bytes "
                f"per token: a request of {self.TYPICAL_REQUEST} tokens holds "
                f"{self.TYPICAL_REQUEST * self.bytes_per_token / mib:.1f} MiB while it runs")


def margin_for(max_context: int) -> int:
    """Columns beyond the longest row, so that moving the live columns back happens at most every this
    many steps."""
    return max(32, max_context // 8)


def plan_kv_memory(memory, bytes_per_token: int, max_rows: int, max_context: int, device: torch.device,
                   block_size: int = 16, prefix_caching: bool = True) -> KVPlan:
    """The pool for a budget (``parse_memory_size``'s result). Rows hold the tokens they have, not the
    longest request, so the pool only has to hold one row of the longest request; a budget too small for that
    shortens the longest request."""
    full_rows = max_rows * (max_context + margin_for(max_context)) * bytes_per_token
    if memory is None:
        if device.type == "cuda":
            budget, source = int(0.6 * free_memory(device)), "auto: 60% of the GPU's free memory"
        else:
            wanted = 2 * full_rows if prefix_caching else full_rows
            budget = min(wanted, int(0.25 * free_memory(device)))
            source = "auto: the batch's rows at full length twice over, at most 25% of available memory"
    elif isinstance(memory, float):
        budget, source = int(memory * free_memory(device)), f"{memory:g} of free memory"
    else:
        budget, source = int(memory), "--kv-cache-memory"
    tokens = max(2 * block_size, budget // bytes_per_token // block_size * block_size)
    columns = max_context + margin_for(max_context)
    if tokens < columns:
        columns = tokens
        max_context = max(block_size, columns - margin_for(columns))
    return KVPlan(budget, bytes_per_token, max_rows, columns, max_context, block_size, tokens, source)


# ---- the running batch ----------------------------------------------------------------------------------
class PoolFull(RuntimeError):
    """A prefilled row cannot join: the rows grew while it was prefilled and the pool holds no more of them
    (the engine preempts it; it joins later)."""


COPY_CAUSES = ("join", "staged", "leave", "move", "resize", "hit")  # the keys of BatchKV.copied_bytes (module docstring)


class _BatchLayer(CacheLayerMixin):
    """One layer of ``BatchKV``: writes the step's keys and values at the shared column, returns a view."""

    is_sliding = False  # every layer keeps every token; sliding windows are applied by the model's mask

    def __init__(self, batch: "BatchKV", keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.batch, self.keys, self.values = batch, keys, values
        self.is_initialized = True
        self.device = keys.device

    def lazy_initialization(self, key_states, value_states) -> None:  # preallocated
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        rows, column, width = self.batch.rows, self.batch.column, key_states.shape[-2]
        self.keys[:rows, :, column:column + width].copy_(key_states)
        self.values[:rows, :, column:column + width].copy_(value_states)
        return self.keys[:rows, :, :column + width], self.values[:rows, :, :column + width]

    def get_mask_sizes(self, query_length: int) -> tuple:
        return self.batch.column + query_length, 0

    def get_seq_length(self) -> int:
        return self.batch.column

    def get_max_length(self) -> int:
        return self.batch.columns


class BatchKV(Cache):
    """The running batch's KV cache (see the module docstring). Rows ``[0, rows)`` are in use, in the
    order of the model runner's list of running sequences; ``column`` is where the next step writes."""

    def __init__(self, shapes: list, max_rows: int, columns: int, device, pool: KVPool | None = None,
                 max_columns: int | None = None):
        # Without a pool of its own size (tests, the bench): rows of ``columns`` that never grow.
        self.pool = pool if pool is not None else KVPool(shapes, max_rows * columns, 1, device)
        self.max_rows, self.columns = max_rows, columns
        self.initial_columns, self.max_columns = columns, max(columns, max_columns or columns)
        self.device = device
        self.rows = 0
        self.column = 0
        self.lengths = [0] * max_rows  # columns each row spans, right-aligned to ``column`` (its tokens + holes)
        # Masked columns inside a row's span: draft tokens a speculative step rejected (``commit_step``). They
        # are read masked like padding, skipped by ``row_kv`` and squeezed out when the live columns move.
        self.holes = [0] * max_rows
        # The cached prefix each row reads in place (SharedPrefix, or None): its tokens come before the row's
        # own columns (attention.py reads both).
        self.shared = [None] * max_rows
        self._staged = {}  # row -> StagedKV of a prompt being prefilled there (rows above the running ones)
        self.mask = torch.zeros((self._view_rows(columns), columns), dtype=torch.long, device=device)
        layers = [_BatchLayer(self, *self.pool.rows_view(i, self._view_rows(columns), columns))
                  for i in range(len(shapes))]
        super().__init__(layers=layers)
        self.moves = 0  # times the live columns were moved (for tests), at a join or at a step
        # What was copied (module docstring), counted with integer arithmetic only: bytes by cause, rows that
        # joined and left, moves at a step (``moves - step_moves`` were forced by a joining row, and moved
        # ``join_moved_bytes`` of the bytes counted under "join").
        self.token_bytes = sum(s.bytes_per_token for s in shapes)
        self.copied_bytes = dict.fromkeys(COPY_CAUSES, 0)
        self.joins = self.leaves = self.step_moves = self.join_moved_bytes = self.resizes = 0

    # -- steps --
    def start_step(self, width: int = 1) -> torch.Tensor:
        """Make room for ``width`` new tokens per row; the attention mask of the step, ``[rows, column+width]``."""
        # Columns before the longest row are attended to (masked) by every row: move them away once they are
        # a quarter of the live width (a copy of the live tokens, against a quarter more attention per step).
        live = self._live_width()
        if self.column + width > self.columns and live + width > self.columns - self.columns // 8:
            # A move would leave too few free columns: the rows get longer (the engine made sure the pool
            # has room: ``room_for_step``).
            self._fit(self.owned_rows(), live + width)
        if (self.column + width > self.columns or self._leading_waste() > max(16, live // 4)
                or max(self.holes[:self.rows], default=0) > max(16, live // 4)):
            copied = self._move_live_columns_to_start()
            if copied:
                self.copied_bytes["move"] += copied
                self.step_moves += 1
        self.mask[:self.rows, self.column:self.column + width] = 1
        return self.mask[:self.rows, :self.column + width]

    def end_step(self, width: int = 1) -> None:
        self.column += width
        for row in range(self.rows):
            self.lengths[row] += width

    def commit_step(self, width: int, kept: list) -> None:
        """End a step of ``width`` columns of which row r keeps its first ``kept[r]`` (a speculative step: the
        rest were rejected drafts). The write column advances by the most any row kept; a row that kept fewer
        has its other columns masked (holes), so its next token lands right after the write column as usual."""
        advance = max(kept)
        kept_mask = torch.arange(width, device=self.mask.device) < torch.tensor(kept, device=self.mask.device)[:, None]
        self.mask[:self.rows, self.column:self.column + width] = kept_mask.to(self.mask.dtype)
        self.column += advance
        for row, row_kept in enumerate(kept):
            self.lengths[row] += advance
            self.holes[row] += advance - row_kept

    def held(self, row: int) -> int:
        """Tokens whose keys and values the row has: its shared prefix, then its span without holes."""
        return self.shared_tokens(row) + self.own_tokens(row)

    def shared_tokens(self, row: int) -> int:
        return self.shared[row].tokens if self.shared[row] is not None else 0

    def own_tokens(self, row: int) -> int:
        """Tokens the row holds in its own columns (after its shared prefix)."""
        return self.lengths[row] - self.holes[row]

    def spill(self, row: int, shared: "SharedPrefix") -> int:
        """From now on the running row ``row`` reads ``shared``, a longer cached prefix of its own tokens,
        where the prefix cache keeps it: its own columns up to the end of that prefix are masked, and go with
        the leading columns at the next move, so that the other rows stop being laid out as long as it.
        Returns the columns it gave up."""
        drop = shared.tokens - self.shared_tokens(row)
        if not 0 < drop < self.own_tokens(row):
            raise ValueError(f"row {row} holds [{self.shared_tokens(row)}, {self.held(row)}): it cannot read "
                             f"its first {shared.tokens} tokens from the prefix cache")
        first = self.column - self.lengths[row]
        cut = int(self._held_columns(row)[drop - 1]) + 1 - first if self.holes[row] else drop
        self.mask[row, first:first + cut] = 0
        self.holes[row] -= cut - drop
        self.lengths[row] -= cut
        if self.shared[row] is not None:
            self.shared[row].release()
        self.shared[row] = shared
        return cut

    # -- prompts being prefilled --
    def stage(self, length: int | None = None) -> "StagedKV":
        """A free row for a prompt of ``length`` tokens to be prefilled in: the lowest row neither running nor
        staged (so the rows the batch holds stay few), the rows laid out long enough for it. The engine asks
        ``room_for_row`` first."""
        row = self._free_row()
        if row is None or not self._fit(max(self.owned_rows(), row + 1), (length or 0) + 1):
            raise RuntimeError("no free row in the KV cache")
        staged = self._staged[row] = StagedKV(self, row, length or 0)
        return staged

    def _free_row(self):
        return next((row for row in range(self.rows, self.max_rows) if row not in self._staged), None)

    def owned_rows(self) -> int:
        """Rows whose memory the batch holds in the pool: the running rows and every staged one below the
        highest."""
        return max(self.rows, max(self._staged, default=-1) + 1)

    def _needed_columns(self) -> int:
        """The fewest columns that hold every running row (after a move of the live columns) and every staged
        prompt."""
        running = self._live_width() + 1 if self.rows else 0
        return max([running] + [max(s.length, s.own_filled) + 1 for s in self._staged.values()])

    def room_for_row(self, length: int, pinning: int = 0) -> bool:
        """Could a prompt of ``length`` tokens be staged now (evicting cached blocks if need be), with
        ``pinning`` more cached blocks pinned (a shared prefix it would read in place)?"""
        row = self._free_row()
        need = max(length + 1, self._needed_columns())
        return row is not None and need <= self.max_columns and \
            max(self.owned_rows(), row + 1) * need <= self.pool.batch_room() - pinning * self.pool.block_size

    def room_for_step(self, width: int = 1) -> bool:
        """Could the next step of ``width`` tokens per row run (after a move of the live columns, or with longer
        rows in the pool)? False: the engine preempts a row first."""
        if self.column + width <= self.columns:
            return True
        need = max(self._live_width() + width, self._needed_columns())
        return need <= self.columns or (need <= self.max_columns and self.owned_rows() * need <= self.pool.batch_room())

    def _fit(self, rows: int, need: int) -> bool:
        """Lay the rows out so that ``rows`` rows of at least ``need`` columns fit in the pool: longer where a
        row needs more, shorter (the live columns moved to the start first) where the pool cannot hold them so
        long; then hold their blocks. False, with nothing changed, when they cannot fit."""
        need = max(need, self._needed_columns())
        if need > self.columns or rows * self.columns > self.pool.batch_room():
            columns = self.grown_columns(need, rows)
            if columns is None:
                return False
            if columns < self.columns and self.rows:
                self.copied_bytes["move"] += self._move_live_columns_to_start()
            if not self.resize(columns):
                return False
        return self._claim(rows)

    def grown_columns(self, need: int, rows: int):
        """Columns for rows that must hold ``need``: a quarter more (a move every so many steps, not every
        step), within ``max_columns`` and what the pool holds for ``rows`` rows; None when ``need`` does not
        fit."""
        fits = min(self.max_columns, self.pool.batch_room() // max(1, rows))
        if need > fits:
            return None
        wanted = -(-(need + max(16, need // 4)) // 16) * 16
        return max(need, min(wanted, fits), self.columns if self.columns <= fits else 0)

    def resize(self, columns: int) -> bool:
        """Lay the rows out ``columns`` long (their tokens stay where they are in each row; shorter rows keep
        their first ``columns``). False when the pool cannot hold the rows so long."""
        if columns == self.columns:
            return True
        owned = self.owned_rows()
        if not self._claim(owned, columns):
            return False
        keep = min(self.columns, columns)
        capacity = self._view_rows(columns)
        moved = [self.pool.rows_view(i, capacity, columns) for i in range(len(self.layers))]
        # Growing, a row's new place is after its old one: last row first; shrinking, first row first. Each
        # row goes through a temporary (its old and new place may overlap).
        for row in (reversed(range(owned)) if columns > self.columns else range(owned)):
            for layer, (keys, values) in zip(self.layers, moved):
                old_keys, old_values = layer.keys[row, :, :keep].clone(), layer.values[row, :, :keep].clone()
                keys[row, :, :keep].copy_(old_keys)
                values[row, :, :keep].copy_(old_values)
        for layer, (keys, values) in zip(self.layers, moved):
            layer.keys, layer.values = keys, values
        mask = torch.zeros((capacity, columns), dtype=self.mask.dtype, device=self.device)
        mask[:owned, :keep] = self.mask[:owned, :keep]
        self.mask, self.columns = mask, columns
        self.copied_bytes["resize"] += owned * keep * self.token_bytes
        self.resizes += 1
        self._claim(owned)  # shorter rows give blocks back
        return True

    def _view_rows(self, columns: int) -> int:
        """Rows of ``columns`` the views span: as many as the pool holds (only the held ones are written)."""
        return min(self.max_rows, self.pool.tokens // columns)

    def _claim(self, rows: int, columns: int | None = None) -> bool:
        return self.pool.claim_for_batch(rows * (columns or self.columns))

    def unstage(self, staged: "StagedKV") -> None:
        if self._staged.get(staged.row) is staged:
            del self._staged[staged.row]
            staged.release_shared()
            self._give_back()

    def join(self, staged: "StagedKV", length: int) -> int:
        """Move a prefilled prompt's first ``length`` tokens into the running batch (next row); returns it."""
        own = length - staged.shared_tokens
        if not self._fit(max(self.owned_rows(), self.rows + 1), own + 1):  # before anything changes
            raise PoolFull(f"a row of {own} tokens does not fit the KV pool's {self.pool.batch_room()} tokens "
                           f"beside {self.rows} rows of {self._needed_columns()}")
        target, shared = self.rows, staged.shared
        kv = staged.tokens(staged.shared_tokens, length)
        length -= staged.shared_tokens  # its own columns (the shared prefix is read where it is cached)
        staged.shared = None  # the row takes the reference over
        if target == staged.row and self.rows == 0:  # it is the batch's first row already: nothing moves
            del self._staged[staged.row]
            return self._adopt_row(target, length, shared)
        if target == staged.row or target in self._staged:
            kv = [(keys.clone(), values.clone()) for keys, values in kv]  # its row is about to be written
            self.copied_bytes["join"] += length * self.token_bytes
        del self._staged[staged.row]  # its blocks stay held until its tokens are in place
        other = self._staged.get(target)
        if other is not None:  # another prompt is being prefilled in that row: it moves to the freed one
            self._move_staged(other, staged.row)
        row = self.add_row(kv, length, shared)
        self._give_back()
        return row

    def _move_staged(self, staged: "StagedKV", row: int) -> None:
        own = staged.own_filled
        for layer in self.layers:
            layer.keys[row, :, :own].copy_(layer.keys[staged.row, :, :own])
            layer.values[row, :, :own].copy_(layer.values[staged.row, :, :own])
        self.copied_bytes["staged"] += own * self.token_bytes
        del self._staged[staged.row]
        staged.row = row
        self._staged[row] = staged

    # -- rows --
    def add_row(self, layer_kv: list, length: int, shared=None) -> int:
        """Copy one sequence's cache (per layer ``(keys, values)`` of ``[kv_heads, length, dim]``: the tokens
        after its ``shared`` prefix, if it reads one in place) into a new row, right-aligned to the write
        column. Returns the row's index."""
        if self.rows == self.max_rows or self.rows in self._staged:
            raise RuntimeError("no free row in the KV cache")  # the engine admits at most max_rows
        # (From ``join`` this changes no layout: the staged row was laid out for its tokens and held.)
        if not self._fit(max(self.owned_rows(), self.rows + 1), length + 1):
            raise RuntimeError(f"a sequence of {length} tokens does not fit the KV pool's {self.pool.tokens} "
                               f"tokens beside {self.rows} rows")
        if self.rows == 0:
            self.column = length
        elif self.column < length or self.column + 1 > self.columns:
            moved = self._move_live_columns_to_start(at_least=length)
            self.copied_bytes["join"] += moved
            self.join_moved_bytes += moved
        row, start = self.rows, self.column - length
        for layer, (keys, values) in zip(self.layers, layer_kv):
            layer.keys[row, :, start:self.column].copy_(keys)
            layer.values[row, :, start:self.column].copy_(values)
        self.mask[row].zero_()
        self.mask[row, start:self.column] = 1
        self.lengths[row] = length
        self.holes[row] = 0
        self.shared[row] = shared
        self.rows += 1
        self.copied_bytes["join"] += length * self.token_bytes
        self.joins += 1
        return row

    def _adopt_row(self, row: int, length: int, shared=None) -> int:
        """The staged row ``row`` (the batch's first) becomes a running row as it is: its tokens are in
        columns ``[0, length)``, so the write column is ``length``."""
        self.column = length
        self.mask[row].zero_()
        self.mask[row, :length] = 1
        self.lengths[row], self.holes[row], self.shared[row] = length, 0, shared
        self.rows += 1
        self.joins += 1
        return row

    def _give_back(self) -> None:
        """Rows left (or a staged row was dropped): their blocks go back to the pool; an empty batch also
        gets its rows short again."""
        if self.rows == 0 and not self._staged and self.columns != self.initial_columns:
            self.resize(self.initial_columns)
        self._claim(self.owned_rows())

    def remove_rows(self, indices) -> list:
        """Free these rows; the last rows move into the holes. Returns, for each remaining row, the index it
        had before (the model runner reorders its own per-row lists the same way)."""
        order = list(range(self.rows))
        for index in sorted(set(indices), reverse=True):
            last = len(order) - 1
            if self.shared[index] is not None:
                self.shared[index].release()
                self.shared[index] = None
            if index != last:
                self._copy_row(last, index)
                self.copied_bytes["leave"] += self.column * self.token_bytes
                order[index] = order[last]
            order.pop()
            self.leaves += 1
        self.rows = len(order)
        if self.rows == 0:
            self.column = 0
        self._give_back()
        return order

    def copy_stats(self) -> dict:
        """A snapshot of the copy counters (safe to call from another thread: plain integers)."""
        return {"copied_bytes": dict(self.copied_bytes), "joins": self.joins, "leaves": self.leaves,
                "moves": self.moves, "step_moves": self.step_moves, "join_moved_bytes": self.join_moved_bytes,
                "token_bytes": self.token_bytes}

    def row_kv(self, row: int, start: int, end: int) -> list:
        """Per layer ``(keys, values)`` of tokens ``[start, end)`` of ``row`` (positions in its sequence, after
        its shared prefix, which stays where it is cached): views, or copies gathered around its holes."""
        shared = self.shared_tokens(row)
        if not shared <= start <= end <= self.held(row):  # a short read would broadcast into a block unnoticed
            raise IndexError(f"tokens [{start}, {end}) of row {row}, which holds [{shared}, {self.held(row)})")
        start, end = start - shared, end - shared
        first = self.column - self.lengths[row]
        if self.holes[row]:
            columns = self._held_columns(row)[start:end]
            return [_gathered(layer, row, on(columns, layer.keys)) for layer in self.layers]
        return [(layer.keys[row, :, first + start:first + end], layer.values[row, :, first + start:first + end])
                for layer in self.layers]

    def _held_columns(self, row: int) -> torch.Tensor:
        first = self.column - self.lengths[row]
        return self.mask[row, first:self.column].nonzero().squeeze(1) + first

    # -- internals --
    def _copy_row(self, source: int, target: int) -> None:
        width = self.column  # the whole row up to the write column, its padding too
        for layer in self.layers:
            layer.keys[target, :, :width].copy_(layer.keys[source, :, :width])
            layer.values[target, :, :width].copy_(layer.values[source, :, :width])
        self.mask[target].copy_(self.mask[source])
        self.lengths[target] = self.lengths[source]
        self.holes[target] = self.holes[source]
        self.shared[target], self.shared[source] = self.shared[source], None

    def _squeeze_holes(self) -> int:
        """Right-align each row's held tokens to the write column, without holes. Returns the bytes copied."""
        copied = 0
        for row in range(self.rows):
            if not self.holes[row]:
                continue
            columns = self._held_columns(row)
            held, target = len(columns), slice(self.column - len(columns), self.column)
            for layer in self.layers:
                layer_columns = on(columns, layer.keys)
                layer.keys[row, :, target] = layer.keys[row, :, layer_columns]  # gathered first: a copy
                layer.values[row, :, target] = layer.values[row, :, layer_columns]
            self.mask[row].zero_()
            self.mask[row, target] = 1
            self.lengths[row], self.holes[row] = held, 0
            copied += held * self.token_bytes
        return copied

    def _live_width(self) -> int:
        return max(self.lengths[:self.rows], default=0)

    def _leading_waste(self) -> int:
        return self.column - self._live_width()

    def _move_live_columns_to_start(self, at_least: int = 0) -> int:
        """Move every row's tokens so that the write column becomes max(live width, ``at_least``). Returns the
        bytes of keys and values moved (0 when nothing moved). Holes are squeezed out on the way."""
        squeezed = self._squeeze_holes()
        live = self._live_width()
        new_column = max(live, at_least)
        shift = self.column - new_column  # > 0: move left, < 0: move right
        if shift == 0 or self.rows == 0:
            self.column = new_column
            return squeezed
        source = slice(self.column - live, self.column)
        target = slice(new_column - live, new_column)
        for layer in self.layers:
            for tensor in (layer.keys, layer.values):
                tensor[:self.rows, :, target] = tensor[:self.rows, :, source].clone()
        mask = self.mask[:self.rows, source].clone()
        self.mask[:self.rows].zero_()
        self.mask[:self.rows, target] = mask
        self.column = new_column
        self.moves += 1
        return squeezed + self.rows * live * self.token_bytes


# ---- a prompt being prefilled --------------------------------------------------------------------------
class _StagedLayer(CacheLayerMixin):
    """One layer of ``StagedKV``: writes the chunk after what is filled, in the staged row, in place."""

    is_sliding = False

    def __init__(self, staged: "StagedKV", storage: _BatchLayer):
        super().__init__()
        self.staged, self.storage = staged, storage
        self.is_initialized = True
        self.device = storage.device

    def lazy_initialization(self, key_states, value_states) -> None:  # preallocated
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        row, start = self.staged.row, self.staged.own_filled
        end = start + key_states.shape[-2]
        self.storage.keys[row, :, start:end].copy_(key_states[0])
        self.storage.values[row, :, start:end].copy_(value_states[0])
        return self.storage.keys[row:row + 1, :, :end], self.storage.values[row:row + 1, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple:
        return self.staged.own_filled + query_length, 0

    def get_seq_length(self) -> int:
        return self.staged.own_filled

    def get_max_length(self) -> int:
        return self.storage.keys.shape[2]


class StagedKV(Cache):
    """One prompt's cache while it is prefilled: a free row of the batch's storage (so it is inside the memory
    budget), filled from column 0, chunk after chunk or with blocks from the prefix cache; ``filled`` tokens
    are valid. A prompt may start with a ``shared`` prefix read in place where the prefix cache keeps it
    (attention.py): its own columns then hold the tokens after it (``filled`` counts both; positions given to
    ``tokens`` and ``write`` are the sequence's). ``BatchKV.join`` then moves it into the running batch."""

    def __init__(self, batch: "BatchKV", row: int, length: int = 0):
        self.batch, self.row, self.filled = batch, row, 0
        self.length = length  # the own tokens it is staged for (the row is at least one longer)
        self.shared = None  # a SharedPrefix, or None
        self.reads_in_place = True  # may take a shared prefix later (kv_manager.stage decides)
        super().__init__(layers=[_StagedLayer(self, layer) for layer in batch.layers])

    @property
    def shared_tokens(self) -> int:
        return self.shared.tokens if self.shared is not None else 0

    @property
    def own_filled(self) -> int:
        return self.filled - self.shared_tokens

    def share(self, shared) -> None:
        """Read ``shared`` (a SharedPrefix, or None) in place of the first tokens; only before any token of its
        own is computed. The prefix it read before is released."""
        if self.own_filled:
            raise RuntimeError("a shared prefix can only be taken before the row computes tokens of its own")
        if self.shared is not None and self.shared is not shared:
            self.shared.release()
        self.shared = shared
        self.filled = self.shared_tokens

    def release_shared(self) -> None:
        """It leaves without joining: its shared prefix is unpinned."""
        if self.shared is not None:
            self.shared.release()
            self.shared = None

    def tokens(self, start: int, end: int) -> list:
        """Per layer ``(keys, values)`` ``[kv_heads, end-start, dim]`` views of positions ``[start, end)``, after
        the shared prefix."""
        own = start - self.shared_tokens
        if own < 0:
            raise IndexError(f"tokens from {start} of a row whose first {self.shared_tokens} are shared")
        return [(layer.keys[self.row, :, own:own + end - start], layer.values[self.row, :, own:own + end - start])
                for layer in self.batch.layers]

    def write(self, layer_kv: list, start: int) -> None:
        """Copy per layer ``(keys, values)`` ``[kv_heads, tokens, dim]`` in at position ``start`` (after the
        shared prefix); ``filled`` follows."""
        count = layer_kv[0][0].shape[-2]
        for (keys, values), (new_keys, new_values) in zip(self.tokens(start, start + count), layer_kv):
            keys.copy_(new_keys)
            values.copy_(new_values)
        self.filled = max(self.filled, start + count)


# ---- the prefix cache -----------------------------------------------------------------------------------
class _Block:
    __slots__ = ("tokens", "parent", "children", "index", "pins")

    def __init__(self, tokens: tuple, parent, index: int):
        self.tokens, self.parent, self.children, self.index = tokens, parent, {}, index
        self.pins = 0  # rows reading it in place: it may move, never be evicted


class SharedPrefix:
    """Cached blocks (a path from the root) that a row reads in place instead of copying them: pinned in the
    prefix cache until ``release``. ``tokens`` of the row's sequence come from them."""

    def __init__(self, cache: "PrefixCache", path: list):
        self.cache, self.path = cache, path
        self.tokens = len(path) * cache.block_size
        self.key = path[-1]  # the deepest block names the whole path: rows with the same key read together

    def block_indices(self) -> list:
        return [node.index for node in self.path]

    def release(self) -> None:
        if self.path:
            self.cache._unpin(self.path)
            self.path = []


class PrefixCache:
    """Blocks of ``block_size`` tokens' keys and values, in a tree keyed by the tokens of each block under
    its parent: a block is only found behind the exact tokens that produced it. The blocks live in a KV
    pool's blocks above the running batch's (kv_pool.py); without a pool, in one of ``blocks`` blocks of
    its own."""

    def __init__(self, shapes: list, blocks: int, block_size: int, device, pool: KVPool | None = None):
        self.pool = pool if pool is not None else KVPool(shapes, blocks * block_size, block_size, device)
        self.pool.tenant = self
        self.block_size = self.pool.block_size
        # Per layer [blocks, kv_heads, block_size, dim] views: block i is contiguous.
        self.block_views = [self.pool.blocks_view(layer) for layer in range(len(shapes))]
        self._root = _Block((), None, -1)
        self.floor = self.pool.batch_blocks  # blocks below are the batch's
        self._free = list(range(self.floor, self.pool.blocks))  # popped from the end: the highest first
        self._by_index = {}  # block index -> its _Block
        self._leaves: OrderedDict = OrderedDict()  # evictable blocks, least recently used first
        self.evictions = 0
        self.relocations = 0  # blocks moved out of the growing batch's way
        self.pinned_blocks = 0  # blocks that running or prefilling rows read in place (SharedPrefix)

    @property
    def capacity(self) -> int:
        """Blocks it may hold now: the pool's, less the batch's."""
        return self.pool.blocks - self.floor

    def vacate_below(self, floor: int) -> None:
        """The batch now holds blocks ``[0, floor)``: blocks in its way move to free blocks above, or, when
        none is free, the least recently used blocks are evicted until one is (or the block itself went)."""
        if floor <= self.floor:  # the batch gave blocks back
            self._free = list(range(floor, self.floor)) + self._free
            self.floor = floor
            return
        low, self.floor = self.floor, floor
        self._free = [index for index in self._free if index >= floor]
        for index in range(low, floor):
            while index in self._by_index:
                if self._free:
                    self._move(self._by_index[index], self._free.pop())
                else:  # the pool checked that the pinned blocks fit above (KVPool.batch_room)
                    self._evict(self._evictable())

    def _move(self, node: "_Block", index: int) -> None:
        for keys, values in self.block_views:
            keys[index].copy_(keys[node.index])
            values[index].copy_(values[node.index])
        del self._by_index[node.index]
        node.index = index
        self._by_index[index] = node
        self.relocations += 1

    def __len__(self) -> int:
        return len(self._by_index)

    def _blocks_of(self, tokens, count: int):
        size = self.block_size
        return (tuple(tokens[i * size:(i + 1) * size]) for i in range(count))

    def match(self, tokens, limit: int) -> list:
        """The cached blocks of the longest prefix of ``tokens[:limit]`` made of whole blocks; marks them used."""
        path, node = [], self._root
        for block_tokens in self._blocks_of(tokens, limit // self.block_size):
            node = node.children.get(block_tokens)
            if node is None:
                break
            path.append(node)
        for node in reversed(path):  # the deepest block is evicted before its parents
            if node in self._leaves:
                self._leaves.move_to_end(node)
        return path

    def read_into(self, path: list, skip: int, target: "StagedKV") -> None:
        """Copy the blocks ``path[skip:]`` into ``target`` after its first ``skip`` blocks, straight from the
        pool (no temporary copy outside the budget); blocks stored one after another go in one copy."""
        size, runs = self.block_size, []
        for number, node in enumerate(path[skip:], start=skip):
            if runs and node.index == runs[-1][1] + runs[-1][2]:
                runs[-1][2] += 1
            else:
                runs.append([number, node.index, 1])  # [first block number, first pool index, blocks]
        offset = target.shared_tokens  # the target's own columns start after its shared prefix
        for layer, (keys, values) in zip(target.batch.layers, self.block_views):
            for number, index, count in runs:
                span = slice(number * size - offset, (number + count) * size - offset)
                # The row's columns seen as [blocks, kv_heads, block_size, dim], the blocks' own layout.
                layer.keys[target.row, :, span].unflatten(1, (count, size)).transpose(0, 1).copy_(
                    keys[index:index + count])
                layer.values[target.row, :, span].unflatten(1, (count, size)).transpose(0, 1).copy_(
                    values[index:index + count])
        target.filled = max(target.filled, len(path) * size)
        target.batch.copied_bytes["hit"] += (len(path) - skip) * size * target.batch.token_bytes

    def insert(self, tokens, count: int, layer_kv) -> int:
        """Add the whole blocks of ``tokens[:count]`` that are missing. ``layer_kv(start, end)`` gives the
        per-layer ``(keys, values)`` ``[kv_heads, end-start, dim]`` of those tokens. Returns blocks added."""
        node, added, on_path = self._root, 0, set()
        blocks = list(self._blocks_of(tokens, count // self.block_size))
        # The free blocks for the missing ones, taken together in ascending order: a prefix stored as one run of
        # blocks is read as one slice (attention.py gathers it without an index).
        reserved = self._reserve(len(blocks) - self._depth(blocks))
        for number, block_tokens in enumerate(blocks):
            child = node.children.get(block_tokens)
            if child is None:
                index = reserved.pop(0) if reserved else self._allocate(protect=on_path | {node})
                if index is None:
                    break
                start = number * self.block_size
                for (keys, values), (k, v) in zip(self.block_views, layer_kv(start, start + self.block_size)):
                    keys[index].copy_(k)
                    values[index].copy_(v)
                child = _Block(block_tokens, node, index)
                self._by_index[index] = child
                node.children[block_tokens] = child
                self._leaves.pop(node, None)  # a parent is not evictable while it has children
                self._leaves[child] = None
                added += 1
            elif child in self._leaves:
                self._leaves.move_to_end(child)
            on_path.add(child)
            node = child
        self._free.extend(reversed(reserved))  # not used (the pool ran out of evictable blocks): free again
        return added

    def _depth(self, blocks: list) -> int:
        """How many of ``blocks`` (their tokens, from the root) are cached already."""
        node, depth = self._root, 0
        for block_tokens in blocks:
            node = node.children.get(block_tokens)
            if node is None:
                break
            depth += 1
        return depth

    def _reserve(self, count: int) -> list:
        """Up to ``count`` free blocks, ascending (the highest free ones: one run while the pool is unfragmented)."""
        if count <= 0 or not self._free:
            return []
        taken = sorted(self._free[-count:])
        del self._free[-len(taken):]
        return taken

    def _evictable(self, protect: frozenset = frozenset()):
        """The least recently used leaf that no row reads and ``protect`` does not hold; None if none."""
        return next((leaf for leaf in self._leaves if not leaf.pins and leaf not in protect), None)

    def share(self, path: list) -> SharedPrefix:
        """Pin ``path`` (from ``match``) for a row that reads it in place."""
        for node in path:
            if not node.pins:
                self.pinned_blocks += 1
            node.pins += 1
        return SharedPrefix(self, path)

    @staticmethod
    def unpinned(path: list) -> int:
        """Blocks of ``path`` that pinning it would add to ``pinned_blocks``."""
        return sum(1 for node in path if not node.pins)

    def _unpin(self, path: list) -> None:
        for node in path:
            node.pins -= 1
            if not node.pins:
                self.pinned_blocks -= 1

    def _allocate(self, protect: set):
        if self._free:
            return self._free.pop()
        victim = self._evictable(protect)
        if victim is None:
            return None
        self._evict(victim)
        return self._free.pop()

    def _evict(self, victim: "_Block") -> None:
        """Forget a leaf block; its block is free again (unless the batch holds it now)."""
        del self._leaves[victim]
        del self._by_index[victim.index]
        parent = victim.parent
        del parent.children[victim.tokens]
        if parent is not self._root and not parent.children:
            self._leaves[parent] = None
            self._leaves.move_to_end(parent, last=False)  # it was last used when its last child was
        if victim.index >= self.floor:
            self._free.append(victim.index)
        self.evictions += 1
