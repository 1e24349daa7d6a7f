"""executor/kv_manager.py on its own (a tiny random model built here gives the cache's shapes): what a prompt
takes from the prefix cache, what is remembered and when a prompt waits for a block being computed."""

from array import array

import pytest
import torch

from executor.kv_manager import MIN_REUSED_TOKENS, KVManager
from executor.model_runner import cache_kwarg
from executor.sequence import Sequence
from executor.validation import SamplingSettings
from tiny_models import new_llama

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    return new_llama()


@pytest.fixture
def kv(model):
    return KVManager(model, CPU, cache_kwarg(model), kv_cache_memory=None, max_rows=4, max_context=128,
                     block_size=16, prefix_caching=True)


def sequence(tokens) -> Sequence:
    return Sequence(request_id=0, prompt_ids=array("i", tokens), settings=SamplingSettings(max_new_tokens=8),
                    emit=None, detok=None)


def computed(kv, tokens) -> Sequence:
    """A sequence whose whole context was computed: each token's keys say which token it is."""
    seq = sequence(tokens)
    kv.stage(seq)
    seq.cache.write([(torch.tensor(tokens, dtype=torch.float32).view(1, -1, 1).expand(s.kv_heads, -1, s.key_dim),
                      torch.zeros((s.kv_heads, len(tokens), s.value_dim))) for s in kv.shapes], 0)
    seq.prefilled = len(tokens)
    return seq


def staged_keys(seq, count) -> list:
    """The first ``count`` keys the sequence reads (layer 0, head 0, channel 0): its shared prefix where the
    prefix cache keeps it, then its own row."""
    cache, keys = seq.cache, []
    if cache.shared is not None:
        blocks, _ = cache.shared.cache.block_views[0]
        keys = blocks[torch.tensor(cache.shared.block_indices())][:, 0, :, 0].flatten().tolist()
    own = count - cache.shared_tokens
    if own > 0:
        own_keys, _ = cache.tokens(cache.shared_tokens, count)[0]
        keys += own_keys[0, :, 0].tolist()
    return keys[:count]


def test_a_prompt_takes_the_whole_cached_blocks_of_its_prefix_by_reference(kv):
    assert kv.sharing, "the tiny llama attends through the interface: hits are read in place"
    shared = list(range(1, 81))  # 5 blocks
    first = computed(kv, shared + [90, 91])
    kv.remember_prefill(first, first.context_ids())
    second = sequence(shared + [92, 93, 94])
    kv.stage(second)  # at admission: the cached prefix is pinned and the row holds only what follows it
    assert second.prefilled == second.cached_tokens == 80
    assert second.cache.shared.tokens == 80 and second.cache.length == 3
    assert kv.batch.copied_bytes["hit"] == 0, "a hit by reference copies nothing"
    keys, _ = kv.prefix.block_views[0]
    read = keys[torch.tensor(second.cache.shared.block_indices())][:, 0, :, 0].flatten().tolist()
    assert read == [float(t) for t in shared]
    assert kv.prefix.pinned_blocks == 5
    kv.release(second)
    assert kv.prefix.pinned_blocks == 0


def test_a_prompt_copies_the_whole_cached_blocks_of_its_prefix_when_the_model_cannot_share(kv):
    kv.sharing = False  # as for a model whose attention does not come through the interface
    shared = list(range(1, 81))  # 5 blocks
    first = computed(kv, shared + [90, 91])
    kv.remember_prefill(first, first.context_ids())
    second = sequence(shared + [92, 93, 94])
    kv.reuse_cached_prefix(second, second.context_ids())
    assert second.prefilled == second.cached_tokens == 80
    assert staged_keys(second, 80) == [float(t) for t in shared]
    assert kv.batch.copied_bytes["hit"] == 80 * kv.batch.token_bytes


def test_the_last_prompt_token_is_always_computed_and_short_prefixes_are_not_reused(kv):
    tokens = list(range(1, 81))
    kv.remember_prefill(computed(kv, tokens), tokens)
    same = sequence(tokens)
    kv.reuse_cached_prefix(same, same.context_ids())
    assert same.prefilled == 64  # not 80: the last token's logits choose the first new token
    short = sequence(tokens[:MIN_REUSED_TOKENS - 16] + [95] * 40)  # 3 cached blocks: cheaper to recompute
    kv.reuse_cached_prefix(short, short.context_ids())
    assert short.prefilled == 0, "staged (its row is taken first), but nothing copied in"


def test_a_prompt_waits_for_the_blocks_an_earlier_prompt_is_computing(kv):
    shared = list(range(1, 97))  # 6 blocks
    first, second = sequence(shared + [1, 2, 3]), sequence(shared + [4, 5, 6])
    claimed = kv.claimed_blocks([first, second])
    assert not kv.waits_for_a_shared_block(first, first.context_ids(), claimed)
    assert kv.waits_for_a_shared_block(second, second.context_ids(), claimed)
    other = sequence(list(range(2, 98)) + [7])
    assert not kv.waits_for_a_shared_block(other, other.context_ids(), kv.claimed_blocks([first, other]))


