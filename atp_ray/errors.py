"""The exceptions atp-ray raises on purpose; anything else is a bug."""


class ATPRayError(Exception):
    """Base class of every error that atp-ray reports to the user."""


class ConfigError(ATPRayError):
    """A config (YAML or overrides) broke one or more rules; the message lists them all."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid config ({len(self.problems)} problem(s)):\n{lines}")

    def __reduce__(self):
        # Ray re-raises a worker's exception from its pickle; rebuilt from the message alone,
        # the problem list would become one problem per character.
        return (type(self), (self.problems,))


class UnsupportedArchitectureError(ATPRayError):
    """The model's architecture is not one whose structures atp-ray knows how to prune."""


class RunFolderError(ATPRayError):
    """A run folder cannot be used as asked (finished already, or holds another run)."""


class DataError(ATPRayError):
    """A dataset is missing, empty, malformed or does not fit the task asked of it."""


class CompressionError(ATPRayError):
    """A model cannot be compressed as asked, or a folder is not a loadable compressed model."""


class ModelNotFoundError(ATPRayError):
    """A model path names no local model folder and no model the hub (or its cache) can give."""


class ClusterError(ATPRayError):
    """A cluster verb cannot run: a prerequisite is missing, a config breaks a rule, or a job failed."""


class ExperimentError(ATPRayError):
    """An experiment folder cannot be resumed: its search never started, or its saved state is damaged."""
