"""The search recipe: a validated space -> Ray Tune + Optuna -> one trial folder per trial.

An experiment folder holds

    search.json        the space, the resolved base run config and where Tune keeps its state
    study.journal      the Optuna study (JournalStorage): ``optuna-dashboard study.journal``
    trials/<trial_id>/ each trial's folder (atp_ray.trial): run/, compressed/, objectives.json,
                       trial.json (status, failure reason, wall time)
    early_stopping.jsonl  the early-stopping scheduler's rung records (when it is on)
    tune/              Ray Tune's experiment (results, TensorBoard logs, checkpoints), unless
                       the space's ``storage`` puts it in a bucket or elsewhere
    report/            written by ``atp-ray report``

The experiment folder must be on a filesystem every node sees (local on one machine, NFS on
a cluster); Tune's own state may go to ``s3://`` or ``gs://``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import pickle
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, ClassVar

from ray import tune
from ray.tune.search.optuna import OptunaSearch

from atp_ray.cluster_config import DRIVER_RESOURCE
from atp_ray.config import load_config
from atp_ray.run_folder import atomic_write_json
from atp_ray.search.samplers import SamplerFactory
from atp_ray.search.space import SearchSpace
from atp_ray.trial import TrialDiverged, TrialFolder, run_trial

log = logging.getLogger(__name__)

SEARCH_FILE = "search.json"
STUDY_FILE = "study.journal"
STUDY_NAME = "atp-ray"
TUNE_NAME = "tune"
TRIALS_DIR = "trials"
RECORD_FILE = "trial.json"  # inside a trial folder
EARLY_STOPPING_FILE = "early_stopping.jsonl"  # the early-stopping scheduler's rung records
# CPU a multi-worker trial's driver holds while its Ray Train workers hold the real resources.
DRIVER_CPU = 0.1


# -- the experiment folder --------------------------------------------------------------------


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
        for name, place in self._places():
            if value == name or value.startswith(name + "/"):
                return str(place) + value[len(name) :]
        return value

    @classmethod
    def open(cls, root: str | Path, *, resuming: bool = False) -> Experiment:
        """The experiment in ``root``; with ``resuming``, also check that it can be resumed.

        Resuming needs Tune's saved state (a search whose Ray never started has none) and a
        study journal whose every line is a complete JSON record (a driver killed mid-write,
        or an edit, leaves one that is not; Optuna would fail on it with a bare JSONDecodeError).
        Only a stopped search is checked: a running driver may be writing the journal's last line.
        """
        from atp_ray.errors import ConfigError, ExperimentError

        root = Path(root).resolve()
        path = root / SEARCH_FILE
        if not path.is_file():
            raise ConfigError([f"{root}: not an experiment folder ({SEARCH_FILE} is missing)"])
        data = json.loads(path.read_text())
        workdir = Path(data["workdir"]) if data.get("workdir") else None
        stored = cls(root, SearchSpace.model_validate(data["space"]), data["base"], data["storage"], workdir)
        experiment = replace(stored, base=stored._resolved(stored.base), storage=stored._resolved(stored.storage))
        if not resuming:
            return experiment
        if not tune.Tuner.can_restore(experiment.tune_path):
            raise ExperimentError(
                f"{root}: the search never started (no Tune state in {experiment.tune_path}), so there is "
                f"nothing to resume; run `atp-ray search --space <your space> --out {root}` again"
            )
        lines = experiment.study.read_bytes().split(b"\n") if experiment.study.is_file() else [b""]
        unterminated = lines.pop() != b""  # text after the last newline: a record cut short
        damaged = len(lines) + 1 if unterminated else None
        for number, line in enumerate(lines, 1):
            try:
                json.loads(line)
            except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
                damaged = number
                break
        if damaged is None:
            return experiment
        total = len(lines) + unterminated
        if damaged == total:
            advice = f"delete that last line (sed -i '{damaged}d' {experiment.study}) and resume again"
        else:
            advice = "restore the file from a backup, or start a new search with another --out"
        raise ExperimentError(
            f"{experiment.study}: the study journal is damaged: line {damaged} of {total} is not a complete "
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
    from atp_ray.errors import ConfigError

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


# -- the searcher -----------------------------------------------------------------------------


class StudySearch(OptunaSearch):
    """OptunaSearch that tells Optuna the truth about every trial and limits concurrency itself.

    - A trial that ends with its final objectives is COMPLETE; one that errored (diverged,
      crashed) is FAIL; one stopped early is PRUNED. Partial or non-finite values never
      reach the study, so no Optuna trial is left RUNNING and none is ranked on partial data.
    - Concurrency is counted from the searcher's own state, which Tune saves and restores
      with the experiment (ConcurrencyLimiter's live set is not saved, so after a restore it
      would drop the completions of resumed trials).
    - After a restore, study trials that the saved searcher never knew (asked just before the
      driver died) are marked FAIL: Tune suggests their replacements, so the budget holds.
    - The sampler is never pickled: the searcher holds ``sampler_factory`` (picklable) and its
      saved state keeps study trial ids, not the study; both are rebuilt from the journal.
    """

    def __init__(self, *args: Any, sampler_factory: SamplerFactory, max_concurrent: int = 1, **kwargs: Any):
        self.sampler_factory = sampler_factory
        self.max_concurrent = max_concurrent
        super().__init__(*args, **kwargs)

    def _setup_study(self, mode: str | list) -> None:
        self._sampler = self.sampler_factory()
        super()._setup_study(mode)

    # -- pickling: Tune pickles the searcher when the Tuner starts and saves it with every
    # experiment checkpoint; neither may reach the sampler (or the study, which holds it).
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_sampler=None, _ot_study=None, _study_open=self._ot_study is not None)
        state["_ot_trials"] = {tid: trial._trial_id for tid, trial in self._ot_trials.items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        import optuna

        state = dict(state)
        study_open = state.pop("_study_open")
        self.__dict__.update(state)
        if not study_open:  # not set up yet: set_search_properties will
            return
        # A sampler rebuilt from its seed would propose the first trials again: shift the seed by
        # the trials the study holds (the pickled sampler's random state is what we do not keep).
        study_id = self._storage.get_study_id_from_name(self._study_name)
        self._sampler = self.sampler_factory(len(self._storage.get_all_trials(study_id, deepcopy=False)))
        self._ot_study = optuna.load_study(study_name=self._study_name, storage=self._storage, sampler=self._sampler)
        # a saved trial comes back as the study's record of it (params, distributions, number)
        self._ot_trials = {tid: self._storage.get_trial(ot_id) for tid, ot_id in state["_ot_trials"].items()}

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__getstate__(), file)

    def suggest(self, trial_id: str) -> dict | None:
        live = set(self._ot_trials) - self._completed_trials
        if trial_id not in self._ot_trials and len(live) >= self.max_concurrent:
            return None
        return super().suggest(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        import optuna
        from optuna.trial import TrialState

        values = _final_values(result, self.metric) if not error else None
        if trial_id in self._completed_trials:
            if values is not None:  # an errored trial retried to the end: record its result too
                old = self._ot_study.get_trials(deepcopy=False)[self._ot_trials[trial_id].number]
                self._ot_study.add_trial(
                    optuna.trial.create_trial(
                        params=old.params, distributions=old.distributions, values=values, state=TrialState.COMPLETE
                    )
                )
            return
        if trial_id not in self._ot_trials:
            return
        if self._told_before_restore(self._ot_trials[trial_id]):
            self._completed_trials.add(trial_id)
            return
        state = TrialState.COMPLETE if values is not None else TrialState.FAIL if error else TrialState.PRUNED
        if state != TrialState.COMPLETE and result and result.get("final") == 1.0:
            state = TrialState.FAIL  # final, yet not finite: diverged
        self._ot_study.tell(self._ot_trials[trial_id].number, values, state=state)
        self._completed_trials.add(trial_id)

    def _told_before_restore(self, ot_trial: Any) -> bool:
        # The journal is written at once, the searcher's state only with Tune's experiment
        # checkpoint: a driver killed in between restores a trial the study already closed.
        return self._ot_study.get_trials(deepcopy=False)[ot_trial.number].state.is_finished()

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as file:  # our own save, in the experiment folder
            self.__setstate__(pickle.load(file))
        known = {t.number for t in self._ot_trials.values()}
        self.close_running(keep=known)

    def close_running(self, keep: set[int] | None = None) -> int:
        """Mark every RUNNING study trial FAIL except those numbered in ``keep``; returns how many."""
        from optuna.trial import TrialState

        closed = 0
        for trial in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if keep is None or trial.number not in keep:
                self._ot_study.tell(trial.number, state=TrialState.FAIL)
                closed += 1
        return closed


def _final_values(result: dict | None, metrics: list[str]) -> list[float] | None:
    if not result or result.get("final") != 1.0:
        return None
    values = [result.get(m) for m in metrics]
    if any(v is None or not math.isfinite(v) for v in values):
        return None
    return [float(v) for v in values]


def make_searcher(experiment: Experiment, concurrency: int) -> StudySearch:
    """The multi-objective Optuna searcher, its study in the experiment's journal file."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    space = experiment.space
    objectives = space.objective_list()
    # The space comes from the Tuner's param_space (so Tune's progress table shows the knobs).
    return StudySearch(
        metric=[o.name for o in objectives],
        mode=[o.mode for o in objectives],
        points_to_evaluate=[dict(p) for p in space.points_to_evaluate] or None,
        sampler_factory=space.sampler_factory(),
        study_name=STUDY_NAME,
        storage=JournalStorage(JournalFileBackend(str(experiment.study))),
        max_concurrent=concurrency,
    )


