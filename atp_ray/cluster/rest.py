"""A small client of the Ray job REST API (the dashboard's), authenticated by the cluster's token."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from atp_ray.errors import ClusterError


def answers(address: str, token_path: Path) -> bool:
    """Does a Ray job API answer at ``address`` to our token?"""
    try:
        get_json(f"{address}/api/version", token_path, timeout=3)
        return True
    except (OSError, ClusterError):
        return False


def get_json(url: str, token_path: Path, timeout: float = 10) -> Any:
    """GET ``url`` with the token in ``token_path``; an HTTP error raises :class:`ClusterError`."""
    return _call(urllib.request.Request(url), token_path, timeout)


def post_json(url: str, token_path: Path, timeout: float = 30) -> Any:
    """POST an empty body to ``url`` with the token in ``token_path``; its JSON answer, if any."""
    return _call(urllib.request.Request(url, data=b"", method="POST"), token_path, timeout)


def _call(request: urllib.request.Request, token_path: Path, timeout: float) -> Any:
    token = token_path.read_text().strip() if token_path.is_file() else ""
    request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        raise ClusterError(f"{request.full_url}: HTTP {err.code} {err.reason}") from None
