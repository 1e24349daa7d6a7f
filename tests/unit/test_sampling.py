"""executor/sampling.py on its own (a tiny random model built here, for its generation config): a row's
processors read its own history, greedy is the argmax, seeded sampling repeats, log-probabilities are those
of the scores the token was chosen from, a seeded draw depends on the seed and the position only."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from executor.sampling import RowSampler, choose_tokens
from executor.validation import SamplingSettings

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    return LlamaForCausalLM(config).eval()


def test_greedy_rows_take_the_argmax_and_report_their_logprobs(model):
    greedy = RowSampler(model, SamplingSettings(max_new_tokens=4), [1, 2], CPU)
    with_logprobs = RowSampler(model, SamplingSettings(max_new_tokens=4, logprobs=True, top_logprobs=2), [1, 2], CPU)
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(1))
    (first, none), (second, logprob) = choose_tokens([greedy, with_logprobs], logits)
    assert first == int(logits[0].argmax()) and second == int(logits[1].argmax()) and none is None
    expected = torch.log_softmax(logits[1], dim=-1)
    assert logprob.token_id == second and logprob.logprob == pytest.approx(float(expected[second]))
    assert [t for t, _ in logprob.top] == expected.topk(2).indices.tolist()


def test_a_seeded_row_draws_the_same_tokens_again_and_another_seed_differs(model):
    def draws(seed):
        sampler = RowSampler(model, SamplingSettings(max_new_tokens=20, do_sample=True, temperature=1.5, seed=seed),
                             [1], CPU)
        flat = torch.zeros(1, 50)  # every token equally likely: the generator alone decides
        tokens = []
        for _ in range(20):
            tokens.append(choose_tokens([sampler], flat)[0][0])
            sampler.accepted(tokens[-1])
        return tokens

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    assert len(set(draws(7))) > 5  # a new draw at each position


def test_a_seeded_draw_depends_on_the_seed_and_the_position_only(model):
    """What was drawn before does not matter (a speculative step may draw at a position it then discards; a
    continuation starts at a later position): the token at a position is the same."""
    def sampler():
        return RowSampler(model, SamplingSettings(max_new_tokens=20, do_sample=True, seed=5), [1, 2, 3], CPU)

    flat = torch.zeros(1, 50)
    straight, redrawn = sampler(), sampler()
    for _ in range(10):
        for _ in range(3):  # extra draws at the same position
            choose_tokens([redrawn], flat)
        expected = choose_tokens([straight], flat)[0][0]
        assert choose_tokens([redrawn], flat)[0][0] == expected
        straight.accepted(expected)
        redrawn.accepted(expected)
    later = sampler()
    for token in [0] * 7:  # a sampler that starts 7 positions in (as a continuation does) draws the same there
        later.accepted(token)
    fresh = sampler()
    for _ in range(7):
        fresh.accepted(choose_tokens([fresh], flat)[0][0])
    assert choose_tokens([later], flat)[0][0] == choose_tokens([fresh], flat)[0][0]


def test_seeded_draws_over_many_seeds_follow_the_distribution(model):
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05] + [0.0] * 45)
    scores = torch.log(probs).unsqueeze(0)
    draws = 4000
    counts = torch.zeros(50)
    for seed in range(draws):
        sampler = RowSampler(model, SamplingSettings(max_new_tokens=2, do_sample=True, temperature=1.0, top_k=0,
                                                     top_p=1.0, seed=seed), [1], CPU)
        counts[choose_tokens([sampler], scores.clone())[0][0]] += 1
    for token, p in enumerate(probs[:5].tolist()):
        assert abs(counts[token] / draws - p) < 4 * (p * (1 - p) / draws) ** 0.5, (token, counts[:5])
    assert counts[5:].sum() == 0


def test_a_rows_processors_read_its_prompt_and_accepted_tokens(model):
    sampler = RowSampler(model, SamplingSettings(max_new_tokens=4, repetition_penalty=10.0), [3], CPU)
    logits = torch.zeros(1, 50)
    logits[0, 3], logits[0, 4], logits[0, 5] = 3.0, 2.0, 1.0
    assert choose_tokens([sampler], logits.clone())[0][0] == 4  # 3 is in the prompt: penalised
    sampler.accepted(4)
    assert sampler.length == 2 and sampler.history[0, :2].tolist() == [3, 4]
    assert choose_tokens([sampler], logits.clone())[0][0] == 5  # and now 4 too
