"""The run configs and search spaces shipped inside the package, found by name.

``configs/`` and ``search_spaces/`` live at the top of the checkout, where users read and copy
them; ``atp_ray/configs`` and ``atp_ray/search_spaces`` are links to them, so a wheel carries
both as package data and ``atp-ray train --config embedded`` works from a checkout and from an
installed wheel alike. A shipped space's ``base: ../configs/...`` resolves the same in both.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Literal

Kind = Literal["configs", "search_spaces"]


def shipped(kind: Kind) -> dict[str, Path]:
    """The shipped YAML files of one kind, by name (``embedded``, ``demo``, ...)."""
    folder = Path(str(files("atp_ray") / kind))
    return {path.stem: path for path in sorted(folder.glob("*.yaml"))}


def resolve(arg: str, kind: Kind) -> str:
    """``arg`` as given when it names a file, else the shipped file of that name (with or without
    ``.yaml``); a name neither is stays as given, for the loader to report as missing."""
    if Path(arg).is_file():
        return arg
    found = shipped(kind).get(Path(arg).name.removesuffix(".yaml")) if Path(arg).parent == Path(".") else None
    return str(found) if found is not None else arg
