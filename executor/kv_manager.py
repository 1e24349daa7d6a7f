"""The KV manager: which keys and values a sequence gets from where, and which it leaves behind.

The policy over ``kv_cache.py``'s storage (vLLM's ``KVCacheManager``, SGLang's radix-cache request hooks):
a prompt takes the longest cached prefix (read in place from its staging on, ``stage``; copied for a model whose
attention cannot read it there: ``reuse_cached_prefix``), the blocks it computes are remembered as
soon as they are computed (``remember_prefill``), a row's blocks are remembered before it leaves the batch
(``remember_rows``), a prompt waits for a shared block that an earlier prompt is computing
(``waits_for_a_shared_block``), and a sequence that leaves gives its staged row back (``release``). The
memory plan, made once at start, sizes one pool (kv_pool.py) that the batch's rows and the cached blocks
share as their tokens come and go; a sequence is admitted when the pool holds it (``room_for``).
"""

import logging

import torch

from .attention import PrefixGroup, SharedPrefixPass, enable_shared_prefix
from .kv_cache import BatchKV, PrefixCache, StagedKV, plan_kv_memory, probe_layer_shapes
from .kv_pool import KVPool

log = logging.getLogger("jina_llm_stream.kv_manager")

# A prefill forward pass costs about as much as ~50 prompt tokens on its own (it reads every weight). A
# cached prefix shorter than this is cheaper to recompute in the pass that prefills short prompts together
# than to reuse in a pass of its own (a batch job's prompts often share just the chat template's first block).
MIN_REUSED_TOKENS = 64
# The batch's rows start this long and grow as their tokens need (kv_cache.BatchKV.resize).
INITIAL_COLUMNS = 256
# Admission: a prompt joins when the pool holds it and this much of its answer (or all of a shorter one);
# when the answers outgrow the pool later, the newest row is preempted (the engine's ``_make_room``).
ANSWER_MARGIN = 64
# The row that lays every row out as long as itself reads its head from the prefix cache instead
# (``spill_long_row``) only if that shortens the rows by at least this many columns: below it, the per-step read
# of its blocks buys too little.
MIN_SPILL_GAIN = 128
# Reading a token's keys and values from the prefix cache each step (a gather: a write and a read) costs about
# as much as this many rows attending to one masked padding column.
SPILL_READ_COST = 2


