"""Bad input never leaves a dead end (issue 21): each mistake is one clear error (exit 2, no
traceback), quickly, and the corrected command then works in the same folder."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from atp_ray.cli import main
from tests.conftest import tiny_run_config

ATP_RAY = [sys.executable, "-m", "atp_ray.cli"]
REPO = Path(__file__).resolve().parent.parent


def short_run(model_dir, **data) -> dict:
    """A two-step run of the tiny model on the CPU; ``data`` updates its data section."""
    raw = tiny_run_config(model_dir, train={"steps": 2, "log_every": 1, "checkpoint_every": 1, "device": "cpu"})
    raw["data"] = {**raw["data"], "max_documents": 200, **data}
    return raw


def write_yaml(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def clean_error(err: str) -> None:
    """What every bad-input message must be: atp-ray's own error line, no traceback."""
    assert "atp-ray " in err and "error:" in err, err
    assert "Traceback" not in err, err


def free_port() -> int:
    """A TCP port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args: list[str], env: dict[str, str], timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    done = subprocess.run(ATP_RAY + args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - start


def plain_env(**extra: str) -> dict[str, str]:
    """This environment without Ray or hub settings a test did not ask for."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return {**env, **extra}


# -- train: a bad data file, then the corrected command in the same --out --------------------


@pytest.fixture
def failed_run(tiny_model_dir, tmp_path, capsys) -> Path:
    """A run folder whose train stopped on a malformed data file before training."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('not json at all\n{"text":\n')
    config = write_yaml(tmp_path / "bad.yaml", short_run(tiny_model_dir, source=str(bad)))
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    clean_error(err)
    assert "bad.jsonl" in err and "not a valid jsonl file" in err
    return out


def test_train_with_bad_data_then_the_corrected_command_runs_in_the_same_folder(failed_run, tiny_model_dir, tmp_path):
    good = write_yaml(tmp_path / "good.yaml", short_run(tiny_model_dir))
    assert main(["train", "--config", str(good), "--out", str(failed_run)]) == 0
    assert (failed_run / "summary.json").is_file()


def test_a_run_that_trained_still_refuses_another_config(tiny_model_dir, tmp_path, capsys):
    """The rule above has its limit: a folder with training state keeps its config."""
    out = tmp_path / "run"
    raw = short_run(tiny_model_dir)
    (out).mkdir()
    write_yaml(out / "config.yaml", raw)
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 4.0}\n')  # it logged a step
    other = write_yaml(tmp_path / "other.yaml", {**raw, "lora": {"rank": 2, "alpha": 4}})
    assert main(["train", "--config", str(other), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    clean_error(err)
    assert "different config" in err


def test_train_with_a_folder_that_is_not_a_model_fails_before_making_the_run_folder(tmp_path, capsys):
    not_model = tmp_path / "notes"
    not_model.mkdir()
    (not_model / "readme.txt").write_text("hello")
    raw = short_run(not_model)
    config = write_yaml(tmp_path / "run.yaml", raw)
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    clean_error(err)
    assert str(not_model) in err and "config.json" in err
    assert not out.exists()


# -- eval / compress on folders that are not what they should be ------------------------------


def test_eval_of_an_unfinished_run_folder_is_a_clear_error(failed_run, capsys):
    assert main(["eval", str(failed_run), "--tasks", "domain-ppl", "--max-samples", "2"]) == 2
    err = capsys.readouterr().err
    clean_error(err)
    assert str(failed_run) in err and "not finished" in err


def test_eval_of_a_folder_that_is_not_a_model_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "readme.txt").write_text("hello")
    assert main(["eval", str(tmp_path), "--tasks", "domain-ppl", "--max-samples", "2"]) == 2
    err = capsys.readouterr().err
    clean_error(err)
    assert "not a model folder" in err and "config.json" in err


def test_missing_folders_are_called_missing(tmp_path, capsys):
    nowhere = tmp_path / "nowhere"
    assert main(["compress", str(nowhere), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    clean_error(err)
    assert "no such folder" in err and "holds no finished" not in err
    assert main(["eval", str(nowhere), "--tasks", "domain-ppl"]) == 2
    err = capsys.readouterr().err
    clean_error(err)
    assert "no such model folder" in err


# -- an unreachable hub model: one line, within seconds ---------------------------------------


def test_unreachable_hub_model_fails_fast_with_one_line(tmp_path):
    """Without network (or with it: then the hub says there is no such model) the answer is
    one clear line, not transformers' five retries per file (~50 s, 44 warning lines)."""
    env = plain_env(HF_HOME=str(tmp_path / "hf"))  # an empty cache: nothing to fall back on
    done, seconds = run_cli(["eval", "someone/nonexistent-model", "--tasks", "domain-ppl"], env, timeout=120)
    assert done.returncode == 2, done.stderr
    clean_error(done.stderr)
    assert "'someone/nonexistent-model'" in done.stderr
    assert "Retrying" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, done.stderr
    assert len((done.stdout + done.stderr).splitlines()) <= 5, done.stdout + done.stderr
    assert seconds < 30, seconds  # generous: the import alone takes a few seconds here


def test_train_with_an_unreachable_hub_model_makes_no_run_folder(tmp_path, capsys, caplog):
    config = write_yaml(tmp_path / "run.yaml", short_run("someone/nonexistent-model"))
    out = tmp_path / "run"
    start = time.monotonic()
    assert main(["train", "--config", str(config), "--out", str(out)]) == 2
    assert time.monotonic() - start < 30
    assert not [r for r in caplog.records if "Retrying" in r.getMessage()]  # huggingface_hub's back-off
    err = capsys.readouterr().err
    clean_error(err)
    assert "'someone/nonexistent-model'" in err
    assert not out.exists()