# -- the trainable ----------------------------------------------------------------------------


def trainable(params: dict[str, Any], experiment_dir: str) -> None:
    """One Tune trial: the sampled knobs -> :func:`atp_ray.trial.run_trial`, reported to Tune."""
    experiment = Experiment.open(experiment_dir)
    trial_id = tune.get_context().get_trial_id()
    folder = TrialFolder(experiment.trials / trial_id)
    config = experiment.space.run_config(params, experiment.base)
    folder.root.mkdir(parents=True, exist_ok=True)
    _restore_checkpoint(folder)
    record = _Record(folder, params)
    workers = experiment.space.resources.workers
    reporter = _TrainToTune() if workers > 1 else _TuneReporter(folder)
    objectives = experiment.space.objective_list()
    try:
        run_trial(
            config,
            folder.root,
            objectives=objectives,
            report=reporter,
            workers=workers,
            name=f"{experiment.root.name}-{trial_id}",
        )
    except SystemExit:  # Tune ends a function trainable that its scheduler stopped this way
        record.close("STOPPED", None)
        raise
    except BaseException as err:
        if not _diverged(err):  # a lost node or worker, or a bug: Tune retries it (FailureConfig)
            record.close("FAILED", f"{type(err).__name__}: {err}")
            raise
        # Diverged: a result of the knobs, not an accident, so never retried. The trial ends
        # normally with non-finite objectives: Optuna records FAIL, the front skips it.
        record.close("FAILED", _diverged(err))
        tune.report({**{o.name: math.nan for o in objectives}, "step": float(config.train.steps), "final": 1.0})
        return
    record.close("COMPLETED" if reporter.final else "STOPPED", None)


