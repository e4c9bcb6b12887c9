"""The project's exceptions: each message says what was expected, what was found, what to do."""


class MMDiffError(Exception):
    """Base class of every error mmdiff raises on purpose."""


class DataError(MMDiffError, ValueError):
    """A dataset file or record is missing, malformed, or lacks a required field."""


class ModelError(MMDiffError, ValueError):
    """A model, processor or checkpoint cannot be loaded or does not fit."""


class SAEError(MMDiffError, ValueError):
    """An SAE checkpoint is malformed or does not fit the model or layer."""


class ConfigError(MMDiffError, ValueError):
    """A study config is invalid."""


class StoreError(MMDiffError, RuntimeError):
    """An activation store on disk is incomplete, corrupt or inconsistent."""
