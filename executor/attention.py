"""Attention over a shared prefix read in place: how a prefix-cache hit costs no copy.

A row that starts with cached blocks does not copy them into its own storage: it keeps a reference to them
(``SharedPrefix``, pinned in the prefix cache), its own storage holds only the tokens after them, and each of
its forward passes attends to both places. The two parts are merged exactly by their softmax statistics
(max and sum of exponentials: the log-sum-exp merge of FlashInfer's cascade attention and of FlashAttention's
split-KV), and the rows that share the same prefix read it together: their queries are stacked into one
product against the shared blocks, which are read where the prefix cache keeps them (no gather when they lie
in one run of blocks, as a fresh insert leaves them).

It is a transformers attention function (``AttentionInterface``), registered as ``jina_shared_prefix`` and
used in place of ``sdpa``: a forward pass with no shared prefix in it (``SHARED`` unset, or no row with a
prefix) is plain ``sdpa_attention_forward``, unchanged, but for a few queries per row on a CPU (a verify step:
``SMALL_QUERY``), which take the own part's path alone. Architectures whose attention does not come through
the interface, or that need more than plain attention (sliding windows, soft-capping, position biases, ALiBi),
keep copying: ``supports_shared_prefix`` checks a model by running it (kv_manager.py decides).
"""

import contextvars
import logging
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .int4 import matmul_input_dtype

log = logging.getLogger("jina_llm_stream.attention")

NAME = "jina_shared_prefix"


@dataclass
class PrefixGroup:
    """Rows of one forward pass that share one cached prefix, ``tokens`` long: ``rows`` of the pass (a slice
    where they are one ascending run, else an index tensor) and ``blocks`` of the pool (a list of slices, one
    per run of blocks, or an index tensor)."""

    rows: object
    blocks: object
    tokens: int

    def on(self, device) -> "PrefixGroup":
        """This group with its index tensors on ``device`` (itself when they are there already)."""
        moved = [part.to(device) if isinstance(part, torch.Tensor) and part.device != device else part
                 for part in (self.rows, self.blocks)]
        if moved[0] is self.rows and moved[1] is self.blocks:
            return self
        return PrefixGroup(moved[0], moved[1], self.tokens)


@dataclass
class SharedPrefixPass:
    """What one forward pass reads besides each row's own storage: the groups of rows with a shared prefix,
    and every layer's blocks view of the pool (``[blocks, kv_heads, block_size, dim]``)."""

    groups: list
    block_views: list
    layers_seen: set = field(default_factory=set)
    _masks: dict = field(default_factory=dict)

    def own_mask(self, attention_mask, rows: int, q_len: int, columns: int) -> torch.Tensor:
        """``_own_mask``, made once per pass (every layer gets the same mask)."""
        key = (id(attention_mask), rows, q_len, columns)
        if key not in self._masks:
            device = attention_mask.device if attention_mask is not None else self.block_views[0][0].device
            self._masks[key] = (attention_mask, _own_mask(attention_mask, rows, q_len, columns, device))
        return self._masks[key][1]


SHARED: contextvars.ContextVar = contextvars.ContextVar("jina_shared_prefix_pass", default=None)

# On a CPU, torch's flash kernel computes each part; off, the plain products of other devices do (the tests run
# both paths on the CPU).
CPU_KERNEL = True


# Passes of at most this many queries per row (decode and verify steps, not prefill chunks) that read no shared
# prefix still take the own part's path (``_attend_flash``) on a CPU: transformers' sdpa copies every key and value head
# ``heads // kv_heads`` times for a masked multi-token pass (its repeat_kv), which made a speculative verify step
# of 16 rows x ~900 tokens cost 1.4 s against 0.17 s for a decode step, most of it in those copies.
SMALL_QUERY = 64