def _diverged(err: BaseException) -> str | None:
    """The divergence behind ``err``, if any: a TrialDiverged in its chain, or named in the text
    of a Ray Train failure (a multi-worker trial's workers raise it in other processes)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, TrialDiverged):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    text = str(err)
    return text[text.index("TrialDiverged") :].splitlines()[0] if "TrialDiverged" in text else None


class _Record:
    """trial.json: the knobs, status, failure reason, attempts and wall time (summed over attempts)."""

    def __init__(self, folder: TrialFolder, params: dict[str, Any]):
        self.path = folder.root / RECORD_FILE
        previous = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.spent = previous.get("wall_time_s", 0.0)
        self.attempts = previous.get("attempts", 0) + 1  # a retry, or a resume after the driver died
        self.started = time.monotonic()
        self.params = params
        self._write("RUNNING", None)

    def _write(self, status: str, reason: str | None) -> None:
        wall = self.spent + time.monotonic() - self.started
        atomic_write_json(
            self.path,
            {
                "status": status,
                "failure_reason": reason,
                "attempts": self.attempts,
                "wall_time_s": round(wall, 2),
                "knobs": self.params,
            },
        )

    def close(self, status: str, reason: str | None) -> None:
        self._write(status, reason)


class _TuneReporter:
    """Forwards run_trial's reports to Tune, with a copy of the run's checkpoint when it has a newer one."""

    def __init__(self, folder: TrialFolder):
        self.folder = folder
        self.final = False
        self.sent_checkpoint: int | None = None  # mtime of the run checkpoint last sent

    def __call__(self, values: dict[str, float]) -> None:
        self.final = values.get("final") == 1.0
        checkpoint = self.folder.run.checkpoint
        written = checkpoint.stat().st_mtime_ns if checkpoint.is_file() else None
        if written is None or written == self.sent_checkpoint:
            tune.report(values)
            return
        with tempfile.TemporaryDirectory() as tmp:
            for path in (checkpoint, self.folder.run.metrics):
                if path.is_file():
                    shutil.copy2(path, Path(tmp) / path.name)
            tune.report(values, checkpoint=tune.Checkpoint.from_directory(tmp))
        self.sent_checkpoint = written


class _TrainToTune:
    """A multi-worker trial's reports: made on Ray Train's controller and handed to this Tune trial
    by Ray's own TuneReportCallback (made here, in the Tune session, as Ray requires), given our
    objectives instead of the workers' raw metrics."""

    def __init__(self) -> None:
        from ray.tune.integration.ray_train import TuneReportCallback

        self._to_tune = TuneReportCallback()
        self.final = False

    def __call__(self, values: dict[str, float]) -> None:
        if values.get("final") == 1.0:  # the final objectives are measured here, in the trial
            self.final = True
            tune.report(values)
        else:
            self._to_tune.after_report(run_context=None, metrics=[values], checkpoint=None)


