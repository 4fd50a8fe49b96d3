"""The errors raised when a dataset is not where a DataModule looks for it, or one of its image files cannot be read."""

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


class UnreadableImageError(OSError):
    """An image file that cannot be read as an RGB image (truncated, not an image, an unsupported mode).

    Built by :func:`unreadable_image_error` (one message argument, so a loader worker can re-raise it);
    ``path`` is the file.
    """

    path: str = ""


def unreadable_image_error(path: str, cause: str) -> UnreadableImageError:
    """The error for the image file ``path``: names the file, the cause, and ``data.unreadable_images=skip``."""
    error = UnreadableImageError(
        f"cannot read the image file {path}: {cause}. Replace or delete the file, or set "
        "data.unreadable_images=skip to skip unreadable images (each is named in a warning and counted)"
    )
    error.path = path
    return error
