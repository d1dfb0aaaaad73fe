"""The Optuna samplers a search space may name, built where they are used.

A sampler is never pickled: Tune pickles its searcher (when the Tuner starts and at every
experiment checkpoint), and a sampler may hold a thread lock (optuna 5.1's NSGA-II does).
The searcher keeps a :class:`SamplerFactory` instead, a small picklable value, and builds
the sampler from it whenever it (re)opens the study.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

Builder = Callable[[int, int], Any]  # (seed, population_size) -> a fresh Optuna sampler


@dataclass(frozen=True)
class SamplerKind:
    """One entry of the registry: how to build the sampler, and a package it needs beyond Optuna."""

    name: str
    build: Builder
    requires: str | None = None  # checked when a space is loaded, before Ray starts


# name -> kind: the one list of valid sampler names (the space's ``sampler.name`` reads it).
SAMPLERS: dict[str, SamplerKind] = {}


def _sampler(name: str, requires: str | None = None) -> Callable[[Builder], Builder]:
    def register(build: Builder) -> Builder:
        SAMPLERS[name] = SamplerKind(name, build, requires)
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


@_sampler("gp", requires="scipy")
def _gp(seed: int, population: int) -> Any:
    import optuna

    return optuna.samplers.GPSampler(seed=seed)


@_sampler("random")
def _random(seed: int, population: int) -> Any:
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


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
        if self.name not in SAMPLERS:
            raise ValueError(f"sampler: unknown name {self.name!r}; known: {', '.join(SAMPLERS)}")

    def __call__(self, offset: int = 0) -> Any:
        """A fresh sampler; ``offset`` shifts its seed (a restored searcher passes the trials
        the study holds, so it does not draw the proposals of a fresh one all over again)."""
        return SAMPLERS[self.name].build(self.seed + offset, self.population_size)
