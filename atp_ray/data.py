"""Domain data for a run: documents -> disjoint splits -> token blocks -> seeded batches.

Splits are made over documents (before packing), so no text is shared between the
training, calibration and evaluation sets; which document lands where depends only on
the seed.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from atp_ray.config import DataConfig
from atp_ray.corpora import hpo_documents
from atp_ray.errors import DataError

BUILTIN_CORPORA: dict[str, Callable[[], list[str]]] = {"builtin:hpo": hpo_documents}


@dataclass
class TokenBlocks:
    """Equal-length examples of one split: ``[num_blocks, seq_len]`` each; labels -100 are ignored."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: Tensor) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index], "labels": self.labels[index]}


@dataclass
class DomainSplits:
    train: TokenBlocks
    calibration: TokenBlocks
    evaluation: TokenBlocks


def load_documents(source: str, max_documents: int | None = None) -> list[str]:
    """The documents of a data source."""
    if source not in BUILTIN_CORPORA:
        raise DataError(f"data.source: unknown source {source!r}; built-in: {', '.join(BUILTIN_CORPORA)}")
    documents = BUILTIN_CORPORA[source]()
    if not documents:
        raise DataError(f"data.source: {source!r} yielded no documents")
    return documents[:max_documents] if max_documents else documents


def pack(documents: list[str], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> TokenBlocks:
    """Concatenate documents (EOS between them) and cut into full blocks for causal LM."""
    ids: list[int] = []
    for encoded in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    usable = len(ids) // seq_len * seq_len
    if usable == 0:
        raise DataError(f"not enough text for one block of {seq_len} tokens ({len(ids)} tokens)")
    blocks = torch.tensor(ids[:usable]).view(-1, seq_len)
    return TokenBlocks(blocks, torch.ones_like(blocks), blocks.clone())


def build_splits(config: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> DomainSplits:
    """Disjoint train / calibration / evaluation blocks, reproducible from ``seed``."""
    documents = load_documents(config.source, config.max_documents)
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(order) * config.eval_fraction))
    n_calib = max(1, round(len(order) * config.calibration_fraction))
    if n_eval + n_calib >= len(order):
        raise DataError(f"{len(order)} documents are too few to split into train, calibration and evaluation")
    pick = lambda idx: [documents[i] for i in idx]  # noqa: E731
    return DomainSplits(
        evaluation=pack(pick(order[:n_eval]), tokenizer, config.seq_len),
        calibration=pack(pick(order[n_eval : n_eval + n_calib]), tokenizer, config.seq_len),
        train=pack(pick(order[n_eval + n_calib :]), tokenizer, config.seq_len),
    )


class BatchStream:
    """Batch ``step`` of an endless, seeded, per-epoch shuffled stream over a split.

    A pure function of the step, so a resumed run sees exactly the batches it would have
    seen; with ``world_size`` processes each takes its own disjoint slice of every step.
    """

    def __init__(self, blocks: TokenBlocks, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.blocks, self.batch_size, self.seed = blocks, batch_size, seed
        self.rank, self.world_size = rank, world_size

    def _order(self, epoch: int) -> Tensor:
        return torch.randperm(len(self.blocks), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def batch(self, step: int) -> dict[str, Tensor]:
        per_step = self.batch_size * self.world_size
        start = step * per_step + self.rank * self.batch_size
        positions = range(start, start + self.batch_size)
        n = len(self.blocks)
        index = torch.stack([self._order(p // n)[p % n] for p in positions])
        return self.blocks.select(index)
