"""What the run benches share: the configs they compare and a timed run of one of them.

``--quick`` replaces the embedded model by a tiny random Llama that reads the embedded
tokenizer (saved to a temp folder; nothing is downloaded), with few steps and documents,
so a test can check that a script runs and prints its table; its numbers mean nothing.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from atp_ray.config import load_config
from atp_ray.errors import ConfigError
from atp_ray.runtime.modeling import load_tokenizer
from atp_ray.evaluation.eval_recipe import run_eval
from atp_ray.runtime.run_folder import RunFolder, atomic_write_json
from atp_ray.training.atp import run_atp

EMBEDDED_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "embedded.yaml"

# Small enough for a test on 2 cores: a few seconds per run.
QUICK_OVERRIDES = {
    "data": {"seq_len": 32, "max_documents": 200},
    "lora": {"rank": 4, "alpha": 8},
    "atp": {"freeze_patience": 2},
    "train": {"steps": 4, "batch_size": 2, "calibration_batch_size": 2, "log_every": 2, "checkpoint_every": 100},
    "baseline": {"calibration_batches": 2},
}


def quick_model(folder: Path) -> Path:
    """A tiny random GQA Llama with the embedded model's tokenizer, saved in ``folder``."""
    tokenizer = load_tokenizer("embedded:smollm2-135m-instruct")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def base_config(quick: bool, workdir: Path) -> dict[str, Any]:
    """The raw run config every compared run starts from: configs/embedded.yaml, or its quick form."""
    raw = yaml.safe_load(EMBEDDED_CONFIG.read_text())
    if quick:
        raw["model"]["path"] = str(quick_model(workdir / "tiny-model"))
        for section, values in QUICK_OVERRIDES.items():
            raw[section] = {**raw.get(section, {}), **values}
    return raw


def with_overrides(raw: dict[str, Any], **sections: Any) -> dict[str, Any]:
    """A copy of ``raw`` with top-level keys or sections updated (sections merge key by key)."""
    out = copy.deepcopy(raw)
    for key, value in sections.items():
        out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


def timed_run(raw: dict[str, Any], out: Path) -> tuple[dict[str, Any], float]:
    """Run one config into ``out``; returns its summary and wall seconds (setup, training, save)."""
    config = load_config(raw)
    start = time.perf_counter()
    summary = run_atp(config, out)
    return summary, time.perf_counter() - start


def finished_in(raw: dict[str, Any], out: Path) -> bool:
    """Whether ``out`` (a kept folder) holds ``raw``'s run, finished.

    The saved config is read through today's schema: a run made before a knob existed is that
    knob at its default (a new knob's default keeps the old behaviour), so it need not train again.
    A saved config today's schema refuses (a knob renamed or gone) is another run.
    """
    folder = RunFolder(out)
    if not folder.is_finished():
        return False
    try:
        saved = load_config(folder.read_config())
    except ConfigError:
        return False
    return saved.to_dict() == load_config(raw).to_dict()


def refuse_stale(runs: list[tuple[dict[str, Any], Path]]) -> None:
    """Stop before anything trains if a kept folder holds a finished run of another config.

    Such a folder (a method or knob changed since) cannot take the new run, and finding that
    out when its turn comes would stop a long bench hours in.
    """
    stale = [str(out) for raw, out in runs if RunFolder(out).is_finished() and not finished_in(raw, out)]
    if stale:
        raise SystemExit(
            "these kept folders hold finished runs of another config; move them away or choose another --keep:\n  "
            + "\n  ".join(stale)
        )


def kept_or_run(raw: dict[str, Any], out: Path) -> dict[str, Any]:
    """The summary of ``raw``'s run in ``out``: read when a kept folder holds it finished, else trained now."""
    if finished_in(raw, out):
        return json.loads(RunFolder(out).summary.read_text())
    return timed_run(raw, out)[0]


# score name -> (eval task, the value read from it)
SCORES = {"ppl": ("domain-ppl", "perplexity"), "hpo": ("hpo-term", "accuracy"), "icd": ("icd10-chapter", "accuracy")}


def score(path: Path, max_samples: int | None) -> dict[str, float]:
    """Held-out perplexity and both quizzes' accuracy of a run or model folder, as ``atp-ray eval`` scores them."""
    tasks = run_eval(str(path), sorted({task for task, _ in SCORES.values()}), max_samples=max_samples)["tasks"]
    return {name: tasks[task]["values"][value] for name, (task, value) in SCORES.items()}


def kept_or_scored(kept: Path, key: dict[str, Any], scored: Callable[[], dict[str, float]]) -> dict[str, float]:
    """``scored()``, kept in the file ``kept`` and read back from it while ``key`` is the same."""
    if kept.is_file() and (saved := json.loads(kept.read_text())).get("key") == key:
        return saved["scores"]
    scores = scored()
    atomic_write_json(kept, {"key": key, "scores": scores})
    return scores


def mean_sd(values: list[float], digits: int = 3) -> str:
    """``mean ± sd`` over seeds (sd 0 with one value)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"
