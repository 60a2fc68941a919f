"""Errors a user can fix: each says what is wrong, where, and how to fix it.

The CLI prints an `MllmError` as one line on stderr and exits with code 2; anything else is a bug in
mllm and keeps its traceback.
"""

from __future__ import annotations


class MllmError(ValueError):
    """A problem with user input (config, data, models, URIs, storage)."""

    def __init__(self, what: str, fix: str | None = None) -> None:
        self.what = what
        self.fix = fix
        super().__init__(f"{what}; fix: {fix}" if fix else what)


class ConfigError(MllmError):
    """The experiment config (YAML or `--set` overrides) is malformed or invalid."""


class DataError(MllmError):
    """A data source is missing, unreadable, or holds rows mllm cannot use."""


class ModelError(MllmError):
    """A model directory or id cannot be used (missing files, unsafe weights, wrong kind)."""


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM (Slurm preemption, `kill`, timeouts): runs
    end KILLED and the CLI exits 143."""
