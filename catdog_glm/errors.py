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


class HubError(ModelError):
    """A model id (Hugging Face Hub or ModelScope) could not be turned into a local folder."""


class ModelNotFoundError(HubError):
    """The hub has no such repository or revision (404)."""


class ModelAccessError(HubError):
    """The repository is private or gated and the token is missing or lacks access (401/403)."""


class ModelOfflineError(HubError):
    """The model is not in the local cache and the hub cannot be reached (offline, HF_HUB_OFFLINE=1)."""


class DiskFullError(HubError):
    """The model cache's disk has no room for the download."""


class DatasetHubError(DataError):
    """A dataset id (Hugging Face, ModelScope, Kaggle or an archive URL) could not be turned into a local folder."""


class DatasetNotFoundError(DatasetHubError):
    """The source has no such dataset, revision or file (404)."""


class DatasetAccessError(DatasetHubError):
    """The dataset is private or gated, or credentials are missing or wrong (401/403)."""


class DatasetOfflineError(DatasetHubError):
    """The dataset is not in the local cache and its source cannot be reached."""
