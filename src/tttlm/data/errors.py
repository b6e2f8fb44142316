"""The one error type of the data pipeline."""

from __future__ import annotations

from tttlm.errors import UserError


class DataError(UserError):
    """Bad input data, a bad tokenizer spec or a dataset that does not fit the request.

    Messages are one line and name the file (and line or byte offset) at fault, so that the
    command line can print them as they are.
    """