def _restore_checkpoint(folder: TrialFolder) -> None:
    """Put Tune's last checkpoint back into the run folder when the folder lost its own
    (a node's disk gone; Tune's copy lives in its storage)."""
    checkpoint = tune.get_checkpoint()
    run = folder.run
    if checkpoint is None or run.is_finished() or run.checkpoint.is_file():
        return
    with checkpoint.as_directory() as saved:
        run.root.mkdir(parents=True, exist_ok=True)
        for name in ("checkpoint.pt", "metrics.jsonl"):
            if (Path(saved) / name).is_file():
                shutil.copy2(Path(saved) / name, run.root / name)
    log.info("trial %s: restored its run checkpoint from Tune", folder.root.name)


# -- the Tuner --------------------------------------------------------------------------------


def trial_resources(space: SearchSpace, cluster: dict[str, float]) -> dict[str, float]:
    """What one trial's Tune actor holds: everything in-process, or a small driver for Ray Train.

    ``cluster`` is ``ray.cluster_resources()``. On an atp-ray cluster a driver also asks for
    one unit of the head's ``search_driver`` resource, so it sits on the head, next to the
    search, and leaves the GPU nodes' CPUs to the Ray Train workers it starts.
    """
    res = space.resources
    if res.workers > 1:
        driver = {"cpu": DRIVER_CPU}
        if cluster.get(DRIVER_RESOURCE, 0) >= 1:
            driver[DRIVER_RESOURCE] = 1
        return driver
    return {"cpu": res.cpus_per_worker, "gpu": res.gpus_per_worker}


