"""The exceptions sless raises; foreign errors are wrapped where they enter."""

import functools

import redis

REDIS = "Redis"


class SlessError(Exception):
    """Base class of every error sless raises on purpose."""


class ConfigError(SlessError):
    """Raised when a setting is missing, malformed or out of range at start-up."""


class BadRequest(SlessError):
    """Raised when a submission is malformed; the message is shown to the caller."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class DependencyDown(SlessError):
    """Raised when Redis or MongoDB cannot be reached; `dependency` names which."""

    def __init__(self, dependency: str, detail: str):
        super().__init__(f"{dependency} is unavailable: {detail}")
        self.dependency = dependency


class SandboxUnavailable(SlessError):
    """Raised when the sandbox cannot be created on this machine."""


def redis_call(method):
    """Wrap redis-py errors as DependencyDown("Redis").

    Besides connection errors and timeouts this covers a Redis that answers but
    refuses (out of memory, read-only replica, still loading): unavailable either way.
    """

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except redis.RedisError as e:
            raise DependencyDown(REDIS, str(e)[:300]) from e

    return wrapper
