"""Quality metrics of a causal LM, in plain torch: perplexity, multiple-choice accuracy, ROUGE.

Inputs arrive tokenized and already fitted to the model's length limit (see
``atp_ray.evaluation.tasks``); each metric returns a :class:`Score` that carries its sample count.
Models are called as ``model(input_ids=..., attention_mask=...).logits``, so a masked model
(inside ``atp_ray.pruning.masking.masked``) or a compressed one is scored the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache, PreTrainedTokenizerBase

from atp_ray.data.batches import IGNORE_INDEX, TokenBlocks, pad
from atp_ray.data.formats import ChoiceQuestion, GenerationPrompt, Pair

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@dataclass
class Score:
    """Metric values of one task and the number of samples (blocks, questions, prompts) behind them."""

    values: dict[str, float | int]
    samples: int


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _target_log_probs(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Log-probability of every label token given the tokens before it, and where labels are real.

    Returns two ``[batch, seq_len - 1]`` tensors: log p(labels[t + 1] | ids[: t + 1]) (0 where
    the label is ignored) and the mask of real labels.
    """
    device = _device(model)
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    return _label_log_probs(logits[:, :-1], batch["labels"][:, 1:].to(device))


def _label_log_probs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """log softmax(logits)[label] at every position (0 where the label is ignored), and where labels are real."""
    real = labels != IGNORE_INDEX
    log_probs = -F.cross_entropy(logits.float().transpose(1, 2), labels.masked_fill(~real, 0), reduction="none")
    return log_probs * real, real


@torch.no_grad()
def perplexity(model: nn.Module, blocks: TokenBlocks, batch_size: int = 8) -> Score:
    """exp(mean negative log-likelihood) over every target token of ``blocks``."""
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        index = torch.arange(start, min(start + batch_size, len(blocks)))
        log_probs, real = _target_log_probs(model, blocks.select(index))
        total -= float(log_probs.sum())
        count += int(real.sum())
    loss = total / count
    return Score({"perplexity": math.exp(loss), "loss": loss, "tokens": count}, samples=len(blocks))


@torch.no_grad()
def choice_log_likelihoods(model: nn.Module, question: ChoiceQuestion, pad_id: int) -> tuple[Tensor, Tensor]:
    """Summed log-likelihood of each choice's tokens given its context, and each choice's token count.

    The context the choices share is encoded once, and its KV cache serves every choice: a
    question with a long stem and short answers costs little more than one forward pass.
    """
    shared = _shared_prompt_length(question.choices)
    if shared == 0:  # nothing to reuse: every choice from its first token
        longest = max(len(p.prompt) + len(p.continuation) for p in question.choices)
        blocks = pad(question.choices, longest, pad_id)
        log_probs, real = _target_log_probs(model, blocks.select(torch.arange(len(blocks))))
        return log_probs.sum(dim=1).cpu(), real.sum(dim=1).cpu()
    device, count = _device(model), len(question.choices)
    stem = torch.tensor([question.choices[0].prompt[:shared]], device=device)
    cache = DynamicCache(config=model.config)
    encoded = model(input_ids=stem, attention_mask=torch.ones_like(stem), cache=cache, use_cache=True)
    cache.batch_repeat_interleave(count)
    rests = [Pair(p.prompt[shared:], p.continuation) for p in question.choices]
    blocks = pad(rests, max(1, max(len(r.prompt) + len(r.continuation) for r in rests)), pad_id)
    attention_mask = torch.cat([torch.ones(count, shared, dtype=torch.long), blocks.attention_mask], dim=1)
    logits = model(
        input_ids=blocks.input_ids.to(device), attention_mask=attention_mask.to(device), cache=cache, use_cache=True
    ).logits
    # The stem's last position predicts each rest's first token; each rest position the next one.
    logits = torch.cat([encoded.logits[:, -1:].expand(count, -1, -1), logits[:, :-1]], dim=1)
    log_probs, real = _label_log_probs(logits, blocks.labels.to(device))
    return log_probs.sum(dim=1).cpu(), real.sum(dim=1).cpu()


def _shared_prompt_length(choices: list[Pair]) -> int:
    """Tokens at the start of every choice's context that all choices share."""
    shortest = min(len(p.prompt) for p in choices)
    first = choices[0].prompt
    for i in range(shortest):
        if any(p.prompt[i] != first[i] for p in choices[1:]):
            return i
    return shortest


@torch.no_grad()
def multiple_choice_accuracy(model: nn.Module, questions: list[ChoiceQuestion], pad_id: int) -> Score:
    """Share of questions whose right choice is the most likely one.

    ``accuracy`` ranks choices by summed log-likelihood; ``accuracy_norm`` by log-likelihood
    per token, which does not favour short choices.
    """
    hits = {"accuracy": 0, "accuracy_norm": 0}
    for question in questions:
        summed, tokens = choice_log_likelihoods(model, question, pad_id)
        hits["accuracy"] += int(summed.argmax()) == question.answer
        hits["accuracy_norm"] += int((summed / tokens.clamp(min=1)).argmax()) == question.answer
    return Score({k: v / len(questions) for k, v in hits.items()}, samples=len(questions))


@torch.no_grad()
def greedy_generate(
    model: nn.Module, prompt: list[int], max_new_tokens: int, eos_token_id: int, pad_token_id: int
) -> list[int]:
    """The tokens greedy decoding adds after ``prompt``: at most ``max_new_tokens``, stopping at EOS."""
    ids = torch.tensor([prompt], device=_device(model))
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    new = out[0, ids.shape[1] :].tolist()
    return new[: new.index(eos_token_id)] if eos_token_id in new else new


def rouge(predictions: list[str], references: list[str]) -> Score:
    """Mean ROUGE-1/2/L F1 (rouge-score, Porter stemming) of predictions against references."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        for name, value in scorer.score(reference, prediction).items():
            totals[name] += value.fmeasure
    return Score({k: v / len(predictions) for k, v in totals.items()}, samples=len(predictions))


def generation_rouge(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[GenerationPrompt], max_new_tokens: int
) -> Score:
    """ROUGE of greedy generations from each prompt against its reference text."""
    predictions = [
        tokenizer.decode(
            greedy_generate(model, p.prompt, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id),
            skip_special_tokens=True,
        )
        for p in prompts
    ]
    return rouge(predictions, [p.reference for p in prompts])
