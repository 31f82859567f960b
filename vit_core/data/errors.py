"""The one error a user of the data path sees: what went wrong and where."""

from __future__ import annotations


class DatasetError(RuntimeError):
    """A dataset or source that cannot be used; the message names the location (file, line,
    shard) and never holds credentials."""
