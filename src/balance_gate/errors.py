"""Domain errors. They are mapped to gRPC and HTTP answers in one place (status.py)."""

from __future__ import annotations


class GateError(Exception):
    """Base class of errors that carry a message meant for the caller."""


class InvalidArgument(GateError):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(GateError):
    pass


class AlreadyExists(GateError):
    pass


class FailedPrecondition(GateError):
    pass


class PermissionDenied(GateError):
    """The caller is known but not allowed this call (a proxy identity, docs/security.md)."""


class Unauthenticated(GateError):
    """The caller did not prove who it is (the HTTP endpoint's proxy secret)."""


class Unavailable(GateError):
    """A dependency (Redis, Postgres) cannot be reached; the call may be retried."""
