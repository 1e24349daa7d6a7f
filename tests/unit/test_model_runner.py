"""executor/model_runner.py on its own, on a tiny random model built here (no download): prefill in chunks
or together, join, remove and decode give the logits of a plain forward pass over the same tokens, and the
batch's order follows the storage's rows."""

from array import array

import pytest
import torch

from executor.kv_manager import KVManager
from executor.model_runner import ModelRunner, cache_kwarg
from executor.sequence import Sequence
from executor.validation import SamplingSettings
from tiny_models import new_llama


@pytest.fixture(scope="module")
def model():
    return new_llama()


def make_runner(model, rows=4):
    cpu = torch.device("cpu")
    kv = KVManager(model, cpu, cache_kwarg(model), kv_cache_memory=None, max_rows=rows, max_context=128,
                   block_size=16, prefix_caching=False)
    return ModelRunner(model, kv, cpu)


def sequence(tokens) -> Sequence:
    return Sequence(request_id=0, prompt_ids=array("i", tokens), settings=SamplingSettings(max_new_tokens=8),
                    emit=None, detok=None)


def reference(model, tokens) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([tokens])).logits[0, -1]


def prompt(seed, length):
    return torch.randint(1, 97, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def test_a_prompt_prefilled_in_chunks_then_decoded_matches_a_plain_forward(model):
    runner = make_runner(model)
    tokens = prompt(1, 40)
    seq = sequence(tokens)
    runner.kv.stage(seq)
    runner.prefill_chunk(seq, tokens[:32], 0)
    logits = runner.prefill_chunk(seq, tokens[32:], 32)
    seq.prefilled = 40
    torch.testing.assert_close(logits[0, -1], reference(model, tokens), atol=1e-4, rtol=1e-4)
    runner.join(seq, 5)
    assert runner.running == [seq] and seq.cache is None
    torch.testing.assert_close(runner.decode()[0], reference(model, tokens + [5]), atol=1e-4, rtol=1e-4)
    assert runner.steps == 1


@torch.inference_mode()
def test_prompts_prefilled_together_join_and_decode_row_by_row(model):
    runner = make_runner(model)
    prompts = [prompt(2, 20), prompt(3, 7), prompt(4, 13)]
    sequences = [sequence(p) for p in prompts]
    for seq in sequences:
        runner.kv.stage(seq)
    logits = runner.prefill_together([(seq, p) for seq, p in zip(sequences, prompts)])
    for row, p in enumerate(prompts):
        torch.testing.assert_close(logits[row, -1], reference(model, p), atol=1e-4, rtol=1e-4)
    for seq, token in zip(sequences, (11, 12, 13)):
        runner.join(seq, token)
    decoded = runner.decode()
    for row, (p, token) in enumerate(zip(prompts, (11, 12, 13))):
        torch.testing.assert_close(decoded[row], reference(model, p + [token]), atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_removing_a_row_keeps_every_other_rows_sequence_position_and_input_together(model):
    runner = make_runner(model)
    prompts = [prompt(5, 9), prompt(6, 17), prompt(7, 5)]
    sequences = [sequence(p) for p in prompts]
    for seq, p, token in zip(sequences, prompts, (21, 22, 23)):
        runner.kv.stage(seq)
        runner.prefill_chunk(seq, p, 0)
        seq.prefilled = len(p)
        runner.join(seq, token)
    runner.decode()
    runner.set_next_tokens([31, 32, 33])
    runner.remove_rows([0])  # the last row moves into the hole
    assert runner.running == [sequences[2], sequences[1]]
    decoded = runner.decode()
    torch.testing.assert_close(decoded[0], reference(model, prompts[2] + [23, 33]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(decoded[1], reference(model, prompts[1] + [22, 32]), atol=1e-4, rtol=1e-4)
    runner.drop_all()
    assert runner.running == [] and runner.kv.batch.rows == 0


@torch.inference_mode()
def test_a_verify_step_computes_only_its_drafted_positions_and_they_equal_a_plain_forward(model):
    """Rows with drafts of 3, 0 and 1 tokens: a width-4 step computes 4 + 1 + 2 positions in its Linear layers
    (token_packing.py); each real position's logits are those of a plain forward pass over the row's tokens."""
    runner = make_runner(model)
    prompts, nexts, drafts = [prompt(8, 9), prompt(9, 17), prompt(10, 5)], [21, 22, 23], [[5, 6, 7], [], [8]]
    for p, token in zip(prompts, nexts):
        seq = sequence(p)
        runner.kv.stage(seq)
        runner.prefill_chunk(seq, p, 0)
        seq.prefilled = len(p)
        runner.join(seq, token)
    calls = []
    for layer in runner._packing.layers:  # what each Linear layer computes (this hook runs before the unpacking)
        layer.register_forward_hook(lambda _m, _args, output: calls.append(output.shape[0]))
    logits = runner.verify(drafts)
    assert runner.verify_tokens == 7 and logits.shape[:2] == (3, 4)
    assert len(calls) == len(runner._packing.layers) and set(calls) == {7}  # each layer once, 7 positions
    for row, (p, token, draft) in enumerate(zip(prompts, nexts, drafts)):
        inputs = p + [token] + draft
        for position in range(1 + len(draft)):
            torch.testing.assert_close(logits[row, position], reference(model, inputs[:len(p) + 1 + position]),
                                       atol=1e-4, rtol=1e-4)
        assert not logits[row, 1 + len(draft):].any()  # the padding was never computed
    assert all(len(layer._forward_hooks) == 1 and not layer._forward_pre_hooks for layer in runner._packing.layers)
    runner.commit([4, 1, 2], [31, 32, 33])  # every draft kept: the next step reads them from the storage
    decoded = runner.decode()
    for row, (p, token, draft, nxt) in enumerate(zip(prompts, nexts, drafts, (31, 32, 33))):
        torch.testing.assert_close(decoded[row], reference(model, p + [token] + draft + [nxt]), atol=1e-4, rtol=1e-4)
