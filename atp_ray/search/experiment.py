"""The experiment folder of a search, and what ``search.json`` says about it; Ray-free.

An experiment folder holds

    search.json        the space, the resolved base run config and where Tune keeps its state
    study.journal      the Optuna study (JournalStorage): ``optuna-dashboard study.journal``
    trials/<trial_id>/ each trial's folder (atp_ray.search.trial): run/, compressed/,
                       objectives.json, trial.json (status, failure reason, wall time)
    dense.json         the dense model's objectives, measured once by the first trial to start:
                       the report's reference point (what pruning cost)
    early_stopping.jsonl  the early-stopping scheduler's rung records (when it is on)
    tune/              Ray Tune's experiment (results, TensorBoard logs, checkpoints), unless
                       the space's ``storage`` puts it in a bucket or elsewhere
    report/            written by ``atp-ray report``

The experiment folder must be on a filesystem every node sees (local on one machine, NFS on
a cluster); Tune's own state may go to ``s3://`` or ``gs://``. Reading one (a report, an
export) imports no Ray: only running or resuming a search does (``atp_ray.search.tuner``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, ClassVar

from atp_ray.errors import ConfigError, ExperimentError
from atp_ray.runtime.run_folder import atomic_write_json
from atp_ray.search.space import SearchSpace

log = logging.getLogger(__name__)

# The experiment folder's entries; nothing else names them.
SEARCH_FILE = "search.json"
STUDY_FILE = "study.journal"
TUNE_NAME = "tune"
TRIALS_DIR = "trials"
RUNGS_FILE = "early_stopping.jsonl"  # the early-stopping scheduler's rung records
DENSE_FILE = "dense.json"  # the dense model's objectives (atp_ray.search.objectives.dense_reference)
REPORT_DIR = "report"


@dataclass(frozen=True)
class Experiment:
    """An experiment folder and what ``search.json`` says about it.

    Paths in ``search.json`` outlive the machine that wrote them. A search's driver may run in
    a Ray job's uploaded copy of the checkout (``/tmp/ray/session_*/runtime_resources/...`` on
    the head), which a new head, after a lost one, does not have. So when ``search.json`` is
    written, every absolute path in the base run config (and Tune's storage path) that lies

    - inside the experiment folder is stored as ``${experiment}/REL``, and
    - else inside the driver's working directory (``workdir``) as ``${workdir}/REL``;

    any other path is stored as it is. :meth:`open` resolves them again, in every process that
    opens the experiment (each trial does, when it builds its run config): ``${experiment}``
    against the folder as it is found now, ``${workdir}`` against the ``workdir`` recorded in
    ``search.json``. That is the working directory of the driver that started the search, until
    a resume finds it gone: the resuming driver records its own (:meth:`resumed_here`), so a
    resumed job on a new head, with a new upload of the checkout, finds the same files there.
    """

    root: Path
    space: SearchSpace
    base: dict[str, Any]  # the resolved base run config (raw): its paths absolute on this machine
    storage: str  # Tune's storage_path
    workdir: Path | None = None  # the driver's working directory (None: a search.json from before it was kept)

    EXPERIMENT_DIR: ClassVar[str] = "${experiment}"
    WORKDIR: ClassVar[str] = "${workdir}"

    @property
    def trials(self) -> Path:
        return self.root / TRIALS_DIR

    @property
    def study(self) -> Path:
        return self.root / STUDY_FILE

    @property
    def tune_path(self) -> str:
        return f"{self.storage.rstrip('/')}/{TUNE_NAME}"

    def save(self) -> None:
        """Write ``search.json``, its paths relative to the experiment folder or the working dir."""
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            self.root / SEARCH_FILE,
            {
                "space": self.space.model_dump(mode="json", by_alias=True),
                "base": self._portable(self.base),
                "storage": self._portable(self.storage),
                "workdir": None if self.workdir is None else str(self.workdir),
            },
        )

    def resumed_here(self, workdir: Path | None = None) -> Experiment:
        """This experiment as a driver in ``workdir`` (default: the current one) resumes it.

        While the recorded working dir exists, it stays (a resume from another directory of
        the same machine finds the files the search started with). Once it is gone, with the
        head that held a job's upload of it, ``workdir`` takes its place and is saved, so the
        trials this driver starts resolve ``${workdir}`` paths in the new upload.
        """
        if self.workdir is None or self.workdir.is_dir():
            return self
        try:
            workdir = (workdir or Path.cwd()).resolve()
        except FileNotFoundError:  # seen in Ray jobs: the driver's working dir removed under it
            log.warning("the search's working dir %s is gone, and so is this one: paths stay as they are", self.workdir)
            return self
        log.warning(
            "the search's working dir %s is gone (with its head?); its paths now resolve in %s", self.workdir, workdir
        )
        portable = self._portable(self.base)
        moved = replace(self, workdir=workdir)
        moved = replace(moved, base=moved._resolved(portable))
        moved.save()
        return moved

    def _places(self) -> list[tuple[str, Path]]:
        # The experiment first: it may lie inside the working dir (``--out experiments/x``).
        places = [(self.EXPERIMENT_DIR, self.root)]
        return places + ([(self.WORKDIR, self.workdir)] if self.workdir is not None else [])

    def _portable(self, value: Any) -> Any:
        """``value`` (a nested config) with absolute paths under a place written from that place."""

        def portable(text: str) -> str:
            if not text.startswith("/"):
                return text  # hub ids, URIs, templates are no paths of this machine
            for name, place in self._places():
                if Path(text).is_relative_to(place):
                    relative = Path(text).relative_to(place).as_posix()
                    return name if relative == "." else f"{name}/{relative}"
            return text

        return _map_strings(value, portable)

    def _resolved(self, value: Any) -> Any:
        """The inverse of :meth:`_portable`: each ``${place}`` prefix replaced by that place."""

        def resolved(text: str) -> str:
            for name, place in self._places():
                if text == name or text.startswith(name + "/"):
                    return str(place) + text[len(name) :]
            return text

        return _map_strings(value, resolved)

    @property
    def rungs(self) -> Path:
        return self.root / RUNGS_FILE

    @property
    def dense(self) -> Path:
        return self.root / DENSE_FILE

    @property
    def report(self) -> Path:
        return self.root / REPORT_DIR

    @classmethod
    def open(cls, root: str | Path) -> Experiment:
        """The experiment in ``root``, its ``search.json`` paths resolved on this machine."""
        root = Path(root).resolve()
        path = root / SEARCH_FILE
        if not path.is_file():
            raise ConfigError([f"{root}: not an experiment folder ({SEARCH_FILE} is missing)"])
        data = json.loads(path.read_text())
        workdir = Path(data["workdir"]) if data.get("workdir") else None
        stored = cls(root, SearchSpace.model_validate(data["space"]), data["base"], data["storage"], workdir)
        return replace(stored, base=stored._resolved(stored.base), storage=stored._resolved(stored.storage))

    def check_journal(self) -> None:
        """Raise :class:`ExperimentError` unless every line of the study journal is a complete JSON record.

        A driver killed mid-write, or an edit, leaves one that is not, and Optuna would fail on
        it with a bare JSONDecodeError. Check only a stopped search: a running driver may be
        writing the journal's last line.
        """
        lines = self.study.read_bytes().split(b"\n") if self.study.is_file() else [b""]
        unterminated = lines.pop() != b""  # text after the last newline: a record cut short
        damaged = len(lines) + 1 if unterminated else None
        for number, line in enumerate(lines, 1):
            try:
                json.loads(line)
            except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
                damaged = number
                break
        if damaged is None:
            return
        total = len(lines) + unterminated
        if damaged == total:
            advice = f"delete that last line (sed -i '{damaged}d' {self.study}) and resume again"
        else:
            advice = "restore the file from a backup, or start a new search with another --out"
        raise ExperimentError(
            f"{self.study}: the study journal is damaged: line {damaged} of {total} is not a complete "
            f"JSON record; {advice}"
        )


def _map_strings(value: Any, change: Callable[[str], str]) -> Any:
    """``value`` (nested dicts and lists) with ``change`` applied to every string in it."""
    if isinstance(value, dict):
        return {k: _map_strings(v, change) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, change) for v in value]
    return change(value) if isinstance(value, str) else value


def new_experiment(root: str | Path, space: SearchSpace, base: dict[str, Any]) -> Experiment:
    """An experiment folder for a new search (an existing one must be resumed instead)."""
    root = Path(root).resolve()
    # A search.json alone is a search that stopped before Ray came up (the journal is made
    # once it has, Tune's state and trials/ after): nothing to resume, so a new one may replace it.
    started = any((root / name).exists() for name in (STUDY_FILE, TUNE_NAME, TRIALS_DIR))
    if (root / SEARCH_FILE).exists() and started:
        raise ConfigError([f"--out: {root} already holds a search; continue it with `atp-ray resume {root}`"])
    # ``base`` came from load_space: its local paths made absolute against this working dir;
    # so is a local storage path (the driver runs in the experiment folder: cli._driver).
    storage = space.storage or str(root)
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    experiment = Experiment(root, space, base, storage, workdir=Path.cwd().resolve())
    experiment.save()
    return experiment
