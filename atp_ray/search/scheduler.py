"""Pareto-aware early stopping: multi-objective asynchronous successive halving (MO-ASHA).

The rule (after Syne Tune's MOASHA with non-dominated sorting, Schmucker et al. 2021):

* Rungs sit at ``grace * eta**k`` steps (k = 0, 1, 2, ...), counted in ``time_attr``.
* The first time a trial reports at or past a rung it is *recorded* there with its vector of
  intermediate objectives (only at the highest rung its step reaches; a rung skipped between
  two reports stays without it). Trials that finish are recorded too, with their final
  report, but never judged.
* At that moment the vectors recorded at the rung (this trial included, ``n`` trials) are
  sorted into non-dominated fronts (front 0 is the Pareto front, front 1 the front of the
  rest, ...; a vector with a NaN goes after every finite one). Let ``better`` be the number of
  recorded trials in a strictly better front than this trial.
* The trial is stopped when ``better / n > 1 / eta``, i.e. when it cannot be in the best
  ``1 / eta`` of the trials seen at that rung whatever order ties are put in. A trial on the
  rung's Pareto front is never stopped, and neither is the first trial at a rung.
* An elastic trial (one model per sparsity budget) reports one vector per budget, its
  *points*. All points at a rung are sorted together, a trial stands in the front of its best
  point, and ``better`` and ``n`` count trials, not points: so a trial goes on while any one
  of its points is on the rung's front, and is stopped only when even its best point is beaten
  by more than ``1 / eta`` of the trials. With one point per trial this is the rule above.

``rung_decision`` is that rule on plain arrays; ``ParetoRungs`` is the bookkeeping (which
trial is recorded at which rung, which were stopped), also without Ray; ``ParetoEarlyStopping``
is the thin Ray Tune scheduler around it. Tune does not save scheduler state (a restored search
gets back the copy pickled when the search started), so the bookkeeping appends every record
to a JSON-lines file and replays it when built again on the same file or unpickled: a resumed
search judges new trials against the rungs seen before the driver died, and a trial stopped
before it died stays stopped. ``read_stopped`` reads which trials were stopped from the same
file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from atp_ray.search.front import MODES, pareto_ranks

__all__ = ["rung_decision", "RungRecord", "ParetoRungs", "ParetoEarlyStopping", "read_stopped"]


def rung_decision(
    values: np.ndarray, index: int, modes: Sequence[str], eta: float, owners: Sequence | None = None
) -> bool:
    """True when the trial owning row ``index`` of ``values`` (all points recorded at one rung)
    is to be stopped.

    See the module docstring for the rule. ``values`` is ``[n_points, n_objectives]``;
    ``owners`` names the trial of each row (default: every row is a trial of its own), so a
    trial with several points stands in the front of its best one and counts once.
    """
    ranks = pareto_ranks(values, modes)
    owners = np.arange(len(ranks)) if owners is None else np.asarray(owners, dtype=object)
    if len(owners) != len(ranks):
        raise ValueError(f"owners: expected one trial per row ({len(ranks)}), got {len(owners)}")
    best = {owner: ranks[owners == owner].min() for owner in dict.fromkeys(owners.tolist())}
    better = sum(int(rank < best[owners[index]]) for rank in best.values())
    return better / len(best) > 1.0 / eta


@dataclass(frozen=True)
class RungRecord:
    """One trial recorded at one rung: where, with what vector, and whether it was stopped there.

    ``points`` holds an elastic trial's vectors, one per budget (``values`` is then the vector
    Tune's plain metrics carry, each objective's mean over the budgets); None for a trial with
    one model, whose only point is ``values``.
    """

    trial_id: str
    rung: int
    step: float
    values: tuple[float, ...]
    stopped: bool
    points: tuple[tuple[float, ...], ...] | None = None

    def vectors(self) -> tuple[tuple[float, ...], ...]:
        """The points the rule judges this trial by."""
        return self.points if self.points is not None else (self.values,)


class ParetoRungs:
    """Rung bookkeeping of the MO-ASHA rule, free of Ray.

    Args:
        modes: "min" or "max" per objective, in the order of the vectors passed in.
        grace: steps before the first rung; no trial is stopped earlier.
        eta: reduction factor (> 1); about ``1 - 1/eta`` of the trials reaching a rung stop there.
        record_path: optional JSON-lines file; every record is appended, and an existing file is
            replayed on construction (resume).
    """

    def __init__(self, modes: Sequence[str], grace: float, eta: float = 3.0, record_path: Path | None = None):
        if not modes or any(m not in MODES for m in modes):
            raise ValueError(f"modes: each must be one of {MODES}, got {list(modes)}")
        if not grace > 0:
            raise ValueError(f"grace: must be > 0 steps, got {grace}")
        if not eta > 1:
            raise ValueError(f"eta: the reduction factor must be > 1, got {eta}")
        self.modes, self.grace, self.eta = list(modes), grace, eta
        self.record_path = Path(record_path) if record_path is not None else None
        self.rungs: dict[int, dict[str, tuple[tuple[float, ...], ...]]] = {}  # rung -> trial -> its points
        self.stopped: dict[str, RungRecord] = {}
        self._replay()

    def _replay(self) -> None:
        """Rebuild the rungs from the record file, when there is one (what a resumed search saw)."""
        self.rungs, self.stopped = {}, {}
        if self.record_path is None or not self.record_path.exists():
            return
        for record in _read_records(self.record_path):
            self._remember(record)
        text = self.record_path.read_bytes()
        if text and not text.endswith(b"\n"):  # end a torn last line so new records start clean
            with open(self.record_path, "ab") as f:
                f.write(b"\n")

    # Pickling: Tune pickles its scheduler once, when the Tuner is built, and a restored search
    # unpickles that copy (empty rungs). With a record file the file is the truth, so the rungs
    # are not pickled but replayed from it: the restored scheduler holds every record made
    # before the driver died.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self.record_path is not None:
            state.update(rungs={}, stopped={})
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.record_path is not None:
            self._replay()

    def rung_at(self, step: float) -> int | None:
        """Index k of the highest rung ``grace * eta**k`` at or below ``step``; None before the first."""
        if step < self.grace:
            return None
        k = int(math.floor(math.log(step / self.grace, self.eta) + 1e-9))
        # Guard the float log at exact powers: the rung must really be <= step.
        return k - 1 if self.grace * self.eta**k > step else k

    def on_result(
        self,
        trial_id: str,
        step: float,
        values: Sequence[float],
        decide: bool = True,
        points: Sequence[Sequence[float]] | None = None,
    ) -> bool:
        """Record a report; return True when the trial must stop (never when ``decide`` is False).

        ``points``: an elastic trial's vectors, one per budget (it is judged by them; see the
        module docstring). A trial stopped before is told to stop again at once.
        """
        for vector in [values, *(points or [])]:
            if len(vector) != len(self.modes):
                raise ValueError(f"values: expected {len(self.modes)} objectives, got {list(vector)}")
        if points is not None and not len(points):
            raise ValueError("points: an elastic trial reports at least one point, got none")
        k = self.rung_at(step)
        # Only the highest rung reached counts: rungs skipped between two reports stay without
        # this trial (its later vector would not be comparable there), and a rung already
        # holding it is not judged twice.
        if decide and trial_id in self.stopped:
            # Stopped before, yet reporting: a resumed search restored it from a Tune state saved
            # before the stop. A stop is final: stop it again at once.
            return True
        if k is None or trial_id in self.rungs.get(k, {}):
            return False
        vector = tuple(float(v) for v in values)
        mine = None if points is None else tuple(tuple(float(v) for v in p) for p in points)
        recorded = self.rungs.get(k, {})
        rows = [(owner, p) for owner, vectors in recorded.items() for p in vectors]
        rows += [(trial_id, p) for p in (mine or (vector,))]
        matrix = np.array([p for _, p in rows], dtype=float)
        owners = [owner for owner, _ in rows]
        stop = decide and rung_decision(matrix, len(matrix) - 1, self.modes, self.eta, owners)
        record = RungRecord(trial_id, k, float(step), vector, stop, mine)
        self._remember(record)
        if self.record_path is not None:
            self.record_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.record_path, "a") as f:
                f.write(json.dumps(asdict(record)) + "\n")
        return stop

    def _remember(self, record: RungRecord) -> None:
        self.rungs.setdefault(record.rung, {})[record.trial_id] = record.vectors()
        if record.stopped:
            self.stopped[record.trial_id] = record


def _read_records(path: Path) -> list[RungRecord]:
    records = []
    for line in path.read_text().splitlines():
        if line.strip():  # a driver killed mid-write leaves at most a torn last line
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            points = row.get("points")  # absent in records written before elastic trials
            points = None if points is None else tuple(tuple(p) for p in points)
            records.append(RungRecord(**{**row, "values": tuple(row["values"]), "points": points}))
    return records


def read_stopped(record_path: Path) -> dict[str, RungRecord]:
    """Trials the scheduler stopped, by trial id, from its record file (empty when there is none)."""
    path = Path(record_path)
    return {r.trial_id: r for r in _read_records(path) if r.stopped} if path.exists() else {}


class ParetoEarlyStopping(FIFOScheduler):
    """Ray Tune scheduler applying the MO-ASHA rule to several reported metrics at once.

    Args:
        metrics: result keys of the objectives; every report must carry them all.
        modes: "min" or "max" per metric.
        time_attr: the monotonically increasing step key of the results.
        grace: steps before the first rung.
        eta: reduction factor.
        record_path: JSON-lines file of rung records (see ``ParetoRungs``); put it in the
            experiment folder so that resume and the report find it.

    ``stopped`` maps the id of every trial it stopped to where and why.
    """

    def __init__(
        self,
        metrics: Sequence[str],
        modes: Sequence[str],
        time_attr: str = "training_iteration",
        grace: float = 1,
        eta: float = 3.0,
        record_path: Path | None = None,
    ):
        super().__init__()
        if len(metrics) != len(modes):
            raise ValueError(f"modes: expected one per metric {list(metrics)}, got {list(modes)}")
        self.metrics, self.time_attr = list(metrics), time_attr
        self.rungs = ParetoRungs(modes, grace, eta, record_path)

    @property
    def stopped(self) -> Mapping[str, RungRecord]:
        return self.rungs.stopped

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        # The metrics are this scheduler's own (several); Tune's single metric/mode do not apply.
        return True

    def _vector(self, result: Mapping) -> list[float] | None:
        if self.time_attr not in result or any(m not in result for m in self.metrics):
            return None
        vector = [result[m] for m in self.metrics]
        return vector if all(math.isfinite(v) for v in vector) else None  # a diverged trial ranks nowhere

    def _points(self, result: Mapping) -> list[list[float]] | None:
        """An elastic trial's vectors, one per budget, from its ``<metric>@<budget>`` keys (None
        for a trial with one model, or when a budget lacks a metric or a value is not finite)."""
        prefix = self.metrics[0] + "@"
        budgets = sorted(key.removeprefix(prefix) for key in result if key.startswith(prefix))
        points = [[result.get(f"{m}@{b}", math.nan) for m in self.metrics] for b in budgets]
        return points if points and all(math.isfinite(v) for p in points for v in p) else None

    def _record(self, trial: Trial, result: Mapping, decide: bool) -> bool:
        vector = self._vector(result)
        if vector is None:
            return False
        return self.rungs.on_result(trial.trial_id, result[self.time_attr], vector, decide, self._points(result))

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        return TrialScheduler.STOP if self._record(trial, result, decide=True) else TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        # A finished trial's last report joins the rung it reached, for later trials to face.
        self._record(trial, result or {}, decide=False)

    def debug_string(self) -> str:
        return f"Using ParetoEarlyStopping (MO-ASHA): {len(self.stopped)} trial(s) stopped"
