"""Errors a person sees: one clear line each, mapped to an HTTP status by the API."""


class NetweftError(Exception):
    status = 500


class InvalidRequest(NetweftError):
    """The request is malformed or breaks a rule; nothing was changed."""
    status = 400


class NotFound(NetweftError):
    status = 404


class Conflict(NetweftError):
    """The request clashes with existing state (name taken, address in use, still attached)."""
    status = 409


class PoolExhausted(Conflict):
    pass


class KernelError(NetweftError):
    """The kernel refused an operation."""
    status = 500


class Unauthorized(NetweftError):
    """The caller did not prove who it is (no certificate, bad token)."""
    status = 401


class Forbidden(NetweftError):
    """The caller is known but may not do this (worker on a manager call, removed node)."""
    status = 403


class Unavailable(NetweftError):
    """The request needs something that is not there right now (no swarm, manager unreachable)."""
    status = 503
