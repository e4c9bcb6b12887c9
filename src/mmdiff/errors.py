"""The project's exceptions: each message says what was expected, what was found, what to do;
and the exit codes of the command line."""

import errno


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


# Exit codes of every `mmdiff` command (docs/bad_inputs.md shows each class of bad input with its code).
EXIT_OK = 0
EXIT_BUG = 1
"""An error mmdiff did not expect: a bug, reported with its traceback."""
EXIT_BAD_INPUT = 2
"""Bad input or config: the message says what was expected, what was found and what to do."""
EXIT_INTERRUPTED = 130
"""Ctrl-C (SIGINT): finished stages are kept and the next run resumes."""

_USER_ERRNOS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENAMETOOLONG: "file name too long",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "the path is a folder, expected a file",
}


def os_error_message(exc: OSError) -> str | None:
    """What to tell the user about an OSError that the environment or the paths they gave cause
    (an unwritable or full output folder), or None for one that is a bug."""
    if exc.errno not in _USER_ERRNOS:
        return None
    where = exc.filename if exc.filename is not None else "a file"
    if exc.filename2 is not None:
        where = f"{exc.filename} -> {exc.filename2}"
    fix = {errno.ENOSPC: "free some space or choose another --runs-dir",
           errno.EDQUOT: "free some space or choose another --runs-dir"}.get(
        exc.errno, "check the path, or choose a folder you can write (--runs-dir)")
    return f"cannot use {where}: {_USER_ERRNOS[exc.errno]}; {fix}"