def shared_prefix_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                            **kwargs):
    """``sdpa_attention_forward`` plus, for the rows of ``SHARED``'s groups, their shared prefix (and on a CPU,
    passes of a few queries per row without one, which sdpa would serve with copied key/value heads)."""
    current = SHARED.get()
    groups = current.groups if current is not None else []
    plain = kwargs.get("softcap") is None and kwargs.get("sliding_window") is None \
        and kwargs.get("position_bias") is None and not (dropout and module.training)
    if not groups and not (plain and query.device.type == "cpu" and 1 < query.shape[2] <= SMALL_QUERY):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if not plain:
        raise RuntimeError("a shared prefix was read by a layer with soft-capping, a sliding window, a position "
                           "bias or dropout: enable_shared_prefix refuses such a model")
    rows, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    scale = scaling if scaling is not None else dim ** -0.5
    attend = _attend_flash if query.device.type == "cpu" and CPU_KERNEL else _attend_matmul
    own_mask = current.own_mask(attention_mask, rows, q_len, key.shape[2]) if current is not None \
        else _own_mask(attention_mask, rows, q_len, key.shape[2], query.device)
    # Every part in the grouped layout: [rows, kv_heads, heads per kv head x q_len, dim] (GQA without repeats).
    out, lse = attend(query, key, value, own_mask, scale)
    if groups:  # parts merged in float32, as FlashAttention's split-KV merges them, whatever the model's dtype
        out = out.float()
        current.layers_seen.add(module.layer_idx)
        keys_blocks, values_blocks = current.block_views[module.layer_idx]
    for group in groups:  # a row reads at most one shared prefix: each row is merged once
        group = group.on(query.device)  # a model split over devices: this layer's
        queries = _grouped(query, kv_heads)[group.rows]
        count, _, grouped, _ = queries.shape
        stacked = queries.transpose(0, 1).reshape(1, kv_heads, count * grouped, dim)
        prefix_keys, prefix_values = (_as_tokens(view, group.blocks) for view in (keys_blocks, values_blocks))
        prefix_out, prefix_lse = attend(stacked, prefix_keys, prefix_values, None, scale)
        prefix_out = prefix_out.reshape(kv_heads, count, grouped, -1).transpose(0, 1)
        prefix_lse = prefix_lse.reshape(kv_heads, count, grouped).transpose(0, 1)
        # The own part's share of the softmax mass: exp(own) / (exp(own) + exp(prefix)) = sigmoid(own - prefix).
        own_share = (lse[group.rows] - prefix_lse).sigmoid_().unsqueeze(-1)
        out[group.rows] = torch.lerp(prefix_out.float(), out[group.rows], own_share.float())
    out = out.to(query.dtype).reshape(rows, heads, q_len, -1)
    return out.transpose(1, 2).contiguous(), None


