"""The HTTP client of the daemon's API: every CLI command talks to the daemon through it."""

from __future__ import annotations

import requests

from .errors import ApiError, DaemonUnreachable

DEFAULT_URL = "http://127.0.0.1:3000"
# How long one `POST /execute` may wait for the outcome: the daemon answers 202 by then and
# the CLI follows the job (follow.follow_to_end), so a long job never outlasts the HTTP
# timeout, which would hide the id of a job that was accepted.
EXECUTE_WAIT_S = 25.0
HTTP_TIMEOUT_S = 10.0  # beyond what a call asks the daemon to wait


class DaemonClient:
    """Calls the daemon; raises DaemonUnreachable or ApiError with a readable sentence."""

    def __init__(self, base_url: str = DEFAULT_URL, token: str | None = None, timeout_s: float | None = None):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = HTTP_TIMEOUT_S if timeout_s is None else timeout_s
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def submit(self, job: dict) -> dict:
        return self.call("POST", "/submit", job).json()

    def execute(self, job: dict, wait_s: float | None = None) -> dict:
        """Run a job, waiting up to `wait_s` (EXECUTE_WAIT_S) for its outcome; the answer's
        state says whether it came."""
        wait_s = EXECUTE_WAIT_S if wait_s is None else wait_s
        return self.call("POST", "/execute", dict(job, wait_s=wait_s), timeout_s=wait_s + self.timeout_s).json()

    def status(self, job_id: str) -> dict:
        return self.call("GET", f"/status/{quote(job_id)}").json()

    def retry(self, job_id: str) -> dict:
        return self.call("POST", f"/retry/{quote(job_id)}").json()

    def cancel(self, job_id: str) -> tuple[dict, bool]:
        """Cancel a job: its status document, and whether it is cancelled already (200)
        rather than being stopped (202)."""
        answer = self.call("POST", f"/cancel/{quote(job_id)}")
        return answer.json(), answer.status_code == 200

    def jobs(self, state: str | None = None, limit: int | None = None, since: str | None = None) -> dict:
        query = {k: v for k, v in (("state", state), ("limit", limit), ("since", since)) if v is not None}
        return self.call("GET", "/jobs", params=query).json()

    def events(self, job_id: str, after: str, wait_s: float) -> dict:
        """The job's feed after `after`, waiting up to `wait_s` for something new (a long poll)."""
        return self.call("GET", f"/events/{quote(job_id)}", params={"after": after, "wait_s": wait_s},
                         timeout_s=wait_s + self.timeout_s).json()

    def logs(self, job_id: str) -> dict:
        return self.call("GET", f"/logs/{quote(job_id)}").json()

    def health(self) -> dict:
        """The daemon's view of its dependencies; a 503 still carries the details."""
        return self.call("GET", "/health", accept=(200, 503)).json()

    def call(self, method: str, path: str, body: dict | None = None, timeout_s: float | None = None,
             accept: tuple[int, ...] = (200, 202), params: dict | None = None) -> requests.Response:
        url = self.base_url + path
        try:
            response = self.session.request(method, url, json=body, params=params, timeout=timeout_s or self.timeout_s)
        except requests.Timeout:
            raise DaemonUnreachable(f"The daemon at {self.base_url} did not answer within {timeout_s or self.timeout_s:g} s.") from None
        except requests.ConnectionError:
            raise DaemonUnreachable(f"Cannot reach the daemon at {self.base_url}; is `sless daemon` running? (set SLESS_URL to point elsewhere)") from None
        if response.status_code not in accept:
            raise ApiError(response.status_code, error_message(response))
        return response


def quote(job_id: str) -> str:
    """A job id as one path segment, whatever the user typed."""
    return requests.utils.quote(job_id, safe="")


def error_message(response: requests.Response) -> str:
    """The daemon's own sentence from a JSON error, or a generic one; with the job's id when
    the error names one (an accepted job whose outcome could not be waited for)."""
    try:
        body = response.json()
        message, job_id = body.get("error"), body.get("jobId")
    except (ValueError, AttributeError):
        message = job_id = None
    message = message or f"The daemon answered HTTP {response.status_code}."
    return f"{message} (job {job_id})" if job_id else message
