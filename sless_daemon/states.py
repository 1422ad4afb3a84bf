"""The life cycle of a job and the kinds of error an attempt can end with."""

from enum import Enum


class JobState(str, Enum):
    """Where a job is. `submitted` covers both "queued" and "waiting for a retry"."""

    SUBMITTED = "submitted"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"  # by `POST /cancel`: before it started, or its sandbox was killed

    @property
    def is_terminal(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


TERMINAL_STATES = [s.value for s in JobState if s.is_terminal]


class ErrorType(str, Enum):
    """Why an attempt failed; `retryable` says whether another attempt may help."""

    EXCEPTION = "exception"  # user code raised
    SYNTAX = "syntax"  # the code does not compile
    ENTRY = "entry"  # the named entry function is missing or not callable
    TIMEOUT = "timeout"  # wall-clock or CPU-time limit reached
    MEMORY = "memory"  # memory limit reached
    OUTPUT_LIMIT = "output_limit"  # stdout+stderr flooded past the hard limit
    PROCESS_LIMIT = "process_limit"  # too many processes or threads at once
    OPEN_FILES_LIMIT = "open_files_limit"  # too many open files (EMFILE, not handled by the code)
    FILE_SIZE_LIMIT = "file_size_limit"  # a file grew past file_mb (EFBIG)
    DISK_LIMIT = "disk_limit"  # the writable /work is full (ENOSPC)
    INVALID_RESULT = "invalid_result"  # the result is not JSON-serialisable
    RESULT_LIMIT = "result_limit"  # the JSON result is larger than allowed
    CRASHED = "crashed"  # the attempt's process died without reporting
    WORKER_LOST = "worker_lost"  # the worker running the attempt disappeared
    CANCELLED = "cancelled"  # cancelled on request (`POST /cancel`)

    @property
    def retryable(self) -> bool:
        """Deterministic failures of the code itself are not worth another attempt."""
        return self not in (ErrorType.SYNTAX, ErrorType.ENTRY, ErrorType.INVALID_RESULT, ErrorType.RESULT_LIMIT,
                            ErrorType.OUTPUT_LIMIT, ErrorType.PROCESS_LIMIT, ErrorType.OPEN_FILES_LIMIT,
                            ErrorType.FILE_SIZE_LIMIT, ErrorType.DISK_LIMIT, ErrorType.CANCELLED)
