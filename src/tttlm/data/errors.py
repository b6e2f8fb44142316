"""The one error type of the data pipeline."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data, a bad tokenizer spec or a dataset that does not fit the request.

    Messages are one line and name the file (and line or byte offset) at fault, so that the
    command line can print them as they are; a ``ValueError`` so that library callers who
    validate arguments generically still catch it.
    """
