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
