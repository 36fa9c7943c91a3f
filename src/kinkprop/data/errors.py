"""The single exception type raised by :mod:`kinkprop.data`."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """A data file or dataset is missing, malformed or cannot be built.

    The message is meant for people: it names the file or dataset concerned, says what is
    wrong, and where possible how to fix it.
    """