def _grouped(tensor: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[rows, heads, q_len, x]`` -> ``[rows, kv_heads, heads // kv_heads * q_len, x]`` (query head h reads
    key/value head h // (heads // kv_heads), as transformers' repeat_kv lays them out)."""
    rows, heads, q_len, last = tensor.shape
    return tensor.reshape(rows, kv_heads, heads // kv_heads * q_len, last)


def _own_mask(attention_mask, rows: int, q_len: int, columns: int, device) -> torch.Tensor:
    """The rows' own columns as an additive mask ``[rows, 1, q_len, columns]`` (0 or -inf)."""
    if attention_mask is None:  # sdpa's convention: no mask means causal over the last q_len columns
        allowed = torch.ones((q_len, columns), dtype=torch.bool, device=device).tril_(columns - q_len)[None, None]
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask
    else:
        return attention_mask[..., -columns:].expand(rows, 1, q_len, columns)
    allowed = allowed[..., -columns:].expand(rows, 1, q_len, columns)
    return torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, float("-inf"))


def _attend_flash(query, key, value, mask, scale) -> tuple:
    """Attention and its log-sum-exp from torch's CPU flash kernel (GQA native), in the grouped layout."""
    rows, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    if heads != kv_heads:  # the queries of a kv head's heads in one block: each key is read once for all of them
        group = heads // kv_heads  # (1.4-1.5x faster than the kernel's own GQA for 1-9 queries per row)
        query = query.reshape(rows, kv_heads, group * q_len, dim)
        if mask is not None:  # block row h * q_len + i is query i of head h
            mask = mask.expand(rows, 1, q_len, mask.shape[-1])
            mask = mask.expand(rows, 1, group * q_len, mask.shape[-1]) if q_len == 1 else mask.repeat(1, 1, group, 1)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, False, attn_mask=None if mask is None else mask.to(query.dtype), scale=scale)
    return _grouped(out, kv_heads), _grouped(lse.unsqueeze(-1), kv_heads).squeeze(-1)


def _attend_matmul(query, key, value, mask, scale) -> tuple:
    """The same with plain products (devices without the CPU kernel), in float32 whatever the inputs' dtype:
    scores rounded to bfloat16 (8 bits of mantissa) moved a tiny model's logits by 0.7, where FlashAttention
    keeps scores, softmax and the output in float32 too."""
    kv_heads = key.shape[1]
    queries = _grouped(query, kv_heads).float()
    repeat = queries.shape[2] // query.shape[2]
    scores = torch.matmul(queries, key.float().transpose(-1, -2)).mul_(scale)
    if mask is not None:
        scores += mask.repeat(1, 1, repeat, 1) if repeat > 1 else mask
    lse = torch.logsumexp(scores, dim=-1)
    weights = scores.sub_(lse.unsqueeze(-1)).exp_()
    return torch.matmul(weights, value.float()), lse


def _as_tokens(blocks_view: torch.Tensor, blocks) -> torch.Tensor:
    """The blocks ``blocks`` (slices, one per run of blocks, or an index tensor) of a ``[blocks, kv_heads,
    size, dim]`` view as one ``[1, kv_heads, tokens, dim]`` operand: one gather, read by all of a group's rows
    at once."""
    if isinstance(blocks, torch.Tensor):
        chosen = blocks_view[blocks].transpose(0, 1)  # (index_select on the transposed view copied the whole pool)
    else:
        chosen = torch.cat([blocks_view[run].transpose(0, 1) for run in blocks], dim=1)
    kv_heads, count, size, dim = chosen.shape
    return chosen.reshape(1, kv_heads, count * size, dim)


def register() -> None:
    """Make ``jina_shared_prefix`` known to transformers (its masks are sdpa's)."""
    AttentionInterface.register(NAME, shared_prefix_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


@torch.inference_mode()
def enable_shared_prefix(model, cache_kwarg: str, device, block_size: int) -> str | None:
    """Switch ``model`` to ``jina_shared_prefix`` attention if it computes exactly what it did: a prompt's last
    logits with its first block read as a shared prefix must equal those of a plain pass, and every layer must
    have read it. None when switched; otherwise why not (the model keeps its attention, hits copy)."""
    from transformers import DynamicCache

    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation == NAME:  # another engine on the same model switched it (and checked it) already
        return None
    if implementation != "sdpa":
        return f"its attention is {implementation!r}, not sdpa"
    register()
    # Two roundings of the dtype its matmuls read apart at most (bfloat16, also int4's inputs: 2^-7; float32
    # and float16: 1e-3): the plain pass rounds its attention output once more than the merge, which works in
    # float32.
    tolerance = max(1e-3, 2 * torch.finfo(matmul_input_dtype(model)).eps)
    tokens = torch.arange(1, 2 * block_size + 3, device=device).remainder_(model.config.vocab_size - 1).add_(1)[None]
    model.set_attn_implementation(NAME)
    try:
        plain = _last_logits(model, cache_kwarg, tokens, 0, DynamicCache())
        first = DynamicCache()
        _last_logits(model, cache_kwarg, tokens[:, :block_size], 0, first)
        views = [(layer.keys, layer.values) for layer in first.layers]  # one block: [1, kv_heads, size, dim]
        current = SharedPrefixPass([PrefixGroup(torch.tensor([0], device=device), [slice(0, 1)], block_size)], views)
        token = SHARED.set(current)
        try:
            shared = _last_logits(model, cache_kwarg, tokens[:, block_size:], block_size, DynamicCache())
        finally:
            SHARED.reset(token)
        if len(current.layers_seen) != len(first.layers):
            reason = f"{len(current.layers_seen)} of its {len(first.layers)} layers attend through the interface"
        elif not torch.allclose(shared.float(), plain.float(), rtol=tolerance, atol=tolerance * plain.abs().max().item()):
            reason = f"its logits differed by {(shared - plain).abs().max().item():.3g} with a shared prefix"
        else:
            return None
    except Exception as error:  # noqa: BLE001 - sliding windows, soft-capping, position biases, odd layouts
        reason = f"{type(error).__name__}: {error}"
    model.set_attn_implementation(implementation)
    return reason


def _last_logits(model, cache_kwarg, tokens, start, cache):
    positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)[None]
    output = model(input_ids=tokens, attention_mask=torch.ones_like(tokens), position_ids=positions, use_cache=True,
                   **{cache_kwarg: cache})
    return output.logits[0, -1]
