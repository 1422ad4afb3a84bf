"""Errors the CLI turns into one sentence on stderr and an exit code."""

from .exit_codes import ExitStatus


class CliError(Exception):
    """Raised for any failure the user should read about; carries its exit code."""

    exit_code = ExitStatus.INTERNAL

    def __init__(self, message: str, exit_code: ExitStatus | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class DaemonUnreachable(CliError):
    """Raised when no HTTP answer came from the daemon."""

    exit_code = ExitStatus.UNREACHABLE


class ApiError(CliError):
    """Raised when the daemon answered with an error status."""

    def __init__(self, status: int, message: str):
        code = {404: ExitStatus.NOT_FOUND, 409: ExitStatus.CONFLICT, 503: ExitStatus.UNAVAILABLE}.get(
            status, ExitStatus.REJECTED)
        super().__init__(message, code)
        self.status = status
