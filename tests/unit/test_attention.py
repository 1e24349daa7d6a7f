"""attention.py: a shared prefix read in place, merged with each row's own columns, is exactly attention over
the prefix and the row's tokens side by side (sdpa on the concatenation), on both paths (the CPU flash
kernel's log-sum-exp, and plain products for other devices)."""

import types

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from executor import attention
from executor.kv_manager import _as_runs

BLOCK = 16


def as_index(indices: list):
    first = indices[0]
    return slice(first, first + len(indices)) if indices == list(range(first, first + len(indices))) \
        else torch.tensor(indices)


def as_blocks(indices: list):
    return _as_runs(indices, "cpu")


def reference_and_shared(rows, heads, kv_heads, q_len, own, groups, dim=32, blocks=64):
    """(sdpa over [prefix | own] per row, shared_prefix_attention over own + the groups' blocks)."""
    generator = torch.Generator().manual_seed(rows * 100 + q_len)
    keys_blocks, values_blocks = (torch.randn(blocks, kv_heads, BLOCK, dim, generator=generator) for _ in range(2))
    own_keys, own_values = (torch.randn(rows, kv_heads, own, dim, generator=generator) for _ in range(2))
    query = torch.randn(rows, q_len, heads, dim, generator=generator).transpose(1, 2)  # as the models make it
    lengths = torch.randint(q_len, own + 1, (rows,), generator=generator)
    own_mask = (torch.arange(own)[None] >= (own - lengths)[:, None])[:, None, None, :] \
        & torch.ones(q_len, own, dtype=torch.bool).tril_(own - q_len)[None, None]
    longest = max(len(b) for _, b in groups) * BLOCK
    keys, values = (torch.zeros(rows, kv_heads, longest + own, dim) for _ in range(2))
    mask = torch.zeros(rows, 1, q_len, longest + own, dtype=torch.bool)
    keys[:, :, longest:], values[:, :, longest:], mask[..., longest:] = own_keys, own_values, own_mask
    plan = []
    for group_rows, group_blocks in groups:
        index = torch.tensor(group_blocks)
        prefix_keys, prefix_values = (view[index].transpose(0, 1).reshape(kv_heads, -1, dim)
                                      for view in (keys_blocks, values_blocks))
        tokens = prefix_keys.shape[1]
        for row in group_rows:
            keys[row, :, longest - tokens:longest] = prefix_keys
            values[row, :, longest - tokens:longest] = prefix_values
            mask[row, :, :, longest - tokens:longest] = True
        plan.append(attention.PrefixGroup(as_index(group_rows), as_blocks(group_blocks), tokens))
    module = types.SimpleNamespace(layer_idx=0, num_key_value_groups=heads // kv_heads, is_causal=True, training=False)
    expected, _ = sdpa_attention_forward(module, query, keys, values, mask, scaling=dim ** -0.5)
    token = attention.SHARED.set(attention.SharedPrefixPass(plan, [(keys_blocks, values_blocks)]))
    try:
        got, _ = attention.shared_prefix_attention(module, query, own_keys, own_values, own_mask, scaling=dim ** -0.5)
    finally:
        attention.SHARED.reset(token)
    return expected, got


CASES = {
    "decode, GQA, every row shares one run of blocks": (16, 9, 3, 1, 120, [(list(range(16)), list(range(20, 53)))]),
    "decode, two prefixes, scattered rows and blocks, a row without": (5, 9, 3, 1, 80,
                                                                       [([0, 2, 4], [5, 3, 9, 1]), ([1], [10, 11])]),
    "verify step, multi-head": (3, 4, 4, 5, 60, [([0, 1, 2], list(range(2, 6)))]),
    "verify step, GQA, a row without": (3, 9, 3, 5, 60, [([0, 2], list(range(2, 6)))]),
    "prefill chunk, GQA, blocks in descending order (gathered by index)": (1, 9, 3, 40, 64,
                                                                         [([0], list(range(60, 50, -1)))]),
    "decode, a prefix stored in two runs": (4, 9, 3, 1, 50, [([0, 1, 2, 3], list(range(30, 36)) + list(range(8, 12)))]),
}


@pytest.mark.parametrize("path", ["cpu_flash", "matmul"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_shared_prefix_read_in_place_is_attention_over_the_whole_row(case, path, monkeypatch):
    if path == "matmul":
        monkeypatch.setattr(attention, "_attend_flash", attention._attend_matmul)
    expected, got = reference_and_shared(*CASES[case])
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=2e-5), (got - expected).abs().max()


def test_without_a_shared_prefix_it_is_sdpa_itself():
    module = types.SimpleNamespace(layer_idx=0, num_key_value_groups=3, is_causal=True, training=False)
    query, keys, values = torch.randn(2, 9, 1, 16), torch.randn(2, 3, 20, 16), torch.randn(2, 3, 20, 16)
    expected, _ = sdpa_attention_forward(module, query, keys, values, None)
    assert torch.equal(attention.shared_prefix_attention(module, query, keys, values, None)[0], expected)


def test_a_verify_step_without_a_shared_prefix_reads_each_kv_head_once_and_equals_sdpa(monkeypatch):
    """A few queries per row (decode/verify) go through the grouped kernel, prefill chunks stay sdpa's."""
    calls = []
    flash = attention._attend_flash
    monkeypatch.setattr(attention, "_attend_flash", lambda *args: calls.append(args[0].shape) or flash(*args))
    module = types.SimpleNamespace(layer_idx=0, num_key_value_groups=3, is_causal=True, training=False)
    for q_len, grouped in ((5, True), (attention.SMALL_QUERY + 1, False)):
        columns = q_len + 30
        query, keys, values = torch.randn(2, 9, q_len, 16), torch.randn(2, 3, columns, 16), torch.randn(2, 3, columns, 16)
        mask = torch.ones(q_len, columns, dtype=torch.bool).tril_(columns - q_len)[None, None].repeat(2, 1, 1, 1)
        mask[1, ..., :7] = False  # a shorter row, padded on the left
        expected, _ = sdpa_attention_forward(module, query, keys, values, mask)
        got, _ = attention.shared_prefix_attention(module, query, keys, values, mask)
        assert torch.allclose(got, expected, atol=2e-5), (q_len, (got - expected).abs().max())
        assert len(calls) == grouped
        calls.clear()