class KVManager:
    """The running batch's storage (``batch``), the prefix cache (``prefix``, None when off or out of
    budget) and the rules between them and the sequences."""

    def __init__(self, model, device, cache_kwarg: str, kv_cache_memory, max_rows: int, max_context: int,
                 block_size: int, prefix_caching: bool):
        self.block_size = block_size
        self.shapes = shapes = probe_layer_shapes(model, device, cache_kwarg)
        self.plan = plan_kv_memory(kv_cache_memory, sum(s.bytes_per_token for s in shapes), max_rows, max_context,
                                   device, block_size, prefix_caching)
        log.info("%s", self.plan.describe())
        self.pool = KVPool(shapes, self.plan.pool_tokens, block_size, device)
        self.batch = BatchKV(shapes, self.plan.rows, min(INITIAL_COLUMNS, self.plan.columns), device, self.pool,
                             max_columns=self.plan.columns)
        self.prefix = PrefixCache(shapes, 0, block_size, device, self.pool) if prefix_caching else None
        self.device = device
        # Hits by reference: a row reads its cached prefix where the prefix cache keeps it (attention.py).
        self.sharing = False
        self.spills = 0  # long rows that went on to read their head from the prefix cache (spill_long_row)
        if self.prefix is not None:
            refused = enable_shared_prefix(model, cache_kwarg, device, block_size)
            self.sharing = refused is None
            if refused:
                log.info("prefix-cache hits are copied into each row for this model (%s)", refused)

    # -- a sequence's own cache --
    def stage(self, sequence, alone: bool = False) -> None:
        """Give a sequence about to be prefilled a free row of the storage, if it has none yet. A fresh one
        reads its longest cached prefix in place (pinned now, so that it cannot be evicted under it), and its
        row only holds the tokens after it; except a sequence ``alone`` in the engine while the pool holds it
        whole: reading in place costs a gather of the prefix per step that only rows sharing it amortise, so
        it copies the prefix once, as before (``reuse_cached_prefix``)."""
        if sequence.cache is not None:
            return
        context = sequence.context_ids()
        path = self._shareable_path(sequence)
        if path and alone and self.batch.room_for_row(len(context) + ANSWER_MARGIN):
            path = []
        shared = self.prefix.share(path) if path and self._can_pin(path) else None
        try:
            staged = self.batch.stage(len(context) - (shared.tokens if shared else 0))
        except RuntimeError:
            if shared is not None:
                shared.release()
            raise
        sequence.cache = staged
        staged.reads_in_place = not alone or shared is not None
        if shared is not None:
            self._take_shared(sequence, staged, shared)

    def _shareable(self, context: list) -> list:
        """The cached path a fresh prompt would read in place (empty when hits are copied or too short)."""
        if not self.sharing:
            return []
        path = self.prefix.match(context, len(context) - 1)
        return path if len(path) * self.block_size >= MIN_REUSED_TOKENS else []

    def _can_pin(self, path: list) -> bool:
        """Would the batch's rows, as laid out now, still fit beside ``path`` pinned?"""
        extra = self.prefix.unpinned(path) * self.block_size
        return self.pool.batch_blocks * self.block_size <= self.pool.batch_room() - extra

    def _take_shared(self, sequence, staged: StagedKV, shared) -> None:
        before = staged.shared_tokens
        staged.share(shared)
        if not sequence.generated:  # a resumed (preempted) sequence already reported its cached tokens
            sequence.cached_tokens += shared.tokens - before
        sequence.prefilled = shared.tokens

    def room_for(self, sequence) -> bool:
        """Admission by tokens: does the pool hold this sequence's context (less a cached prefix it would read
        in place) and the first ``ANSWER_MARGIN`` tokens of what it still has to answer, beside the rows there
        now (cached blocks give way)?"""
        path = self._shareable_path(sequence)
        # Its newly pinned blocks leave the batch less room: counted with its row.
        return self.batch.room_for_row(self._own_need(sequence, path), self.prefix.unpinned(path) if path else 0)

    def release(self, sequence) -> None:
        """A sequence leaving before it joined the batch (finished, failed, preempted) frees its staged row;
        what it computed is forgotten (``prefilled`` 0), what the prefix cache got stays there."""
        if isinstance(sequence.cache, StagedKV):
            self.batch.unstage(sequence.cache)
        sequence.cache = None

    def forget_computed(self, sequence) -> None:
        """A preempted sequence: its row is gone, its context is recomputed when it gets one back."""
        self.release(sequence)
        sequence.prefilled = 0

    # -- the prefix cache --
    def reuse_cached_prefix(self, sequence, context: list) -> None:
        """Extend the sequence's own cache with the cached blocks that follow what it has (at least the last
        context token is left to compute: its logits choose the first new token)."""
        size = self.block_size
        if self.prefix is None or sequence.prefilled % size:
            return
        self.stage(sequence)  # first: staging may move (or evict) cached blocks out of the batch's way
        path = self.prefix.match(context, len(context) - 1)
        have = sequence.prefilled // size
        if len(path) <= have or (have == 0 and len(path) * size < MIN_REUSED_TOKENS):
            return
        if self.sharing and sequence.cache.reads_in_place and not sequence.cache.own_filled and self._can_pin(path):
            # Nothing computed of its own yet: read it in place.
            self._take_shared(sequence, sequence.cache, self.prefix.share(path))
            return
        self.prefix.read_into(path, have, sequence.cache)
        if not sequence.generated:  # a resumed (preempted) sequence already reported its cached tokens
            sequence.cached_tokens += (len(path) - have) * size
        sequence.prefilled = len(path) * size

    def remember_prefill(self, sequence, context: list) -> None:
        """The whole blocks of what the sequence has computed so far, for prompts that come after it."""
        if self.prefix is not None:
            self.prefix.insert(context, sequence.prefilled, sequence.cache.tokens)

    def remember_rows(self, running: list, indices) -> None:
        """Rows about to leave the batch: keep their whole blocks (prompt and answer) for later prompts."""
        if self.prefix is None:
            return
        for index in indices:
            # Its held tokens, not its span: a span also counts the holes of rejected drafts.
            sequence, length = running[index], self.batch.held(index)
            self.prefix.insert(sequence.tokens()[:length], length,
                               lambda a, b, row=index: self.batch.row_kv(row, a, b))

    def spill_long_row(self, running: list, newcomer: int = 0, short: bool = False) -> bool:
        """The row with the most own columns, when it is much longer than the others (and than a ``newcomer``
        row of that many tokens about to be laid out beside it), reads its whole blocks where the prefix cache
        keeps them from now on (remembered there first, if they are not yet), and the rows stop being laid out
        as long as it. Done when the pool is ``short``, or when the padding it spares every other row per
        step outweighs the per-step read of its blocks. True when a row gave columns up."""
        candidate = self._spill_candidate(newcomer, short)
        if candidate is None:
            return False
        row, blocks, reason = candidate
        batch, size = self.batch, self.block_size
        tokens = running[row].tokens()[:batch.held(row)]
        self.prefix.insert(tokens, blocks * size, lambda start, end: batch.row_kv(row, start, end))
        path = self.prefix.match(tokens, blocks * size)
        if len(path) * size - batch.shared_tokens(row) < MIN_SPILL_GAIN or not self._can_pin(path):
            return False
        own, shared = batch.own_tokens(row), self.prefix.share(path)
        try:
            batch.spill(row, shared)
        except ValueError:
            shared.release()
            raise
        self.spills += 1
        log.info("request %d reads its first %d tokens where the prefix cache keeps them: its %d own tokens laid "
                 "out the other rows as long (%s)", running[row].request_id, len(path) * size, own, reason)
        return True

    def _spill_candidate(self, newcomer: int, short: bool):
        """(row, its whole blocks, why) for spill_long_row, or None when no spill pays."""
        batch, size = self.batch, self.block_size
        if not self.sharing or not batch.rows:
            return None
        order = sorted(range(batch.rows), key=batch.own_tokens, reverse=True)
        row, held = order[0], batch.held(order[0])
        blocks = (held - 1) // size  # at least its last token stays its own
        longest_other = max([batch.own_tokens(other) for other in order[1:2]] + [newcomer, held - blocks * size])
        spared = batch.own_tokens(row) - longest_other  # the columns every other row sheds
        if spared < MIN_SPILL_GAIN:
            return None
        # Laid out beside it, a newcomer that leaves the pool no room to copy the row's blocks into the cache
        # makes this the last moment a spill can still be made.
        if short or (newcomer > 0 and not batch.room_for_row(newcomer, blocks)):
            return row, blocks, "the KV pool is short"
        beside = batch.owned_rows() - 1 + (newcomer > 0)
        if beside * spared >= SPILL_READ_COST * blocks * size:
            return row, blocks, f"the padding of {beside} rows beside it cost more than reading its blocks"
        return None

    def own_need(self, sequence) -> int:
        """The columns a sequence about to be admitted would need of its row: its context less a cached prefix
        it would read in place, plus the first ``ANSWER_MARGIN`` tokens of what it still has to answer."""
        return self._own_need(sequence, self._shareable_path(sequence))

    def _own_need(self, sequence, path: list) -> int:
        answer = min(ANSWER_MARGIN, max(0, sequence.max_new_tokens - len(sequence.generated)))
        return len(sequence.context_ids()) - len(path) * self.block_size + answer

    def _shareable_path(self, sequence) -> list:
        """The cached blocks a sequence not yet prefilled would read in place (none once it has begun)."""
        return self._shareable(sequence.context_ids()) if sequence.prefilled == 0 else []

    def shared_pass(self, shared: list):
        """What a forward pass whose rows read ``shared`` (a SharedPrefix or None per row) in place needs
        (attention.py), or None when no row does."""
        groups = {}
        for row, prefix in enumerate(shared):
            if prefix is not None:
                groups.setdefault(prefix.key, (prefix, []))[1].append(row)
        if not groups:
            return None
        return SharedPrefixPass([PrefixGroup(_as_index(rows, self.device),
                                             _as_runs(prefix.block_indices(), self.device), prefix.tokens)
                                 for prefix, rows in groups.values()], self.prefix.block_views)

    # -- prompts that arrive together and share blocks compute them once --
    def claimed_blocks(self, prefilling: list) -> dict:
        """Each block some prefilling prompt has yet to compute -> the first prompt (oldest) computing it."""
        claimed = {}
        if self.prefix is None:
            return claimed
        for sequence in prefilling:
            hashes = self._block_hashes(sequence, sequence.context_ids())
            for block_hash in hashes[sequence.prefilled // self.block_size:]:
                claimed.setdefault(block_hash, sequence)
        return claimed

    def waits_for_a_shared_block(self, sequence, context: list, claimed: dict) -> bool:
        """The next block of this prompt is being computed by an earlier prompt: take it from the cache later
        instead of computing it twice."""
        if self.prefix is None or sequence.prefilled % self.block_size:
            return False
        size = self.block_size
        hashes = self._block_hashes(sequence, context)
        index = sequence.prefilled // size
        shared = 0  # blocks from here on that an earlier prompt is computing
        while index + shared < len(hashes) and (index + shared + 1) * size < len(context) \
                and claimed.get(hashes[index + shared], sequence) is not sequence:
            shared += 1  # (the block holding the last token is computed by each prompt: its logits are needed)
        return shared > 0 and (index + shared) * size >= MIN_REUSED_TOKENS

    def _block_hashes(self, sequence, context: list) -> list:
        if not sequence.block_hashes or sequence.block_hashes[0] != len(context):
            size, hashes, running = self.block_size, [], 0
            for start in range(0, len(context) - size + 1, size):
                running = hash((running, tuple(context[start:start + size])))
                hashes.append(running)
            sequence.block_hashes = (len(context), hashes)
        return sequence.block_hashes[1]


def _as_index(indices: list, device):
    """Row indices as a slice when they are one ascending run (a view, no gather), else a tensor."""
    first = indices[0]
    if indices == list(range(first, first + len(indices))):
        return slice(first, first + len(indices))
    return torch.tensor(indices, device=device)


MAX_RUNS = 8  # a prefix stored in more runs of blocks than this is gathered by an index instead


def _as_runs(indices: list, device):
    """Block indices as a list of slices, one per ascending run (a prompt's blocks are stored a run per
    remembered chunk), or an index tensor when they are scattered."""
    runs = []
    for index in indices:
        if runs and index == runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([index, index + 1])
    if len(runs) > MAX_RUNS:
        return torch.tensor(indices, device=device)
    return [slice(start, stop) for start, stop in runs]
