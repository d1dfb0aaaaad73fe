"""Search spaces: a YAML file naming the base run, the knobs, the objectives and how to search.

Validated before Ray starts: :func:`load_space` raises one :class:`ConfigError` listing
every problem (the CLI exits 2). A space reads::

    base: ../configs/embedded.yaml      # run config, relative to this file
    overrides: {train.steps: 30}        # fixed dotted overrides of the base
    knobs:                              # dotted run-config key -> distribution or fixed value
      atp.sparsity: {uniform: [0.2, 0.6]}
      atp.lasso_weight: {loguniform: [0.001, 0.1]}
      lora.rank: {choice: [4, 8]}
      train.warmup_steps: {int: [0, 10]}
      train.seed: 0                     # a fixed value
      # atp.sparsity: {range: [0.2, 0.6], points: 5}   # fixed too: every trial elastic, one model per budget
    objectives: [{name: quality}, {name: params, mode: min}]
    sampler: {name: nsga2, seed: 0}     # a name of atp_ray.search.samplers.SAMPLERS
    trials: 6
    concurrency: null                   # null = from the cluster's GPUs (or CPUs) per trial
    resources: {workers: 1, cpus_per_worker: 2, gpus_per_worker: 0}
    early_stopping: {enabled: false, grace: 2, eta: 3}
    points_to_evaluate: [{atp.sparsity: 0.3, ...}]
    storage: null                       # where Tune keeps state: null = the experiment folder, or s3://, gs://, a path
    mlflow: null                        # {tracking_uri: ..., experiment_name: ...} to log to MLflow
"""

from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from atp_ray.config import RunConfig, _describe, _read_mapping, load_config
from atp_ray.errors import ConfigError
from atp_ray.search.objectives import OBJECTIVES, Objective
from atp_ray.search.samplers import SAMPLERS, SamplerFactory, default_population
from atp_ray.training.memory_plan import MemoryPlan, search_plan

DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")
_FIELDS = {"uniform": "uniform", "loguniform": "loguniform", "int": "integer", "choice": "choice", "fixed": "fixed"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Knob(_Strict):
    """One searched run-config value: exactly one distribution, or ``fixed``."""

    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    integer: tuple[int, int] | None = Field(None, alias="int")
    choice: list[Any] | None = Field(None, min_length=1)
    fixed: Any = None

    @model_validator(mode="before")
    @classmethod
    def _scalar_is_fixed(cls, value: Any) -> Any:
        # A mapping is a distribution, except the run config's own sparsity range (an elastic run's
        # budgets, ``{range: [lo, hi], points: n}``), which is a fixed value like a list of budgets.
        return value if isinstance(value, dict) and "range" not in value else {"fixed": value}

    @model_validator(mode="after")
    def _one_distribution(self) -> Knob:
        given = [d for d, f in _FIELDS.items() if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DISTRIBUTIONS)} or a fixed value (got {given or 'none'})")
        low_high = self.uniform or self.loguniform or self.integer
        if low_high is not None and not low_high[0] < low_high[1]:
            raise ValueError(f"empty range: low must be below high (got {list(low_high)})")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform needs a positive low bound (got {self.loguniform[0]})")
        return self

    @property
    def kind(self) -> str:
        return next(d for d, f in _FIELDS.items() if getattr(self, f) is not None)

    def extremes(self) -> list[Any]:
        """Values that span the knob: both bounds, every choice, or the fixed value."""
        return {
            "uniform": lambda: list(self.uniform or ()),
            "loguniform": lambda: list(self.loguniform or ()),
            "int": lambda: list(self.integer or ()),
            "choice": lambda: list(self.choice or ()),
            "fixed": lambda: [self.fixed],
        }[self.kind]()

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return value in self.choice
        if self.kind == "fixed":
            return value == self.fixed
        low, high = self.extremes()
        return isinstance(value, (int, float)) and low <= value <= high and (self.kind != "int" or value == int(value))

    def optuna_distribution(self) -> Any:
        """The Optuna distribution of this knob (for studies driven without Ray)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        return {
            "uniform": lambda: FloatDistribution(*self.uniform),
            "loguniform": lambda: FloatDistribution(*self.loguniform, log=True),
            "int": lambda: IntDistribution(*self.integer),
            "choice": lambda: CategoricalDistribution(self.choice),
        }[self.kind]()

    def tune_domain(self) -> Any:
        """The Ray Tune domain of this knob (``fixed`` knobs are not searched)."""
        from ray import tune

        return {
            "uniform": lambda: tune.uniform(*self.uniform),
            "loguniform": lambda: tune.loguniform(*self.loguniform),
            "int": lambda: tune.randint(self.integer[0], self.integer[1] + 1),  # tune's upper bound is exclusive
            "choice": lambda: tune.choice(self.choice),
        }[self.kind]()


class ObjectiveSpec(_Strict):
    name: str
    mode: Literal["min", "max"] | None = Field(None, description="None = the objective's usual direction")
    task: str | None = Field(None, description="accuracy: built-in task name or task YAML path")
    max_samples: int = Field(100, gt=0, description="accuracy: rows of the task scored")


class SamplerSpec(_Strict):
    name: Literal[tuple(SAMPLERS)] = "nsga2"
    seed: int = 0
    population_size: int | None = Field(None, ge=2, description="nsga2: None = a quarter of the trials (2 to 50)")


class Resources(_Strict):
    workers: int = Field(1, ge=1, description="Ray Train workers per trial (1 = the trial trains in-process)")
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    gpu_memory_gib: float | None = Field(
        None,
        gt=0,
        description="memory of one of the node type's GPUs in GiB (as torch.cuda reports it); set, a GPU space "
        "whose heaviest trial's memory plan (atp_ray.training.memory_plan) does not fit is refused (None = unknown, no check)",
    )


class EarlyStopping(_Strict):
    enabled: bool = False
    grace: int = Field(
        1, ge=1, description="held-out evaluations (reports, every train.eval_every steps) a trial always gets"
    )
    eta: float = Field(3, gt=1, description="keep roughly the best 1/eta of trials at each rung")


class MLflowSpec(_Strict):
    tracking_uri: str | None = None
    experiment_name: str = "atp-ray"


class SearchSpace(_Strict):
    """A validated search space (see the module docstring for the YAML)."""

    base: str | dict[str, Any] = Field(
        description="base run config: a YAML path (relative to the space file) or the config itself"
    )
    overrides: dict[str, Any] = Field(default_factory=dict)
    knobs: dict[str, Knob] = Field(min_length=1)
    objectives: list[ObjectiveSpec] = Field(min_length=1)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    trials: int = Field(8, gt=0)
    concurrency: int | None = Field(None, gt=0)
    retries: int = Field(
        2, ge=0, description="times a trial that errors (a lost node or worker) is retried from its last checkpoint"
    )
    resources: Resources = Field(default_factory=Resources)
    early_stopping: EarlyStopping = Field(default_factory=EarlyStopping)
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list)
    storage: str | None = None
    mlflow: MLflowSpec | None = None

    # -- derived ------------------------------------------------------------------------
    def sampler_factory(self) -> SamplerFactory:
        """The picklable recipe for this space's seeded sampler."""
        spec = self.sampler
        return SamplerFactory(spec.name, spec.seed, spec.population_size or default_population(self.trials))

    def objective_list(self) -> list[Objective]:
        return [
            Objective(o.name, o.mode or OBJECTIVES[o.name].mode, o.task, o.max_samples) for o in self.objectives
        ]

    @property
    def searched(self) -> dict[str, Knob]:
        return {k: v for k, v in self.knobs.items() if v.kind != "fixed"}

    def fixed_overrides(self) -> dict[str, Any]:
        """Base overrides plus fixed knobs: what every trial's config shares."""
        return {**self.overrides, **{k: v.fixed for k, v in self.knobs.items() if v.kind == "fixed"}}

    def resource_overrides(self) -> dict[str, Any]:
        """The run config's ``distributed`` section for multi-worker trials (none for one worker)."""
        res = self.resources
        if res.workers == 1:
            return {}
        gpus = {"distributed.gpus_per_worker": res.gpus_per_worker} if res.gpus_per_worker else {}
        return {
            "distributed.workers": res.workers,
            "distributed.cpus_per_worker": res.cpus_per_worker,
            "distributed.use_gpu": res.gpus_per_worker > 0,
            **gpus,
        }

    def run_config(self, params: dict[str, Any], base: dict[str, Any]) -> RunConfig:
        """A trial's run config: the resolved ``base`` (raw dict) with the sampled knob values."""
        return load_config(copy.deepcopy(base), [_override(k, v) for k, v in params.items()])


def _override(key: str, value: Any) -> str:
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def _known_key(key: str) -> bool:
    """Whether a dotted key names a field of RunConfig (a leaf or a whole section)."""
    model: Any = RunConfig
    for part in key.split("."):
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return False
        annotation = fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return True


def resolve_base(space: SearchSpace, space_file: Path | None, cli_overrides: list[str]) -> dict[str, Any]:
    """The base run config as a raw dict: file, then the space's overrides, then the command line's."""
    from atp_ray.config import absolute_local_paths, apply_overrides

    if isinstance(space.base, dict):
        raw = copy.deepcopy(space.base)
    else:
        path = Path(space.base)
        if space_file is not None and not path.is_absolute():
            path = (space_file.parent / path).resolve()
        raw = _read_mapping(path)
    fixed = {**space.fixed_overrides(), **space.resource_overrides()}
    raw = apply_overrides(raw, [_override(k, v) for k, v in fixed.items()] + list(cli_overrides))
    return absolute_local_paths(raw)  # trials run elsewhere: a relative path would not follow them


