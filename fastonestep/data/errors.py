"""The one exception type for datasets that are missing or malformed."""
from __future__ import annotations


class DataError(ValueError):
    """A dataset could not be found or read. The message names the file or path and what is wrong with it,
    so a user can fix the data without reading a traceback."""
