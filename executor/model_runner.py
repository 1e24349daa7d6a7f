"""The model runner: every forward pass, and the running batch that the decode steps share.

It owns the batch's order: ``running`` lists the rows' sequences in the order of the KV storage's rows, with
each row's next position and input token beside it, and only this class changes the three together
(``join``, ``remove_rows``). Prefill extends one sequence's staged cache by a chunk, or computes several
short prompts in one padded pass; a decode step returns one logit row per running sequence, a verify step
(speculative decoding) the logits of each row's next token and draft, and ``commit`` keeps what was
accepted. It chooses no token and emits nothing (vLLM's model runner and persistent batch, transformers' ``ModelRunner``).
"""

import inspect
from contextlib import contextmanager, nullcontext

import torch
from transformers import DynamicCache

from .attention import SHARED
from .step_threads import StepThreads
from .token_packing import TokenPacking


def cache_kwarg(model) -> str:
    """transformers 5 renamed the cache argument; remote-code models may still use the old name."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class ModelRunner:
    """Forward passes over a transformers causal LM, with the running batch's rows."""

    def __init__(self, model, kv, device, max_positions: int | None = None):
        self.model, self.kv, self.device = model, kv, device
        # A learned position table's size (GPT-2, OPT): a verify step's padding may not index past it.
        self._last_position = None if max_positions is None else max_positions - 1
        parameters = inspect.signature(model.forward).parameters
        self._accepts_logits_to_keep = "logits_to_keep" in parameters
        self._cache_kwarg = cache_kwarg(model)
        self.running: list = []  # sequences of the running batch, in the order of the storage's rows
        self._positions = None  # [rows] position id of each row's next token
        self._next_tokens = None  # [rows, 1] token each row feeds into the next step
        self.verify_width = 1  # columns of the last ``verify`` step
        self._packing = TokenPacking(model)
        self.packs_tokens = bool(self._packing.layers)  # a verify step's Linear layers skip its padding
        self.verify_tokens = 0  # positions the last ``verify`` step computed in its Linear layers
        self.steps = 0  # decode steps run, for tests and metrics
        self.threads = StepThreads.for_model(model, device)  # each decode/verify step's CPU threads

    # -- prefill --
    def prefill_chunk(self, sequence, token_ids: list, start: int) -> torch.Tensor:
        """Positions ``start ..`` of one sequence, into its staged cache; the last position's logits."""
        end, cache = start + len(token_ids), sequence.cache
        with self._reading(self.kv.shared_pass([cache.shared])):
            logits = self._prefill_logits(torch.tensor([token_ids], dtype=torch.long, device=self.device),
                                          torch.ones((1, end - cache.shared_tokens), dtype=torch.long,
                                                     device=self.device),
                                          torch.arange(start, end, device=self.device).unsqueeze(0), cache)
        sequence.cache.filled = end
        return logits

    def prefill_together(self, pairs) -> torch.Tensor:
        """Whole contexts ``[(sequence, context)]`` in one left-padded forward pass (a temporary cache of at most
        ``prefill_chunk`` tokens); each sequence's tokens, without the padding, then go to its staged row."""
        width = max(len(context) for _, context in pairs)
        pads = [width - len(context) for _, context in pairs]
        input_ids = torch.tensor([[0] * pad + context for pad, (_, context) in zip(pads, pairs)],
                                 dtype=torch.long, device=self.device)
        mask = torch.tensor([[0] * pad + [1] * (width - pad) for pad in pads], dtype=torch.long, device=self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        # Without a config every layer keeps every token (a sliding-window layer would drop the old ones): the
        # batch and the prefix cache need them all.
        cache = DynamicCache()
        logits = self._prefill_logits(input_ids, mask, positions, cache)
        for row, (pad, (sequence, context)) in enumerate(zip(pads, pairs)):
            sequence.cache.write([(layer.keys[row, :, pad:], layer.values[row, :, pad:]) for layer in cache.layers], 0)
            sequence.prefilled = len(context)
        return logits

    def _prefill_logits(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        """One prefill forward pass that extends ``cache`` in place; logits of the last position only."""
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True)
        kwargs[self._cache_kwarg] = cache
        if self._accepts_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        return self.model(**kwargs).logits

    # -- the running batch --
    def join(self, sequence, next_token: int) -> None:
        """A prefilled sequence becomes the last row; ``next_token`` is its next step's input."""
        length = sequence.prefilled
        self.kv.batch.join(sequence.cache, length)
        token = torch.tensor([[next_token]], dtype=torch.long, device=self.device)
        position = torch.tensor([length], dtype=torch.long, device=self.device)
        if not self.running:
            self._positions, self._next_tokens = position, token
        else:
            self._positions = torch.cat([self._positions, position])
            self._next_tokens = torch.cat([self._next_tokens, token])
        sequence.cache = None
        self.running.append(sequence)

    def remove_rows(self, indices) -> None:
        """These rows leave the batch; their blocks are remembered first (the KV manager decides what)."""
        if not indices:
            return
        self.kv.remember_rows(self.running, indices)
        self._reorder(self.kv.batch.remove_rows(indices))

    def drop_all(self) -> None:
        """After a failed step: every row leaves and nothing is remembered (its keys may be half written)."""
        self.kv.batch.remove_rows(range(len(self.running)))
        self._reorder([])

    def _reorder(self, order: list) -> None:
        """The storage moved its rows (``order``: each remaining row's index before): follow it."""
        self.running = [self.running[i] for i in order]
        if not order:
            self._positions = self._next_tokens = None
            return
        index = torch.tensor(order, dtype=torch.long, device=self.device)
        self._positions, self._next_tokens = self._positions[index], self._next_tokens[index]

    def decode(self) -> torch.Tensor:
        """One step of every running row, written into the storage in place: ``[rows, vocab]`` logits. Feed
        the chosen tokens back with ``set_next_tokens`` before the next step."""
        batch = self.kv.batch
        mask = batch.start_step(1)
        with self._reading(self.kv.shared_pass(batch.shared[:batch.rows])), self.threads.step("decode", batch.rows):
            output = self.model(
                input_ids=self._next_tokens,
                attention_mask=mask,
                position_ids=self._positions.unsqueeze(1),
                use_cache=True,
                **{self._cache_kwarg: batch},  # written in place
            )
        batch.end_step(1)
        self._positions = self._positions + 1
        self.steps += 1
        return output.logits[:, -1, :]

    def verify(self, drafts: list) -> torch.Tensor:
        """One step in which each row feeds its next token and then its draft (``drafts[r]``, maybe empty):
        ``[rows, width, vocab]`` logits, position i predicting what follows input i. Rows with a shorter draft
        are padded; the Linear layers skip the padding (token_packing.py), whose logits are zeros and mean
        nothing. ``commit`` then says what each row keeps."""
        lengths = [1 + len(draft) for draft in drafts]
        rows, width = len(drafts), max(lengths)
        padded = [draft + [0] * (width - length) for draft, length in zip(drafts, lengths)]
        input_ids = torch.cat([self._next_tokens, torch.tensor(padded, dtype=torch.long, device=self.device)], dim=1)
        packing = nullcontext()
        self.verify_tokens = rows * width
        if self.packs_tokens and sum(lengths) < rows * width:
            packing = self._packing.only(TokenPacking.positions(lengths, width, self.device), rows, width)
            self.verify_tokens = sum(lengths)
        batch = self.kv.batch
        mask = batch.start_step(width)
        positions = self._positions.unsqueeze(1) + torch.arange(width, device=self.device)
        if self._last_position is not None:  # a row's own tokens stay inside (drafts are cut to its room)
            positions = positions.clamp_(max=self._last_position)
        with self._reading(self.kv.shared_pass(batch.shared[:batch.rows])), packing, \
                self.threads.step("verify", self.verify_tokens):
            output = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{self._cache_kwarg: batch},  # written in place
            )
        self.verify_width = width
        return output.logits

    def commit(self, kept: list, next_tokens: list) -> None:
        """After ``verify``: row r keeps its first ``kept[r]`` inputs (its next token and the accepted draft
        tokens; the rejected ones leave the storage) and feeds ``next_tokens[r]`` into the next step."""
        self.kv.batch.commit_step(self.verify_width, kept)
        self._positions = self._positions + torch.tensor(kept, dtype=torch.long, device=self.device)
        self.set_next_tokens(next_tokens)
        self.steps += 1

    @staticmethod
    @contextmanager
    def _reading(shared_pass):
        """The rows' shared prefixes (kv_manager.shared_pass), read by attention.py during one forward pass."""
        token = SHARED.set(shared_pass)
        try:
            yield
        finally:
            SHARED.reset(token)

    def set_next_tokens(self, tokens: list) -> None:
        self._next_tokens = torch.tensor([[t] for t in tokens], dtype=torch.long, device=self.device)
