"""What ``atp-ray eval`` can score: a dense model, a finished ATP run (masked), or a compressed folder.

Each kind is recognised by the files its folder holds and loaded into an
:class:`EvalTarget`; the first matching kind in TARGET_KINDS wins and "dense" (hub id,
local folder or the embedded model) matches anything left.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from atp_ray.compression.compress import is_compressed, load_compressed, read_record
from atp_ray.config import DataConfig, TrainConfig, load_config
from atp_ray.errors import ConfigError
from atp_ray.models.layout import count_params
from atp_ray.pruning.masking import masked
from atp_ray.pruning.structures import Masks, PruningSpace
from atp_ray.runtime.modeling import load_model, load_run_model, load_tokenizer, resolve_model_path
from atp_ray.runtime.run_folder import RunFolder


@dataclass
class EvalTarget:
    """A loaded model to evaluate, with what a report says about it."""

    kind: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    parameters: int  # parameters it has, or keeps under its mask
    disk_bytes: int | None  # files needed to load it; None when unknown (an uncached hub id)
    data: DataConfig = field(default_factory=DataConfig)  # its domain data (a run's own)
    seed: int = field(default_factory=lambda: TrainConfig().seed)  # the seed that split that data
    mask: tuple[PruningSpace, Masks] | None = None

    @contextlib.contextmanager
    def active(self) -> Iterator[PreTrainedModel]:
        """The model as it should be scored: under its pruning mask, if it has one."""
        if self.mask is None:
            yield self.model
            return
        space, masks = self.mask
        with masked(self.model, space, masks) as model:
            yield model

    def to(self, device: torch.device) -> EvalTarget:
        self.model.to(device)
        if self.mask is not None:
            space, masks = self.mask
            self.mask = space, {g: m.to(device) for g, m in masks.items()}
        return self


def folder_bytes(*folders: Path) -> int:
    """Total size of the files under some folders."""
    return sum(f.stat().st_size for folder in folders for f in folder.rglob("*") if f.is_file())


def _model_folder(path: str) -> Path | None:
    """The local folder of a model path; for a hub id, its cached snapshot if there is one."""
    folder = Path(resolve_model_path(path)).expanduser()
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(path, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError):
        return None


def _load_dense(path: str, dtype: str) -> EvalTarget:
    model = load_model(path, dtype)
    folder = _model_folder(path)
    disk = folder_bytes(folder) if folder else None
    return EvalTarget("dense", model, load_tokenizer(path), count_params(model), disk)


def _load_run(path: str, dtype: str, sparsity: float | None = None) -> EvalTarget:
    del dtype  # a run is scored in the dtype it was trained in (its config's model.dtype)
    folder = RunFolder(Path(path))
    config = load_config(folder.config)
    model, space, masks = load_run_model(folder.root, sparsity)
    removed = space.prunable_params - int(space.kept_params(masks))
    base = _model_folder(config.model.path)
    return EvalTarget(
        kind="masked run",
        model=model,
        tokenizer=load_tokenizer(config.model.path),
        parameters=count_params(model) - removed,
        disk_bytes=folder_bytes(folder.root, base) if base else None,
        data=config.data,
        seed=config.train.seed,
        mask=(space, masks),
    )


def _load_compressed(path: str, dtype: str) -> EvalTarget:
    model = load_compressed(path, dtype)
    target = EvalTarget("compressed", model, load_tokenizer(path), count_params(model), folder_bytes(Path(path)))
    record = read_record(path)
    if record.training_data is not None:  # score the held-out split of the run it came from
        target.data = DataConfig.model_validate(record.training_data)
        target.seed = record.seed
    return target


def _is_run(path: str) -> bool:
    folder = RunFolder(Path(path))
    return folder.config.is_file() and folder.mask.is_file()


TARGET_KINDS: tuple[tuple[Callable[[str], bool], Callable[[str, str], EvalTarget]], ...] = (
    (_is_run, _load_run),
    (is_compressed, _load_compressed),
    (lambda _path: True, _load_dense),
)


def load_target(path: str, dtype: str = "float32", sparsity: float | None = None) -> EvalTarget:
    """Load whatever ``path`` names: a run folder, a compressed folder, or a dense model.

    ``sparsity`` picks the budget of an elastic run folder (see ``RunFolder.read_mask``).
    """
    if sparsity is not None:
        if not _is_run(path):
            raise ConfigError([f"--sparsity: {path} is not a run folder (only a run's masks have budgets to choose)"])
        return _load_run(path, dtype, sparsity)
    return next(load(path, dtype) for matches, load in TARGET_KINDS if matches(path))
