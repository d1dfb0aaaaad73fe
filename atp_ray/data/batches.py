"""Domain data for a run: rows -> disjoint splits -> token blocks -> seeded batches.

Splits are made over rows (before tokenizing or packing), after dropping duplicate rows,
so no example is shared between the training, calibration and evaluation sets; which row
lands where depends only on the seed. Blocks come in one of two layouts: ``pack``
concatenates examples (EOS-separated) into full blocks, the usual causal-LM layout in which
attention may cross an example boundary; ``pad`` puts one example per block, right-padded,
with attention and labels off on the padding. Either way a prompt's tokens are never
targets (label -100).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

from atp_ray.config import DataConfig
from atp_ray.data.corpora import Row
from atp_ray.data.formats import Pair, check_columns, fit_pairs, training_pairs
from atp_ray.data.sources import Table, load_table
from atp_ray.errors import DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of tokens that are not targets (prompts, padding)


@dataclass
class TokenBlocks:
    """Equal-length examples of one split: ``[num_blocks, seq_len]`` each; labels -100 are ignored."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def head(self, n: int | None) -> TokenBlocks:
        """The first ``n`` blocks (all when None)."""
        return TokenBlocks(self.input_ids[:n], self.attention_mask[:n], self.labels[:n])

    def select(self, index: Tensor) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index], "labels": self.labels[index]}


@dataclass
class DomainSplits:
    train: TokenBlocks
    calibration: TokenBlocks
    evaluation: TokenBlocks


@dataclass
class TableSplits:
    train: Table
    calibration: Table
    evaluation: Table


# -- rows -> splits ------------------------------------------------------------------------


def unique_rows(rows: list[Row]) -> list[Row]:
    """Rows without exact duplicates (first kept), so a duplicate cannot straddle two splits."""
    seen: set[str] = set()
    unique = []
    for row in rows:
        key = json.dumps(row, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            unique.append(row)
    if len(unique) < len(rows):
        log.info("dropped %d duplicate rows of %d", len(rows) - len(unique), len(rows))
    return unique


def split_table(table: Table, calibration_fraction: float, eval_fraction: float, seed: int) -> TableSplits:
    """Disjoint evaluation / calibration / train rows (at least one each), from a seeded shuffle."""
    order = list(range(len(table.rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(order) * eval_fraction))
    n_calib = max(1, round(len(order) * calibration_fraction))
    if n_eval + n_calib >= len(order):
        raise DataError(f"{table.origin}: {len(order)} rows are too few to split into train, calibration, evaluation")
    bounds = {"evaluation": (0, n_eval), "calibration": (n_eval, n_eval + n_calib), "train": (n_eval + n_calib, None)}
    return TableSplits(
        **{
            name: Table([table.rows[i] for i in order[start:stop]], table.columns, f"{table.origin} ({name} split)")
            for name, (start, stop) in bounds.items()
        }
    )


def load_splits(config: DataConfig, seed: int) -> TableSplits:
    """The rows of each split of a data config; checks up front that the format's columns exist."""
    table = load_table(config.source, config.max_documents)
    check_columns(table, config.format)
    table = Table(unique_rows(table.rows), table.columns, table.origin)
    return split_table(table, config.calibration_fraction, config.eval_fraction, seed)


# -- pairs -> blocks -----------------------------------------------------------------------


def _labels(pair: Pair) -> list[int]:
    return [IGNORE_INDEX] * len(pair.prompt) + pair.continuation


def pack(pairs: list[Pair], seq_len: int, pad_id: int, what: str = "examples") -> TokenBlocks:
    """Concatenate examples and cut into full blocks; blocks without any target are dropped."""
    del pad_id  # full blocks need no padding
    ids = [t for p in pairs for t in p.prompt + p.continuation]
    labels = [t for p in pairs for t in _labels(p)]
    usable = len(ids) // seq_len * seq_len
    if usable == 0:
        raise DataError(f"{what}: not enough text for one block of {seq_len} tokens ({len(ids)} tokens)")
    blocks = torch.tensor(ids[:usable]).view(-1, seq_len)
    targets = torch.tensor(labels[:usable]).view(-1, seq_len)
    keep = (targets != IGNORE_INDEX).any(dim=1)
    return TokenBlocks(blocks[keep], torch.ones_like(blocks[keep]), targets[keep])


def pad(pairs: list[Pair], seq_len: int, pad_id: int, what: str = "examples") -> TokenBlocks:
    """One example per block, truncated to ``seq_len`` (with a warning naming ``what``) and right-padded."""
    pairs = fit_pairs(pairs, seq_len, what)
    input_ids = torch.full((len(pairs), seq_len), pad_id)
    attention_mask = torch.zeros((len(pairs), seq_len), dtype=torch.long)
    labels = torch.full((len(pairs), seq_len), IGNORE_INDEX)
    for i, pair in enumerate(pairs):
        n = len(pair.prompt) + len(pair.continuation)
        input_ids[i, :n] = torch.tensor(pair.prompt + pair.continuation)
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.tensor(_labels(pair))
    return TokenBlocks(input_ids, attention_mask, labels)


LAYOUTS: dict[str, Callable[[list[Pair], int, int, str], TokenBlocks]] = {"pack": pack, "pad": pad}
# Plain text packs without waste; a prompt/response example is kept whole in its own block.
DEFAULT_LAYOUT = {"text": "pack", "instruction": "pad", "multiple_choice": "pad"}


def layout_of(config: DataConfig) -> str:
    """The block layout a data config asks for, or its format's default."""
    return config.layout or DEFAULT_LAYOUT[config.format.kind]


def usable_seq_len(seq_len: int, tokenizer: PreTrainedTokenizerBase) -> int:
    """``seq_len``, capped (with a warning) at the tokenizer's declared maximum length."""
    limit = tokenizer.model_max_length
    if limit < VERY_LARGE_INTEGER and seq_len > limit:  # VERY_LARGE_INTEGER: "no limit declared"
        log.warning("data.seq_len %d exceeds the model's maximum length %d; using %d", seq_len, limit, limit)
        return limit
    return seq_len


def encode_table(table: Table, config: DataConfig, tokenizer: PreTrainedTokenizerBase) -> TokenBlocks:
    """Token blocks of a table, in a data config's format and layout."""
    # Every pair has a target: an answer or a text always ends with the end-of-turn or EOS token.
    pairs = training_pairs(table, config.format, tokenizer)
    seq_len = usable_seq_len(config.seq_len, tokenizer)
    return LAYOUTS[layout_of(config)](pairs, seq_len, tokenizer.pad_token_id, table.origin)


def build_splits(config: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> DomainSplits:
    """Disjoint train / calibration / evaluation blocks, reproducible from ``seed``."""
    splits = load_splits(config, seed)
    return DomainSplits(
        train=encode_table(splits.train, config, tokenizer),
        calibration=encode_table(splits.calibration, config, tokenizer),
        evaluation=encode_table(splits.evaluation, config, tokenizer),
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
