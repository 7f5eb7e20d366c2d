"""Errors that reach users, each naming what to fix."""


class SweepError(Exception):
    """Base class for errors sweep raises on purpose."""


class ConfigError(SweepError):
    """A config that cannot run: raised before any work starts, naming the field."""


class WeightsError(SweepError):
    """A weights file that cannot be read safely; the candidate becomes an invalid row."""
