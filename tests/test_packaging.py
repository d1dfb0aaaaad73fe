"""The wheel works without the checkout: the shipped run configs and search spaces are package
data, found by name (``atp-ray train --config embedded``) from a checkout and from a wheel."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from atp_ray.config import load_config
from atp_ray.packaged import resolve, shipped

ROOT = Path(__file__).resolve().parents[1]


def test_the_package_data_is_every_config_and_space_of_the_checkout():
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["atp_ray"]
    packaged = {p.relative_to(ROOT / "atp_ray") for pattern in patterns for p in (ROOT / "atp_ray").glob(pattern)}
    on_top = {p.relative_to(ROOT) for folder in ("configs", "search_spaces") for p in (ROOT / folder).rglob("*.yaml")}
    assert packaged == on_top


def test_a_shipped_config_is_found_by_name_and_a_path_stays_a_path(tmp_path, monkeypatch):
    assert set(shipped("configs")) == {p.stem for p in (ROOT / "configs").glob("*.yaml")}
    assert load_config(resolve("embedded", "configs")).model.path == "embedded:smollm2-135m-instruct"
    assert resolve("demo.yaml", "search_spaces") == str(shipped("search_spaces")["demo"])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "embedded.yaml").write_text("model: {path: mine}\n")
    assert resolve("embedded.yaml", "configs") == "embedded.yaml"  # a file of the user's comes first
    assert resolve("missing", "configs") == "missing"  # for load_config to report


@pytest.mark.slow
def test_an_installed_wheel_finds_its_embedded_config_outside_the_checkout(tmp_path):
    """Build the wheel from a copy of the checkout, install it alone, and read its configs from /tmp."""
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", "experiments")
    shutil.copytree(ROOT, source, symlinks=True, ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(source)], check=True)
    (wheel,) = tmp_path.glob("atp_ray-*.whl")
    assert "atp_ray/configs/embedded.yaml" in zipfile.ZipFile(wheel).namelist()
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)], check=True)
    code = (
        "import atp_ray\n"
        "from atp_ray.config import load_config\n"
        "from atp_ray.packaged import resolve\n"
        "from atp_ray.search.space import load_space\n"
        f"assert atp_ray.__file__.startswith({str(tmp_path / 'site')!r}), atp_ray.__file__\n"
        "assert load_config(resolve('embedded', 'configs')).model.path == 'embedded:smollm2-135m-instruct'\n"
        "assert load_space(resolve('demo', 'search_spaces'))[1]['model']['path'] == 'embedded:smollm2-135m-instruct'\n"
    )
    # the installed copy comes first on the path; the checkout's editable install is not read
    env = {"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)
