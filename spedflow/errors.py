"""Exceptions that carry a message meant for the person running spedflow.

Everything a user can get wrong (a path, a parameter, a file that is not what it
claims to be) raises a subclass of :class:`SpedflowError`. The CLI prints its
message as one line and exits non-zero; the Python API lets it propagate.
``InputError`` is also a ``ValueError`` and ``ParameterError`` too, so code that
catches the builtin types keeps working.
"""

from __future__ import annotations

__all__ = ["SpedflowError", "InputError", "ParameterError", "StoreExistsError", "ClusterError"]


class SpedflowError(Exception):
    """Base class of errors caused by the user's input, not by spedflow."""


class InputError(SpedflowError, ValueError):
    """A data file, store or path is missing, unreadable or malformed."""


class ParameterError(SpedflowError, ValueError):
    """A parameter is out of range or of the wrong kind."""


class StoreExistsError(SpedflowError, FileExistsError):
    """The destination exists and ``overwrite`` was not given."""


class ClusterError(SpedflowError, RuntimeError):
    """The dask cluster cannot make progress (no workers, or all of them paused)."""
