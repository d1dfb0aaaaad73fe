"""The search recipe: a validated space -> Ray Tune + Optuna -> one trial folder per trial.

The experiment folder it writes is described in :mod:`atp_ray.search.experiment`; this module
is where Ray comes in: the searcher, the trainable, the Tuner, resume.
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
from pathlib import Path
from typing import Any

from ray import tune
from ray.air.integrations.mlflow import MLflowLoggerCallback  # mlflow itself is imported only when one is made
from ray.tune.search.optuna import OptunaSearch

from atp_ray.cluster.config import DRIVER_RESOURCE
from atp_ray.config import load_config
from atp_ray.errors import ATPRayError, ExperimentError
from atp_ray.runtime.run_folder import RunFolder, atomic_write_json
from atp_ray.search.experiment import SEARCH_FILE, TUNE_NAME, Experiment
from atp_ray.search.samplers import SamplerFactory
from atp_ray.search.space import SearchSpace
from atp_ray.search.trial import TrialDiverged, TrialFolder, run_trial

log = logging.getLogger(__name__)

STUDY_NAME = "atp-ray"
# CPU a multi-worker trial's driver holds while its Ray Train workers hold the real resources.
DRIVER_CPU = 0.1


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
    """One Tune trial: the sampled knobs -> :func:`atp_ray.search.trial.run_trial`, reported to Tune."""
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
            dense=experiment.dense,  # measured once per search, by the first trial to start
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
        self.path = folder.record
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
        for name in (RunFolder.CHECKPOINT, RunFolder.METRICS):
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
    from atp_ray.cluster.capacity import cluster_node_types, trials_at_once

    if space.concurrency:
        return space.concurrency
    res = space.resources
    bundle = {"CPU": res.cpus_per_worker, "GPU": res.gpus_per_worker}
    return trials_at_once(cluster_node_types(), bundle, res.workers)


def _trainable_for(experiment: Experiment) -> Any:
    import ray

    resources = trial_resources(experiment.space, ray.cluster_resources())
    return tune.with_resources(tune.with_parameters(trainable, experiment_dir=str(experiment.root)), resources)


class MLflowLogger(MLflowLoggerCallback):
    """Ray's MLflow logger, with report keys MLflow accepts: its names allow no "@", so an elastic
    trial's ``quality@0.2`` (and the run's ``eval_perplexity@0.2``) is logged as ``quality_at_0.2``."""

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        super().log_trial_result(iteration, trial, {k.replace("@", "_at_"): v for k, v in result.items()})


def _callbacks(space: SearchSpace) -> list[Any]:
    if space.mlflow is None:
        return []
    return [MLflowLogger(tracking_uri=space.mlflow.tracking_uri, experiment_name=space.mlflow.experiment_name)]


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
        record_path=experiment.rungs,  # rungs survive a resume
    )


def open_to_resume(root: str | Path) -> Experiment:
    """The experiment in ``root``, checked before Ray starts that it can be resumed.

    Resuming needs Tune's saved state (a search whose Ray never started has none) and a study
    journal of complete records (:meth:`Experiment.check_journal`).
    """
    experiment = Experiment.open(root)
    if not tune_state_saved(experiment):
        raise ExperimentError(
            f"{experiment.root}: the search never started (no Tune state in {experiment.tune_path}), so there is "
            f"nothing to resume; run `atp-ray search --space <your space> --out {experiment.root}` again"
        )
    experiment.check_journal()
    return experiment


def tune_state_saved(experiment: Experiment) -> bool:
    """Whether Tune has saved the experiment's state (in its storage, which may be a bucket)."""
    return tune.Tuner.can_restore(experiment.tune_path)


def holds_resumable_search(out: Path) -> bool:
    """Whether ``out`` is an experiment folder with Tune state to resume from."""
    if not (out / SEARCH_FILE).is_file():
        return False
    try:
        return tune_state_saved(Experiment.open(out))
    except (ATPRayError, OSError, ValueError):  # a damaged search.json, a bucket we lack access to
        return False  # the job's `atp-ray search` says what is wrong


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
