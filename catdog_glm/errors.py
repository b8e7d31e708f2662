"""Typed errors. Each message says what went wrong and how to fix it; the CLI prints it on one line."""


class CatdogError(Exception):
    """Base class for every error a user can cause and fix."""


class DataError(CatdogError):
    """The dataset is missing, empty, unreadable or has the wrong shape."""


class ImageError(CatdogError):
    """One image file cannot be decoded."""


class CheckpointError(CatdogError):
    """A checkpoint is missing, corrupt, unsafe or of an unknown format."""


class ConfigError(CatdogError):
    """An option has a value that cannot work."""


class WeightsUnavailableError(CatdogError):
    """Pretrained weights are not in the local cache and cannot be downloaded."""


class ModelError(CatdogError):
    """A chat model folder or file is missing, incomplete, unsafe or of an unknown kind."""
