"""An experiment outlives the head that ran it: paths in search.json and the driver.pid marker.

Fast, without Ray: the search's working dir is moved as a lost head loses a job's upload of
the checkout, a driver keeps a working dir while Ray replaces its job's upload under it, and a
driver.pid from another host is read as a report on this one reads it.
The end-to-end version (a real search, its head killed, resumed on a new head from another
working dir) is the slow test in tests/test_cluster_local.py.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import yaml

from atp_ray.cli import DRIVER_FILE, STALE_DRIVER_S, _search_running
from atp_ray.search.experiment import SEARCH_FILE, Experiment, new_experiment
from atp_ray.search.space import load_space
from tests.conftest import tiny_run_config


def _workdir_with_data(folder: Path, model_dir: Path) -> Path:
    """A working dir as a job uploads it: a space whose base names a data file beside it, relatively."""
    folder.mkdir()
    (folder / "notes.jsonl").write_text("".join(json.dumps({"text": f"note {i}"}) + "\n" for i in range(50)))
    base = tiny_run_config(model_dir)
    base["data"]["source"] = "file:notes.jsonl"  # relative: made absolute against the working dir
    space = {"base": base, "knobs": {"atp.sparsity": {"uniform": [0.2, 0.6]}}, "objectives": [{"name": "params"}]}
    (folder / "space.yaml").write_text(yaml.safe_dump(space))
    return folder / "space.yaml"


def test_paths_in_the_working_dir_resolve_in_the_resuming_drivers_once_the_first_is_gone(
    tiny_model_dir, tmp_path, monkeypatch
):
    first, second, out = tmp_path / "upload-a", tmp_path / "upload-b", tmp_path / "exp"
    monkeypatch.chdir(_workdir_with_data(first, tiny_model_dir).parent)
    experiment = new_experiment(out, *load_space("space.yaml"))
    assert experiment.base["data"]["source"]["path"] == str(first / "notes.jsonl")  # absolute while it runs

    stored = json.loads((out / SEARCH_FILE).read_text())
    assert stored["base"]["data"]["source"]["path"] == "${workdir}/notes.jsonl"
    assert stored["workdir"] == str(first) and stored["storage"] == "${experiment}"
    assert stored["base"]["model"]["path"] == str(tiny_model_dir)  # outside both places: as it was
    assert str(first) not in json.dumps(stored["base"])

    # A resume from another directory while the first still exists keeps the first.
    monkeypatch.chdir(tmp_path)
    assert Experiment.open(out).resumed_here() == Experiment.open(out)

    # The head is lost with its upload; the resuming job has a new one, with the same files.
    first.rename(second)
    monkeypatch.chdir(second)
    Experiment.open(out).resumed_here()
    # What each trial then does: open the experiment and build its run config.
    trial = Experiment.open(out)
    config = trial.space.run_config({"atp.sparsity": 0.3}, trial.base)
    assert config.data.source.path == str(second / "notes.jsonl") and Path(config.data.source.path).is_file()
    assert json.loads((out / SEARCH_FILE).read_text())["workdir"] == str(second)


def test_a_moved_experiment_folder_keeps_its_tune_state_and_its_own_files(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(_workdir_with_data(tmp_path / "work", tiny_model_dir).parent)
    space, base = load_space("space.yaml")
    out = tmp_path / "exp"
    (out / "data").mkdir(parents=True)
    (out / "data" / "notes.jsonl").write_text((tmp_path / "work" / "notes.jsonl").read_text())
    base["data"]["source"]["path"] = str(out / "data" / "notes.jsonl")  # a file kept with the experiment
    new_experiment(out, space, base)
    out.rename(tmp_path / "moved")

    moved = Experiment.open(tmp_path / "moved")
    assert moved.tune_path == f"{tmp_path / 'moved'}/tune"
    assert moved.base["data"]["source"]["path"] == str(tmp_path / "moved" / "data" / "notes.jsonl")


def test_a_relative_storage_path_is_stored_against_the_working_dir(tiny_model_dir, tmp_path, monkeypatch):
    """The driver works in the experiment folder while Ray runs (see the next test), so a
    storage path relative to where the search was started is made absolute first."""
    space_path = _workdir_with_data(tmp_path / "work", tiny_model_dir)
    monkeypatch.chdir(space_path.parent)
    space, base = load_space("space.yaml")
    experiment = new_experiment(tmp_path / "exp", space.model_copy(update={"storage": "state"}), base)
    assert experiment.tune_path == f"{tmp_path / 'work' / 'state'}/tune"
    assert json.loads((tmp_path / "exp" / SEARCH_FILE).read_text())["storage"] == "${workdir}/state"


def test_the_driver_keeps_a_working_dir_while_ray_replaces_its_jobs_upload(tmp_path, monkeypatch):
    """A Ray job's driver starts in the job's upload, which Ray unpacks again (removing the folder
    there) on each node that first sees the job; a local cluster's nodes share that folder. Tune
    needs the driver's working dir to restore an experiment and to read its results: it lists
    the experiment with os.path.relpath, which calls os.getcwd(). Left in the upload, a resume
    failed there and Tune started the search afresh ("no search space has been defined")."""
    from atp_ray import cli

    upload, out = tmp_path / "upload", tmp_path / "exp"
    upload.mkdir()
    out.mkdir()
    monkeypatch.chdir(upload)
    monkeypatch.setattr("atp_ray.training.distributed.init_ray", lambda **kwargs: None)  # Ray's part is not under test
    with cli._driver(out):
        shutil.rmtree(upload)  # a node unpacks the job's upload again: the old folder goes,
        upload.mkdir()  # and a new one takes its path
        assert Path(os.getcwd()) == out
        assert os.path.relpath("exp/tune/state.json", start="exp/tune") == "state.json"  # as Tune lists a folder
        assert (out / DRIVER_FILE).is_file()
    assert not (out / DRIVER_FILE).exists()
    assert os.getcwd() == str(upload)  # back in the working dir's path (a new folder by now)


def _driver_file(folder: Path, host: str, pid: int, age_s: float = 0) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / DRIVER_FILE
    path.write_text(json.dumps({"host": host, "pid": pid}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def test_a_driver_pid_from_another_host_is_not_checked_here(tmp_path):
    """A pid that exists here (this test's own), written by another host: its search died with its
    head an hour ago, so it is not taken as running, and the report says who held it."""
    other = f"not-{socket.gethostname()}"
    _driver_file(tmp_path, other, os.getpid(), age_s=3600)
    running, note = _search_running(tmp_path)
    assert not running
    assert f"pid {os.getpid()} on host {other}" in note and "taken as stopped" in note

    # The same holder, with the experiment's state changing now: its search may well run.
    (tmp_path / "study.journal").write_text("")
    running, note = _search_running(tmp_path)
    assert running and "taken as running" in note
    assert STALE_DRIVER_S >= 60  # longer than Tune's pauses between saves of its state


def test_a_driver_pid_of_this_host_is_checked_by_its_pid(tmp_path):
    _driver_file(tmp_path, socket.gethostname(), os.getpid(), age_s=3600)
    assert _search_running(tmp_path) == (True, None)  # alive, however old the file

    dead = _dead_pid()
    _driver_file(tmp_path, socket.gethostname(), dead)
    assert _search_running(tmp_path) == (False, None)
    (tmp_path / DRIVER_FILE).write_text(str(os.getpid()))  # a bare pid, as drivers wrote it before
    assert _search_running(tmp_path) == (True, None)


def _dead_pid() -> int:
    """The pid of a process that has ended (and was reaped)."""
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("text", ["", "{oops", '{"pid": 1}'])
def test_an_unreadable_driver_pid_is_no_running_search(tmp_path, text):
    (tmp_path / DRIVER_FILE).write_text(text)
    running, note = _search_running(tmp_path)
    assert not running and "unreadable" in note


def test_reading_an_experiment_imports_no_ray(tiny_model_dir, tmp_path, monkeypatch):
    """The experiment folder is read without Ray (a report on a laptop reads a finished search)."""
    import subprocess
    import sys

    monkeypatch.chdir(_workdir_with_data(tmp_path / "work", tiny_model_dir).parent)
    new_experiment(tmp_path / "exp", *load_space("space.yaml"))
    code = (
        "import sys\n"
        "from atp_ray.search.experiment import Experiment\n"
        f"experiment = Experiment.open({str(tmp_path / 'exp')!r})\n"
        "assert experiment.space.trials > 0\n"
        "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))[:5]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
