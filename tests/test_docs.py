"""The README and docs/ say only what the code does: links resolve, commands use real flags, keys exist."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from atp_ray.cli import build_parser
from atp_ray.config import RunConfig
from atp_ray.search.space import SearchSpace

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250  # a page for users; measurements go to docs/results.md, history to CHANGELOG.md

LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
COMMAND = re.compile(r"atp-ray ((?:cluster )?[a-z][a-z-]*)\b(.*)")
BENCH = re.compile(r"python -m bench\.(\w+)(.*)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z-]*)")
# a run-config or search-space key written as `section.key` (inline code) or section.key=value
DOTTED = re.compile(r"(?:`|(?<![\w./-]))([a-z_]+)\.([a-z_]+)(?==|`|:)")
NOT_KEYS = {"key", "json", "jsonl", "yaml", "md", "py", "pt", "safetensors", "csv", "parquet", "png", "html"}


def anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {anchor(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


def code_lines(path: Path) -> list[str]:
    """The lines of a document's fenced code blocks, with backslash continuations joined."""
    blocks = FENCE.findall(path.read_text())
    return [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """'train' -> its parser, 'cluster submit' -> its parser, ..."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[name] = sub
                found.update({f"{name} {verb}": p for verb, p in subparsers(sub).items()})
    return found


def section_fields() -> dict[str, set[str]]:
    """Sections of a run config and of a search space, and the fields each one has."""
    sections: dict[str, set[str]] = {}
    for model in (RunConfig, SearchSpace):
        for name, field in model.model_fields.items():
            kind = field.annotation
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                sections.setdefault(name, set()).update(kind.model_fields)
    return sections


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_resolve(doc):
    problems = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, fragment = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            problems.append(f"{target}: no such file")
        elif fragment and file.suffix == ".md" and fragment not in anchors(file):
            problems.append(f"{target}: no heading #{fragment} in {file.name}")
    assert not problems, f"{doc.name}: " + "; ".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_commands_use_real_flags(doc):
    commands = subparsers(build_parser())
    problems = []
    for line in code_lines(doc):
        line = line.split(" #")[0]  # a comment may say "atp-ray with ..."
        for verb, rest in COMMAND.findall(line):
            if verb not in commands:
                problems.append(f"atp-ray {verb}: no such command")
                continue
            known = {o for a in commands[verb]._actions for o in a.option_strings}
            problems += [f"atp-ray {verb} {f}: no such option" for f in FLAG.findall(rest) if f not in known]
        for bench, rest in BENCH.findall(line):
            source = ROOT / "bench" / f"{bench}.py"
            if not source.is_file():
                problems.append(f"bench.{bench}: no such bench")
                continue
            text = source.read_text()
            problems += [f"bench.{bench} {f}: no such option" for f in FLAG.findall(rest) if f'"{f}"' not in text]
    assert not problems, f"{doc.name}: " + "; ".join(problems)


@pytest.mark.parametrize("doc", [d for d in DOCS if d.name != "CHANGELOG.md"], ids=lambda p: p.name)
def test_config_keys_exist(doc):
    # CHANGELOG.md may name keys that were removed since
    sections = section_fields()
    problems = sorted(
        {
            f"{section}.{key}"
            for section, key in DOTTED.findall(doc.read_text())
            if section in sections and key not in sections[section] and key not in NOT_KEYS
        }
    )
    assert not problems, f"{doc.name} names keys the configs do not have: {problems}"


def _paragraph(doc: str, marker: str) -> str:
    """The paragraph (or table row) of a document that contains ``marker``."""
    text = (ROOT / doc).read_text()
    found = [p for p in re.split(r"\n\s*\n|\n(?=\|)", text) if marker in p]
    assert found, f"{doc}: nothing mentions {marker}"
    return found[0]


def _quoted(text: str) -> set[str]:
    return set(re.findall(r"`([\w-]+)`", text))


def test_the_objectives_table_is_the_registry():
    from atp_ray.search.objectives import OBJECTIVES

    section = (ROOT / "docs" / "search.md").read_text().split("## Objectives")[1].split("\n## ")[0]
    rows = re.findall(r"^\| `(\w+)` \| (min|max) \|", section, re.M)
    assert dict(rows) == {name: kind.mode for name, kind in OBJECTIVES.items()}


@pytest.mark.parametrize(
    "doc, marker, registry",
    [
        ("docs/search.md", "| `sampler` |", "atp_ray.search.samplers:SAMPLERS"),
        ("docs/distributed.md", "| `strategy` |", "atp_ray.runtime.strategies:STRATEGIES"),
        ("docs/method.md", "`baseline.importance`:", "atp_ray.pruning.importance:IMPORTANCE"),
        ("docs/method.md", "one per `method`", "atp_ray.training.mask_sources:MASK_SOURCES"),
        ("docs/method.md", "Supported: Llama", "atp_ray.models:MODEL_FAMILIES"),
    ],
    ids=lambda v: v if isinstance(v, str) and ":" in v else "",
)
def test_docs_name_every_registered_choice(doc, marker, registry):
    """A choice added to a registry is documented where users choose it."""
    import importlib

    module, name = registry.split(":")
    names = set(getattr(importlib.import_module(module), name))
    missing = names - _quoted(_paragraph(doc, marker))
    assert not missing, f"{doc} does not name {sorted(missing)}"