def test_rows_leaving_the_batch_leave_their_prompt_and_answer_blocks_behind(kv):
    tokens = list(range(1, 40))
    seq = computed(kv, tokens)
    kv.batch.join(seq.cache, len(tokens))
    seq.cache, seq.generated = None, list(range(40, 60))  # 19 more tokens cached as it decoded
    for _ in range(20):
        kv.batch.start_step(1)
        kv.batch.end_step(1)
    kv.remember_rows([seq], [0])
    assert len(kv.prefix.match(seq.tokens(), 64)) == 3  # 58 tokens cached: 3 whole blocks
    assert kv.prefix.match(tokens, 32)[0].tokens == tuple(range(1, 17))


def test_a_row_with_rejected_drafts_leaves_only_the_tokens_it_holds(kv):
    """Rejected drafts are holes in a row's span when another row of the same step kept more. What the row
    leaves in the prefix cache is its held tokens, gathered around the holes: here it spans 84 columns but
    holds 72, so four whole blocks, never a fifth read past its last held token."""
    prompt = list(range(1, 61))
    seq, other = computed(kv, prompt), computed(kv, list(range(200, 260)))
    kv.batch.join(seq.cache, 60)
    kv.batch.join(other.cache, 60)
    seq.cache = other.cache = None
    seq.generated = list(range(100, 113))  # 112 is its next input: not in the cache yet
    steps = (([100, 101, 102, 777, 778, 779, 780], 3), ([103, 104, 888, 889, 890, 891, 892], 2),
             ([105, 106, 107, 108, 109, 110, 999], 6), ([111, 555, 556], 1))
    for inputs, kept in steps:
        width = len(inputs)
        kv.batch.start_step(width)
        for layer in kv.batch.layers:
            heads, dim = layer.keys.shape[1], layer.keys.shape[3]
            keys = torch.stack([torch.tensor(inputs, dtype=torch.float32), torch.zeros(width)])
            layer.update(keys.view(2, 1, width, 1).expand(2, heads, width, dim),
                         torch.zeros((2, heads, width, layer.values.shape[3])))
        kv.batch.commit_step(width, [kept, width])  # the other row keeps its whole draft
    assert kv.batch.held(0) == 72 == len(seq.context_ids()) and kv.batch.lengths[0] == 84
    kv.remember_rows([seq, other], [0])
    follow_up = sequence(seq.tokens() + [5])
    kv.reuse_cached_prefix(follow_up, follow_up.context_ids())
    assert follow_up.prefilled == 64  # the fourth block ends with 100, 101, 102 and, after 4 holes, 103
    assert staged_keys(follow_up, 64) == [float(t) for t in prompt + list(range(100, 104))]


def test_release_gives_the_staged_row_back_and_a_preempted_sequence_starts_over(kv):
    sequences = [computed(kv, [1, 2, 3]) for _ in range(kv.batch.max_rows)]
    with pytest.raises(RuntimeError, match="no free row"):
        kv.stage(sequence([4]))
    kv.release(sequences[0])
    assert sequences[0].cache is None
    kv.stage(sequence([4]))  # its row is free again
    kv.forget_computed(sequences[1])
    assert sequences[1].prefilled == 0 and sequences[1].cache is None


def small_pool(model, tokens: int) -> KVManager:
    from executor.kv_cache import probe_layer_shapes

    per_token = sum(s.bytes_per_token for s in probe_layer_shapes(model, CPU))
    return KVManager(model, CPU, cache_kwarg(model), kv_cache_memory=tokens * per_token, max_rows=4, max_context=200,
                     block_size=16, prefix_caching=True)


def running_row(kv, tokens) -> Sequence:
    seq = computed(kv, tokens)
    kv.batch.join(seq.cache, len(tokens))
    seq.cache = None
    return seq


def asking(tokens, max_new_tokens) -> Sequence:
    return Sequence(request_id=1, prompt_ids=array("i", tokens), settings=SamplingSettings(max_new_tokens=max_new_tokens),
                    emit=None, detok=None)


def test_admission_counts_the_cached_blocks_a_prompt_would_pin_as_taken(model):
    """Cached blocks give way to the batch, except those a row reads in place: pinned, they no longer do. A
    prompt that fits beside the running row only while its cached prefix could still be evicted waits."""
    kv = small_pool(model, 320)
    shared = list(range(1, 81))  # 5 blocks, cached and not pinned
    first = computed(kv, shared + [90, 91])
    kv.remember_prefill(first, first.context_ids())
    kv.release(first)
    running_row(kv, list(range(200, 350)))  # 150 tokens: 160 of the 320 slots
    reader = asking(shared + list(range(400, 420)), 8)  # 100 tokens
    assert kv.prefix.unpinned(kv.prefix.match(reader.context_ids(), 99)) == 5
    assert kv.batch.room_for_row(20 + 8), "beside the running row while the cached blocks give way"
    assert not kv.room_for(reader), "two rows of 160 beside 80 pinned tokens: more than 320"
    other = asking(list(range(500, 600)), 8)  # as long, reading nothing in place: the cached blocks give way
    assert kv.room_for(other)


def test_admission_leaves_room_for_the_first_tokens_of_the_answer(model):
    """A prompt that fits beside the running row but whose answer's first tokens would not is not admitted
    (it would be preempted within steps, its prefill wasted); with a short answer to give it is."""
    kv = small_pool(model, 320)
    running_row(kv, list(range(200, 350)))  # 150 tokens: 160 of the 320 slots
    prompt = list(range(500, 600))
    assert kv.room_for(asking(prompt, 8))
    assert not kv.room_for(asking(prompt, 64)), "100 prompt + 64 answer tokens: two rows of 165 > 320"
