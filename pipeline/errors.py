"""The project's error types (base layer: every stage, crowd/ and the application face import them from here).

Two kinds, because they call for opposite handling:

- `UserError`: the input is wrong (a bad Param, configuration, table, file or command line). Retrying cannot
  help; the CLI prints the message without a traceback (exit code 2) and a DAG task fails on its first try.
- `ServiceError`: a server (Label Studio, a search API, the store) failed, went away or answered something
  malformed. Worth retrying; `status` carries the HTTP status when there was one.

Both derive from `SynsetforgeError`, which the CLI prints without a traceback.

    >>> err = ServiceError("export annotations", status=503)
    >>> (err.status, err.transient, isinstance(err, UserError))
    (503, True, False)
"""

from __future__ import annotations

RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class SynsetforgeError(Exception):
    """An error the project raises on purpose, with a message that says what to do."""


class UserError(SynsetforgeError, ValueError):
    """The input is wrong; the message names the input and what to change. Not retried."""


class ServiceError(SynsetforgeError, RuntimeError):
    """A server failed or answered something malformed. `status` is the HTTP status (None: no answer, or a
    malformed one); `transient` says whether a retry may help."""

    def __init__(self, message: str, *, status: int | None = None, transient: bool | None = None):
        super().__init__(message)
        self.status = status
        self.transient = (status is None or status in RETRY_STATUS or status >= 500) if transient is None else transient


class NotFound(ServiceError):
    """The server answered 404 for the thing asked."""

    def __init__(self, message: str, *, status: int | None = 404):
        super().__init__(message, status=status, transient=False)
