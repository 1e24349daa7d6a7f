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
prefix) is plain ``sdpa_attention_forward``, unchanged. Architectures whose attention does not come through
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

log = logging.getLogger("jina_llm_stream.attention")

NAME = "jina_shared_prefix"


@dataclass
class PrefixGroup:
    """Rows of one forward pass (``rows``: their indices) that share one cached prefix: ``blocks`` of the
    pool (a slice for one ascending run, else an index tensor), ``tokens`` long."""

    rows: torch.Tensor
    blocks: object
    tokens: int


@dataclass
class SharedPrefixPass:
    """What one forward pass reads besides each row's own storage: the groups of rows with a shared prefix,
    and every layer's blocks view of the pool (``[blocks, kv_heads, block_size, dim]``)."""

    groups: list
    block_views: list
    layers_seen: set = field(default_factory=set)


SHARED: contextvars.ContextVar = contextvars.ContextVar("jina_shared_prefix_pass", default=None)


def shared_prefix_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                            **kwargs):
    """``sdpa_attention_forward`` plus, for the rows of ``SHARED``'s groups, their shared prefix."""
    current = SHARED.get()
    if current is None or not current.groups:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None \
            or kwargs.get("position_bias") is not None or (dropout and module.training):
        raise RuntimeError("a shared prefix was read by a layer with soft-capping, a sliding window, a position "
                           "bias or dropout: enable_shared_prefix refuses such a model")
    layer = module.layer_idx
    current.layers_seen.add(layer)
    keys_blocks, values_blocks = current.block_views[layer]
    rows, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    grouped = heads // kv_heads * q_len  # query rows per key/value head: heads sharing it x positions
    scale = scaling if scaling is not None else dim ** -0.5
    # Queries grouped by their key/value head (GQA without repeating keys): [rows, kv_heads, grouped, dim].
    queries = query.reshape(rows, kv_heads, grouped, dim)
    scores = torch.matmul(queries, key.transpose(-1, -2)).mul_(scale)
    scores.masked_fill_(~_own_mask(attention_mask, rows, heads // kv_heads, q_len, key.shape[2], query.device),
                        float("-inf"))
    peak = scores.amax(dim=-1, keepdim=True).clamp_(min=-1e30)  # a row with every own column masked: no NaN
    weights = scores.sub_(peak).exp_()
    total = weights.sum(dim=-1, keepdim=True)
    out = torch.matmul(weights, value.to(weights.dtype))
    for group in current.groups:
        _merge_prefix(group, queries, scale, keys_blocks, values_blocks, peak, total, out)
    out = out.div_(total).to(query.dtype)
    return out.reshape(rows, heads, q_len, -1).transpose(1, 2).contiguous(), None


def _own_mask(attention_mask, rows: int, repeat: int, q_len: int, columns: int, device) -> torch.Tensor:
    """The boolean mask of the rows' own columns, ``[rows, 1, repeat * q_len, columns]`` (grouped queries)."""
    if attention_mask is None:  # sdpa's convention: no mask means causal over the last q_len columns
        mask = torch.ones((q_len, columns), dtype=torch.bool, device=device).tril_(columns - q_len)[None, None]
    else:
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    mask = mask[..., -columns:].expand(rows, 1, q_len, columns)
    return mask.repeat(1, 1, repeat, 1) if repeat > 1 else mask


def _merge_prefix(group, queries, scale, keys_blocks, values_blocks, peak, total, out) -> None:
    """Attend the group's queries to its shared blocks and merge into the rows' running statistics (peak,
    total of exponentials, unnormalised output), in place."""
    rows = group.rows
    count, kv_heads, grouped, dim = queries[rows].shape
    stacked = queries[rows].transpose(0, 1).reshape(kv_heads, count * grouped, dim)
    # The shared blocks as one [kv_heads, tokens, dim] operand (a gather, once per group per layer: read by
    # all the group's rows in one product; small, many-block products ran several times slower).
    keys, values = (_as_tokens(blocks_view[group.blocks]) for blocks_view in (keys_blocks, values_blocks))
    scores = torch.matmul(stacked, keys.transpose(-1, -2)).mul_(scale)  # [kv_heads, queries, tokens]
    prefix_peak = scores.amax(dim=-1, keepdim=True)
    weights = scores.sub_(prefix_peak).exp_()
    prefix_total = weights.sum(dim=-1, keepdim=True)
    prefix_out = torch.matmul(weights, values.to(weights.dtype))  # [kv_heads, queries, dim]

    def per_row(tensor):  # [kv_heads, count * grouped, x] -> [count, kv_heads, grouped, x]
        return tensor.reshape(kv_heads, count, grouped, -1).transpose(0, 1)

    prefix_peak, prefix_total, prefix_out = per_row(prefix_peak), per_row(prefix_total), per_row(prefix_out)
    own_peak = peak[rows]
    both = torch.maximum(own_peak, prefix_peak)
    own_factor, prefix_factor = (own_peak - both).exp_(), (prefix_peak - both).exp_()
    peak[rows] = both
    total[rows] = total[rows] * own_factor + prefix_total * prefix_factor
    out[rows] = out[rows] * own_factor + prefix_out * prefix_factor


def _as_tokens(blocks: torch.Tensor) -> torch.Tensor:
    """``[blocks, kv_heads, size, dim]`` -> ``[kv_heads, blocks * size, dim]``."""
    count, kv_heads, size, dim = blocks.shape
    return blocks.transpose(0, 1).reshape(kv_heads, count * size, dim)


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
    tokens = torch.arange(1, 2 * block_size + 3, device=device).remainder_(model.config.vocab_size - 1).add_(1)[None]
    model.set_attn_implementation(NAME)
    try:
        plain = _last_logits(model, cache_kwarg, tokens, 0, DynamicCache())
        first = DynamicCache()
        _last_logits(model, cache_kwarg, tokens[:, :block_size], 0, first)
        views = [(layer.keys, layer.values) for layer in first.layers]  # one block: [1, kv_heads, size, dim]
        current = SharedPrefixPass([PrefixGroup(torch.tensor([0], device=device), slice(0, 1), block_size)], views)
        token = SHARED.set(current)
        try:
            shared = _last_logits(model, cache_kwarg, tokens[:, block_size:], block_size, DynamicCache())
        finally:
            SHARED.reset(token)
        if len(current.layers_seen) != len(first.layers):
            reason = f"{len(current.layers_seen)} of its {len(first.layers)} layers attend through the interface"
        elif not torch.allclose(shared.float(), plain.float(), rtol=1e-3, atol=1e-3 * plain.abs().max().item()):
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