def default_concurrency(space: SearchSpace) -> int:
    """The space's ``concurrency``, else the trials the cluster holds at once at its largest:
    its node types times their max workers (an autoscaling cluster starts with no GPU node)."""
    from atp_ray.cluster_capacity import cluster_node_types, trials_at_once

    if space.concurrency:
        return space.concurrency
    res = space.resources
    bundle = {"CPU": res.cpus_per_worker, "GPU": res.gpus_per_worker}
    return trials_at_once(cluster_node_types(), bundle, res.workers)


def _trainable_for(experiment: Experiment) -> Any:
    import ray

    resources = trial_resources(experiment.space, ray.cluster_resources())
    return tune.with_resources(tune.with_parameters(trainable, experiment_dir=str(experiment.root)), resources)


def _callbacks(space: SearchSpace) -> list[Any]:
    if space.mlflow is None:
        return []
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return [MLflowLoggerCallback(tracking_uri=space.mlflow.tracking_uri, experiment_name=space.mlflow.experiment_name)]


def _scheduler(experiment: Experiment) -> Any:
    space = experiment.space
    if not space.early_stopping.enabled:
        return None
    from atp_ray.search.scheduler import ParetoEarlyStopping

    objectives = space.objective_list()
    # grace counts held-out evaluations (the trial's reports); the rungs are in training steps
    train = load_config(copy.deepcopy(experiment.base)).train
    eval_every = train.eval_every or train.steps  # None: evaluated at the end only
    return ParetoEarlyStopping(
        metrics=[o.name for o in objectives],
        modes=[o.mode for o in objectives],
        time_attr="step",
        grace=space.early_stopping.grace * eval_every,
        eta=space.early_stopping.eta,
        record_path=experiment.root / EARLY_STOPPING_FILE,  # rungs survive a resume
    )


def run_search(experiment: Experiment) -> Any:
    """Run a new search to its trial budget; returns Tune's ResultGrid."""
    import ray

    space = experiment.space
    concurrency = default_concurrency(space)
    searcher = make_searcher(experiment, concurrency)
    tuner = tune.Tuner(
        _trainable_for(experiment),
        param_space={k: v.tune_domain() for k, v in space.searched.items()},
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=_scheduler(experiment),
            num_samples=space.trials,
            trial_name_creator=lambda trial: trial.trial_id,
            trial_dirname_creator=lambda trial: trial.trial_id,
        ),
        run_config=tune.RunConfig(
            name=TUNE_NAME,
            storage_path=experiment.storage,
            callbacks=_callbacks(space),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            # a trial lost with a node or worker is retried from its last checkpoint; a diverged one
            # ends without an error (see trainable), so it is never retried
            failure_config=tune.FailureConfig(max_failures=space.retries),
        ),
    )
    log.info("search: %d trials, %d at once, Ray %s", space.trials, concurrency, ray.__version__)
    results = tuner.fit()
    close_study(experiment)
    return results


def resume_search(experiment: Experiment, retry_failed: bool = False, workdir: Path | None = None) -> Any:
    """Continue a search whose driver stopped: finished trials kept, unfinished ones resumed
    from their checkpoints (and trial folders), errored ones retried when asked.

    Runs in ``workdir``, the driver's working directory as it started (default: the current
    one; the CLI's driver has moved to the experiment folder by now): when the search's own is
    gone (its head lost), the trials resolve the base config's ``${workdir}`` paths there
    (see :class:`Experiment`).
    """
    experiment = experiment.resumed_here(workdir)
    tuner = tune.Tuner.restore(
        experiment.tune_path,
        trainable=_trainable_for(experiment),
        resume_unfinished=True,
        resume_errored=retry_failed,
    )
    results = tuner.fit()
    close_study(experiment)
    return results


def close_study(experiment: Experiment) -> int:
    """After a search ends, no study trial may stay RUNNING: mark leftovers FAIL."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    storage = JournalStorage(JournalFileBackend(str(experiment.study)))
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
    closed = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)
        closed += 1
    if closed:
        log.warning("marked %d study trial(s) left RUNNING as FAIL", closed)
    return closed
