"""Typed errors. Each says what was wrong and what the user must fix.

Library code raises these; the CLI maps them to exit codes (``exit_code``) and the gRPC service edge maps
them to status codes (``grpc_status``, the name of a ``grpc.StatusCode``). Nothing below the edge knows
about either.
"""

from __future__ import annotations


class MemfedError(Exception):
    """Base of every error memfed raises on purpose."""

    exit_code: int = 1
    grpc_status: str = "INTERNAL"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class InvalidArgumentError(MemfedError):
    """A request or argument is malformed: fix the input."""

    exit_code = 3
    grpc_status = "INVALID_ARGUMENT"


class InvalidManifestError(InvalidArgumentError):
    """A cube manifest is missing fields, has bad values, or does not parse."""


class NotFoundError(MemfedError):
    """The named cube, version, file or model does not exist."""

    exit_code = 4
    grpc_status = "NOT_FOUND"


class AlreadyExistsError(MemfedError):
    """A cube version or key file exists already and would be overwritten."""

    exit_code = 5
    grpc_status = "ALREADY_EXISTS"


class IntegrityError(MemfedError):
    """Stored or received bytes do not match their digest or signature: tampered, truncated or corrupt."""

    exit_code = 6
    grpc_status = "DATA_LOSS"


class IncompatibleModelError(MemfedError):
    """A cube was made for another base model than the one it is applied to."""

    exit_code = 7
    grpc_status = "FAILED_PRECONDITION"


class UnsupportedError(MemfedError):
    """The input is well formed but of a kind memfed does not handle (e.g. a non-LoRA PEFT adapter)."""

    exit_code = 8
    grpc_status = "UNIMPLEMENTED"


class LifecycleError(MemfedError):
    """An illegal lifecycle transition or an operation the cube's state does not allow."""

    exit_code = 9
    grpc_status = "FAILED_PRECONDITION"


class StorageError(MemfedError):
    """The store could not write or read (disk full, permissions, I/O error). Nothing was changed."""

    exit_code = 10
    grpc_status = "UNAVAILABLE"


class PermissionDeniedError(MemfedError):
    """The caller is known but not allowed to do this."""

    exit_code = 11
    grpc_status = "PERMISSION_DENIED"


class AuthenticationError(MemfedError):
    """The caller could not be identified (bad certificate, token or signature)."""

    exit_code = 12
    grpc_status = "UNAUTHENTICATED"


class RollbackError(IntegrityError):
    """Catalog integrity (TUF's attacks): a version older than one already published (rollback), or a
    signed catalog answer that expired (freeze) or is older than one seen before. Nothing was changed."""

    grpc_status = "FAILED_PRECONDITION"


class CapacityError(MemfedError):
    """A memory budget or queue is too small for the request (e.g. a module larger than the whole budget)."""

    exit_code = 13
    grpc_status = "RESOURCE_EXHAUSTED"


class UnavailableError(MemfedError):
    """A peer or service could not be reached, or is shutting down. Retrying later may work."""

    exit_code = 14
    grpc_status = "UNAVAILABLE"


class DeadlineExceededError(UnavailableError):
    """The call did not finish before its deadline (the node dropped or stopped the work)."""

    grpc_status = "DEADLINE_EXCEEDED"


class CallCancelledError(UnavailableError):
    """The call was cancelled before it finished."""

    grpc_status = "CANCELLED"


class QualityGateError(MemfedError):
    """Produced work failed its quality check and was not registered (e.g. an internalized module whose
    recall on held-out questions is below the threshold). Nothing was stored; the message says why."""

    exit_code = 15
    grpc_status = "FAILED_PRECONDITION"