# -- search spaces: every problem in one pass ------------------------------------------------


def test_space_reports_an_out_of_bounds_range_and_a_point_outside_it(tiny_model_dir, tmp_path, capsys):
    write_yaml(tmp_path / "base.yaml", short_run(tiny_model_dir))
    space = write_yaml(
        tmp_path / "space.yaml",
        {
            "base": "base.yaml",
            "knobs": {"atp.sparsity": {"uniform": [0.2, 1.5]}},  # the run config allows at most 0.95
            "objectives": [{"name": "quality"}, {"name": "params"}],
            "points_to_evaluate": [{"atp.sparsity": 1.8}],  # outside [0.2, 1.5]
        },
    )
    assert main(["search", "--space", str(space), "--out", str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err
    clean_error(err)
    assert "points_to_evaluate[0]: atp.sparsity=1.8 is outside" in err
    assert "knobs: atp.sparsity=1.5" in err
    assert not (tmp_path / "exp").exists()


# -- search / resume: an unreachable Ray, a search that never started, a damaged journal -----


def write_search_space(folder: Path, model_dir: Path) -> Path:
    """One trial of two steps on the tiny model."""
    base = short_run(model_dir)
    base["train"].update(eval_every=2, checkpoint_every=2, log_every=2)
    write_yaml(folder / "base.yaml", base)
    return write_yaml(
        folder / "space.yaml",
        {
            "base": "base.yaml",
            "knobs": {"atp.sparsity": {"uniform": [0.2, 0.5]}},
            "objectives": [{"name": "quality"}, {"name": "params"}],
            "sampler": {"name": "random", "seed": 0},
            "trials": 1,
            "concurrency": 1,
            "resources": {"cpus_per_worker": 1},
        },
    )


def test_search_with_an_unreachable_ray_address_fails_fast_and_writes_nothing(tiny_model_dir, tmp_path):
    space = write_search_space(tmp_path, tiny_model_dir)
    out = tmp_path / "exp"
    address = f"127.0.0.1:{free_port()}"
    done, seconds = run_cli(["search", "--space", str(space), "--out", str(out)], plain_env(RAY_ADDRESS=address), 120)
    assert done.returncode == 2, done.stderr
    clean_error(done.stderr)
    assert address in done.stderr and "no Ray cluster answers" in done.stderr
    assert seconds < 60, seconds  # Ray itself would retry for minutes
    assert not (out / "search.json").exists()


def test_train_on_workers_with_an_unreachable_ray_address_fails_fast(tiny_model_dir, tmp_path):
    config = write_yaml(tmp_path / "run.yaml", short_run(tiny_model_dir))
    address = f"127.0.0.1:{free_port()}"
    args = ["train", "--config", str(config), "--out", str(tmp_path / "run"), "--workers", "2", "--address", address]
    done, seconds = run_cli(args, plain_env(), 120)  # a subprocess: Ray's own wait would hang a test for minutes
    assert done.returncode == 2, done.stderr
    clean_error(done.stderr)
    assert address in done.stderr and "no Ray cluster answers" in done.stderr
    assert seconds < 60, seconds


@pytest.fixture(scope="module")
def searched(ray_local, tiny_model_dir, tmp_path_factory) -> Path:
    """A finished one-trial search, run in a folder that a search which never started had left
    (its search.json alone, as a start that failed before Ray came up used to leave)."""
    from atp_ray.search.space import load_space
    from atp_ray.search.experiment import new_experiment

    tmp = tmp_path_factory.mktemp("searched")
    space = write_search_space(tmp, tiny_model_dir)
    out = tmp / "exp"
    new_experiment(out, *load_space(space))
    assert (out / "search.json").is_file()
    assert main(["search", "--space", str(space), "--out", str(out)]) == 0
    return out


def test_resume_of_a_search_that_never_started_says_to_run_search(tiny_model_dir, tmp_path, capsys):
    from atp_ray.search.space import load_space
    from atp_ray.search.experiment import new_experiment

    out = tmp_path / "exp"
    new_experiment(out, *load_space(write_search_space(tmp_path, tiny_model_dir)))
    assert main(["resume", str(out)]) == 2
    err = capsys.readouterr().err
    clean_error(err)
    assert "never started" in err and "atp-ray search" in err


def test_search_runs_in_a_folder_whose_search_never_started(searched):
    assert (searched / "report" / "trials.csv").is_file()
    assert list((searched / "trials").iterdir())


def test_a_started_search_still_refuses_a_new_one(searched, capsys):
    space = searched.parent / "space.yaml"
    assert main(["search", "--space", str(space), "--out", str(searched)]) == 2
    assert "already holds a search" in capsys.readouterr().err


@pytest.mark.parametrize(
    "damage, where",
    [
        (lambda text: text + b'{"op_code": 4, "worker_id": "x", "trial_id"', "last"),  # cut short
        (lambda text: text + b"garbage\n", "last"),  # junk appended
        (lambda text: text.replace(b"\n", b"\n#oops\n", 1), "middle"),  # junk inside
    ],
    ids=["cut-short", "junk-appended", "junk-inside"],
)
def test_resume_with_a_damaged_journal_names_the_file_and_what_to_do(searched, tmp_path, capsys, damage, where):
    copy = tmp_path / "exp"
    shutil.copytree(searched, copy)
    journal = copy / "study.journal"
    journal.write_bytes(damage(journal.read_bytes()))
    assert main(["resume", str(copy)]) == 2
    err = capsys.readouterr().err
    clean_error(err)
    assert str(journal) in err and "damaged" in err
    assert ("delete that last line" in err) == (where == "last"), err
    assert ("backup" in err) == (where == "middle"), err
