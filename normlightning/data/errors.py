"""The error raised when a dataset is not where a DataModule looks for it."""

from __future__ import annotations


class DatasetNotFoundError(FileNotFoundError):
    """A dataset folder is missing or incomplete.

    The message names the DataModule, the folder searched, the expected layout and how to
    get the data.
    """

    def __init__(self, datamodule: str, root: str, layout: str, how_to_get: str, problem: str = "") -> None:
        message = (
            f"{datamodule}: dataset not found or incomplete under root={root!r}"
            + (f" ({problem})" if problem else "")
            + f".\nExpected layout:\n{layout}\nHow to get it: {how_to_get}"
        )
        super().__init__(message)
