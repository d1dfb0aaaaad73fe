"""Metrics on models whose outputs we know: perplexity, choice log-likelihoods, ROUGE, greedy decoding."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from atp_ray.data.batches import pad
from atp_ray.data.formats import ChoiceQuestion, Pair
from atp_ray.evaluation.evaluate import choice_log_likelihoods, greedy_generate, multiple_choice_accuracy, perplexity, rouge
from conftest import make_tiny_model


class BigramModel(nn.Module):
    """A causal LM whose next-token log-probabilities depend only on the current token: ``log_probs[token]``."""

    def __init__(self, probs: torch.Tensor):
        super().__init__()
        self.log_probs = nn.Parameter(probs.log())

    config = None  # a KV cache for it is a plain one; it never fills it

    def forward(self, input_ids, attention_mask=None, cache=None, use_cache=False):
        return SimpleNamespace(logits=self.log_probs[input_ids])


# Token 0 is the context. After it: choice [2] is likelier than a first 1, but 1 is then almost certain.
PROBS = torch.tensor(
    [
        [0.05, 0.30, 0.45, 0.20],
        [0.004, 0.99, 0.003, 0.003],
        [0.25, 0.25, 0.25, 0.25],
        [0.25, 0.25, 0.25, 0.25],
    ]
)
SHORT_VS_LONG = ChoiceQuestion([Pair([0], [2]), Pair([0], [1, 1, 1, 1])], answer=1)


def test_uniform_model_has_perplexity_equal_to_its_vocabulary():
    model = BigramModel(torch.full((4, 4), 0.25))
    blocks = pad([Pair([0, 1], [2, 3, 1]), Pair([], [1, 2])], seq_len=5, pad_id=0)
    score = perplexity(model, blocks, batch_size=1)
    assert score.values["perplexity"] == pytest.approx(4.0)
    # Targets predicted: 3 of the first row (its prompt is context only), 1 of the second.
    assert score.values["tokens"] == 4 and score.samples == 2


def test_perplexity_is_exact_on_known_probabilities():
    model = BigramModel(PROBS)
    blocks = pad([Pair([], [0, 2, 0, 1])], seq_len=6, pad_id=3)
    expected = -(math.log(0.45) + math.log(0.25) + math.log(0.30)) / 3
    assert perplexity(model, blocks).values["loss"] == pytest.approx(expected)


def test_choice_log_likelihoods_are_exact():
    summed, tokens = choice_log_likelihoods(BigramModel(PROBS), SHORT_VS_LONG, pad_id=3)
    assert summed.tolist() == pytest.approx([math.log(0.45), math.log(0.30) + 3 * math.log(0.99)], rel=1e-5)
    assert tokens.tolist() == [1, 4]


def _one_by_one(model, question: ChoiceQuestion) -> list[float]:
    """Each choice's summed log-likelihood from its own unpadded forward pass, without a cache."""
    sums = []
    for pair in question.choices:
        ids = torch.tensor([pair.prompt + pair.continuation])
        with torch.no_grad():
            log_probs = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        sums.append(sum(float(log_probs[len(pair.prompt) - 1 + i, t]) for i, t in enumerate(pair.continuation)))
    return sums


# A shared stem and answers of different lengths; stems that share a part; stems that share nothing.
QUESTIONS = {
    "shared stem": ChoiceQuestion([Pair([5, 9, 13, 2], [7]), Pair([5, 9, 13, 2], [8, 3, 11]), Pair([5, 9, 13, 2], [21, 4])], 0),
    "partly shared": ChoiceQuestion([Pair([5, 9, 13, 2], [7, 1]), Pair([5, 9, 14], [8, 3, 11, 6])], 0),
    "nothing shared": ChoiceQuestion([Pair([5, 9], [7]), Pair([6, 9], [8, 3])], 0),
}


@pytest.mark.parametrize("name", sorted(QUESTIONS))
def test_stem_encoded_once_scores_every_choice_as_its_own_forward_pass_does(tiny_model, name):
    """The KV cache of the shared stem, reused per choice, changes no score: plain or masked, every family."""
    from atp_ray.pruning.masking import masked
    from atp_ray.pruning.structures import PruningSpace
    from conftest import random_masks

    question = QUESTIONS[name]
    summed, tokens = choice_log_likelihoods(tiny_model, question, pad_id=0)
    assert summed.tolist() == pytest.approx(_one_by_one(tiny_model, question), abs=1e-4)
    assert tokens.tolist() == [len(p.continuation) for p in question.choices]
    space = PruningSpace.from_config(tiny_model.config)
    with masked(tiny_model, space, random_masks(space, keep=0.5)):
        summed, _ = choice_log_likelihoods(tiny_model, question, pad_id=0)
        assert summed.tolist() == pytest.approx(_one_by_one(tiny_model, question), abs=1e-4)


def test_summed_and_per_token_scores_pick_the_expected_choice():
    score = multiple_choice_accuracy(BigramModel(PROBS), [SHORT_VS_LONG], pad_id=3)
    # Summed log-likelihood prefers the short choice; per token, the long one wins.
    assert score.values == {"accuracy": 0.0, "accuracy_norm": 1.0} and score.samples == 1


def test_accuracy_counts_questions():
    easy = ChoiceQuestion([Pair([0], [3]), Pair([0], [2])], answer=1)
    score = multiple_choice_accuracy(BigramModel(PROBS), [easy, SHORT_VS_LONG, easy], pad_id=3)
    assert score.values["accuracy"] == pytest.approx(2 / 3) and score.samples == 3


def test_rouge_on_known_pairs():
    assert rouge(["the cat sat"], ["the cat sat"]).values == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert rouge(["dogs bark"], ["the cat sat"]).values == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    score = rouge(["the cat ran", "the cat sat"], ["the cat sat", "the cat sat"])
    # First pair: unigrams 2/3, bigrams 1/2, longest common subsequence 2/3; second pair perfect.
    assert score.values["rouge1"] == pytest.approx((2 / 3 + 1) / 2)
    assert score.values["rouge2"] == pytest.approx((1 / 2 + 1) / 2)
    assert score.values["rougeL"] == pytest.approx((2 / 3 + 1) / 2)
    assert score.samples == 2


def _argmax_continuation(model, prompt, steps):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_greedy_generation_is_argmax_and_respects_the_length_limit():
    model = make_tiny_model("llama-gqa")
    expected = _argmax_continuation(model, [5, 9, 13], steps=6)
    never = 64  # an id outside the vocabulary: EOS never comes
    assert greedy_generate(model, [5, 9, 13], max_new_tokens=6, eos_token_id=never, pad_token_id=0) == expected


def test_greedy_generation_stops_at_eos():
    model = make_tiny_model("llama-gqa")
    expected = _argmax_continuation(model, [5, 9, 13], steps=6)
    eos = expected[2]
    generated = greedy_generate(model, [5, 9, 13], max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert generated == expected[: expected.index(eos)]
