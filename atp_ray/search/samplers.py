"""The Optuna samplers a search space may name, built where they are used.

A sampler is never pickled: Tune pickles its searcher (when the Tuner starts and at every
experiment checkpoint), and a sampler may hold a thread lock (optuna 5.1's NSGA-II does).
The searcher keeps a :class:`SamplerFactory` instead, a small picklable value, and builds
the sampler from it whenever it (re)opens the study.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

# name -> builder(seed, population_size); the one list of valid sampler names.
SAMPLER_BUILDERS: dict[str, Callable[[int, int], Any]] = {}


def _sampler(name: str) -> Callable[[Callable[[int, int], Any]], Callable[[int, int], Any]]:
    def register(build: Callable[[int, int], Any]) -> Callable[[int, int], Any]:
        SAMPLER_BUILDERS[name] = build
        return build

    return register


@_sampler("nsga2")
def _nsga2(seed: int, population: int) -> Any:
    import optuna

    return optuna.samplers.NSGAIISampler(seed=seed, population_size=population)


@_sampler("tpe")
def _tpe(seed: int, population: int) -> Any:
    import optuna

    # constant_liar: trials running at once are told apart instead of proposed twice
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True, multivariate=True)


@_sampler("gp")
def _gp(seed: int, population: int) -> Any:
    import optuna

    return optuna.samplers.GPSampler(seed=seed)


@_sampler("random")
def _random(seed: int, population: int) -> Any:
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


SAMPLERS = tuple(SAMPLER_BUILDERS)


def default_population(trials: int) -> int:
    """NSGA-II's population when the space names none: a quarter of the trials, 2 to 50."""
    return min(50, max(2, trials // 4))


@dataclass(frozen=True)
class SamplerFactory:
    """A picklable recipe for one seeded sampler: ``factory()`` builds a fresh one."""

    name: str
    seed: int
    population_size: int

    def __post_init__(self) -> None:
        if self.name not in SAMPLER_BUILDERS:
            raise ValueError(f"sampler: unknown name {self.name!r}; known: {', '.join(SAMPLERS)}")

    def __call__(self, offset: int = 0) -> Any:
        """A fresh sampler; ``offset`` shifts its seed (a restored searcher passes the trials
        the study holds, so it does not draw the proposals of a fresh one all over again)."""
        return SAMPLER_BUILDERS[self.name](self.seed + offset, self.population_size)
