"""Exit codes shared by every command; the README lists them."""

from enum import IntEnum


class ExitStatus(IntEnum):
    SUCCESS = 0  # done; for a job: it completed
    JOB_FAILED = 1  # the job ended in state failed
    USAGE = 2  # bad flags or arguments (Typer's own code)
    UNREACHABLE = 3  # the daemon did not answer (down, wrong URL, timed out)
    NOT_FOUND = 4  # no job has that id
    REJECTED = 5  # the daemon refused the request (bad input, missing token)
    UNAVAILABLE = 6  # Redis or MongoDB is down (503), or `sless health` found something down
    FILE_ERROR = 7  # a local file could not be read
    NOT_FINISHED = 8  # the job is still submitted or running
    CONFIG = 9  # a setting is invalid
    INTERNAL = 10  # an unexpected error; rerun with --debug for the traceback
    SANDBOX_UNAVAILABLE = 11  # workers refused to start: bubblewrap cannot create the sandbox here
    CONFLICT = 12  # the job is not in a state that allows this (retrying a job that has not failed, cancelling one that ended)
    JOB_CANCELLED = 13  # the job ended in state cancelled
