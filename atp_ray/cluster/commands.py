"""The command lines of the jobs that ``atp-ray cluster`` submits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class JobCommands:
    """The command lines of the jobs the verbs submit: ``atp-ray``'s own unless told otherwise.

    ``program`` is the command that takes the subcommands ``search``, ``resume``, ``report``
    and ``export`` with atp-ray's arguments (e.g. ``("python", "tests/cluster_job.py")``).
    """

    program: tuple[str, ...] = ("atp-ray",)

    def search(self, space: str, out: str, trials: int | None, overrides: Sequence[str]) -> list[str]:
        trial_args = ["--trials", str(trials)] if trials is not None else []
        return [*self.program, "search", "--space", space, "--out", out, *trial_args, *overrides]

    def resume(self, experiment: str, retry_failed: bool) -> list[str]:
        return [*self.program, "resume", experiment, *(["--retry-failed"] if retry_failed else [])]

    def report(self, experiment: str) -> list[str]:
        return [*self.program, "report", experiment]

    def export(self, experiment: str, trial: str, out: str) -> list[str]:
        return [*self.program, "export", experiment, "--trial", trial, "--out", out]
