"""Errors raised by the data readers: each names the path, what was expected and the fix."""

from __future__ import annotations


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where they were looked for."""

    def __str__(self) -> str:  # FileNotFoundError would otherwise format (errno, strerror)
        return str(self.args[0]) if self.args else ""


class DataFileError(ValueError):
    """A dataset file exists but is truncated, corrupt or of the wrong format."""