def load_space(
    source: str | Path | dict[str, Any], cli_overrides: list[str] | None = None, trials: int | None = None
) -> tuple[SearchSpace, dict[str, Any]]:
    """Read and validate a search space; returns it and its resolved base run config (a raw dict).

    Raises :class:`ConfigError` listing every problem: the space's own fields, unknown or
    unsettable knob keys, knob values the run config rejects, points outside the space,
    unknown objectives, and samplers or loggers whose packages are missing.
    """
    where = "" if isinstance(source, dict) else f"{source}: "
    try:
        space = SearchSpace.model_validate(_read_mapping(source))
    except ValidationError as err:
        raise ConfigError([where + _describe(e) for e in err.errors()]) from None
    if trials is not None:
        space = space.model_copy(update={"trials": trials})
    problems = _space_problems(space)
    base: dict[str, Any] = {}
    # The run config's checks run even when the space has problems of its own (a point outside
    # a range, an unknown objective), so one pass reports them all; an unknown knob or override
    # key is the exception: the base config would only be rejected again for that same key.
    if all(_known_key(key) for key in [*space.knobs, *space.overrides]):
        try:
            base = resolve_base(space, None if isinstance(source, dict) else Path(source), cli_overrides or [])
            problems += _config_problems(space, base)
        except ConfigError as err:
            problems += err.problems
    if problems:
        raise ConfigError([where + p for p in problems])
    return space, base


def _space_problems(space: SearchSpace) -> list[str]:
    problems = []
    for key in [*space.knobs, *space.overrides]:
        if not _known_key(key):
            problems.append(f"knobs/overrides: {key!r} is not a run-config key (e.g. atp.sparsity, train.lr)")
    for key in set(space.knobs) & set(space.overrides):
        problems.append(f"knobs: {key!r} is also a fixed override; give it in one place")
    names = [o.name for o in space.objectives]
    for o in space.objectives:
        if o.name not in OBJECTIVES:
            problems.append(f"objectives: unknown objective {o.name!r}; known: {', '.join(OBJECTIVES)}")
        elif OBJECTIVES[o.name].needs_task and not o.task:
            problems.append(f"objectives: {o.name} needs task: (a built-in task name or a task YAML)")
        elif o.task is not None:
            problems += [f"objectives: {o.name}: {p}" for p in _task_problems(o.task)]
    if len(set(names)) != len(names):
        problems.append(f"objectives: each objective at most once (got {names})")
    final_only = [n for n in names if n in OBJECTIVES and OBJECTIVES[n].final_only]
    for name in final_only if space.early_stopping.enabled else []:
        problems.append(f"early_stopping: {name} is only known at the end of a trial; turn early stopping off")
    if not space.searched:
        problems.append("knobs: at least one knob needs a distribution (uniform, loguniform, int or choice)")
    needs = SAMPLERS[space.sampler.name].requires
    if needs is not None and importlib.util.find_spec(needs) is None:
        problems.append(f"sampler: {space.sampler.name} needs {needs} (pip install {needs})")
    if space.mlflow is not None and importlib.util.find_spec("mlflow") is None:
        problems.append("mlflow: the mlflow package is not installed (pip install mlflow)")
    for i, point in enumerate(space.points_to_evaluate):
        missing = sorted(set(space.searched) - set(point))
        if missing:
            problems.append(f"points_to_evaluate[{i}]: missing knob(s) {missing}")
        for key, value in point.items():
            knob = space.searched.get(key)
            if knob is None:
                problems.append(f"points_to_evaluate[{i}]: {key!r} is not a searched knob")
            elif not knob.contains(value):
                problems.append(f"points_to_evaluate[{i}]: {key}={value!r} is outside the knob's {knob.kind} range")
    return problems


def _task_problems(task: str) -> list[str]:
    from atp_ray.evaluation.tasks import resolve_tasks

    try:
        resolve_tasks([task])
    except ConfigError as err:
        return [p.removeprefix("--tasks: ") for p in err.problems]
    return []


def _config_problems(space: SearchSpace, base: dict[str, Any]) -> list[str]:
    """Run the run config's own checks on the base and on each knob's extreme values."""
    problems: list[str] = []
    try:
        load_config(copy.deepcopy(base))
    except ConfigError as err:
        return [f"base run config: {p}" for p in err.problems]
    for key, knob in space.searched.items():
        for value in knob.extremes():
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(f"knobs: {key}: bounds must be finite (got {value})")
                continue
            try:
                load_config(copy.deepcopy(base), [_override(key, value)])
            except ConfigError as err:
                problems += [f"knobs: {key}={value!r}: {p}" for p in err.problems]
    if not problems and space.resources.gpu_memory_gib is not None:
        plan = gpu_memory_plan(space, base)
        problems += plan[1] if plan is not None else []
    return problems


def gpu_memory_plan(space: SearchSpace, base: dict[str, Any]) -> tuple[MemoryPlan | None, list[str]] | None:
    """The memory plan of a GPU space's heaviest trial and its problems (None for a CPU space).

    Problems only when resources.gpu_memory_gib is set: the plan does not fit it, or the
    model's config cannot be read to make one (then the plan is None).
    """
    if space.resources.gpus_per_worker == 0:
        return None
    extremes = {key: knob.extremes() for key, knob in space.searched.items()}
    try:
        return search_plan(base, extremes, space.resources.gpu_memory_gib)
    except ConfigError as err:
        return None, err.problems if space.resources.gpu_memory_gib is not None else []
