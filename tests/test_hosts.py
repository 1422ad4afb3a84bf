"""Several hosts: a services host and two worker hosts, as network namespaces joined by a bridge.

The services host runs its own Redis, FerretDB and the daemon; each worker host runs a
`sless worker` pool that reaches them over the bridge only (its loopback has nothing).
Every job completes, with outcomes from both hosts; then one worker host is cut off
mid-run (its link taken down) and the other recovers its jobs: the cut host's leases
expire, the attempts are settled as lost and run again. Everything here lives in
namespaces and a bridge this test creates, on a private subnet, and is removed after.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import requests

from stack import ROOT, wait_until

FERRETDB = Path(os.environ.get("SLESS_FERRETDB_BIN", Path(os.environ.get("GOPATH", "/root/go")) / "bin" / "ferretdb"))
JOB = "import time\ntime.sleep(input)\nreturn input"


def run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True)


def free_subnet() -> str:
    """A 10.x.y.0/24 prefix no route of this machine uses."""
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, check=True).stdout
    for third in range(200, 250):
        prefix = f"10.231.{third}"
        if prefix + "." not in routes:
            return prefix
    raise AssertionError("no free 10.231.x.0/24 subnet for the test hosts")


class Hosts:
    """Three namespaces on one bridge: svc (.1), h1 (.2), h2 (.3); this host is .254."""

    def __init__(self, log_dir: Path):
        self.tag = uuid.uuid4().hex[:4]
        self.prefix = free_subnet()
        self.bridge = f"slbr{self.tag}"
        self.names = {name: f"sless-{name}-{self.tag}" for name in ("svc", "h1", "h2")}
        self.addresses = {"svc": f"{self.prefix}.1", "h1": f"{self.prefix}.2", "h2": f"{self.prefix}.3"}
        self.log_dir = log_dir
        self.processes: dict[str, subprocess.Popen] = {}
        self.state = Path(tempfile.mkdtemp(prefix="sless-hosts-"))

    def create(self) -> Hosts:
        run("ip", "link", "add", self.bridge, "type", "bridge")
        run("ip", "addr", "add", f"{self.prefix}.254/24", "dev", self.bridge)
        run("ip", "link", "set", self.bridge, "up")
        for name, namespace in self.names.items():
            outside, inside = self.link(name), f"sl{name}{self.tag}i"
            run("ip", "netns", "add", namespace)
            run("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
            run("ip", "link", "set", inside, "netns", namespace)
            run("ip", "link", "set", outside, "master", self.bridge)
            run("ip", "link", "set", outside, "up")
            run("ip", "-n", namespace, "addr", "add", f"{self.addresses[name]}/24", "dev", inside)
            run("ip", "-n", namespace, "link", "set", inside, "up")
            run("ip", "-n", namespace, "link", "set", "lo", "up")
        return self

    def link(self, name: str) -> str:
        """The bridge side of a host's cable."""
        return f"sl{name}{self.tag}o"

    def start(self, key: str, host: str, *command: str, env: dict | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"hosts-{key}-{self.tag}.log", "w")
        process = subprocess.Popen(["ip", "netns", "exec", self.names[host], *command], stdout=log,
                                   stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=ROOT)
        self.processes[key] = process
        return process

    def log(self, key: str) -> str:
        return (self.log_dir / f"hosts-{key}-{self.tag}.log").read_text()

    def stop(self, key: str, sig: int = signal.SIGTERM) -> None:
        process = self.processes[key]
        if process.poll() is None:
            os.killpg(process.pid, sig)
            try:
                process.wait(timeout=45)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def destroy(self) -> None:
        """Kill every process in the namespaces (workers of a cut-off host never finish
        writing their outcomes), then remove the namespaces and the bridge."""
        for key in list(self.processes):
            self.stop(key, signal.SIGKILL)
        for namespace in self.names.values():
            pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        shutil.rmtree(self.state, ignore_errors=True)


def reachable(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


@pytest.fixture
def hosts(logs_dir):
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.fail("this test needs root and iproute2 (`ip`) to create network namespaces")
    made = Hosts(logs_dir).create()
    try:
        svc = made.addresses["svc"]
        made.start("redis", "svc", "redis-server", "--bind", svc, "--port", "6379", "--save", "", "--appendonly", "no",
                   "--protected-mode", "no")  # reachable only on the test bridge
        made.start("ferretdb", "svc", str(FERRETDB), "--handler=sqlite",
                   f"--sqlite-url=file:{made.state}/?_pragma=synchronous(normal)",
                   f"--listen-addr={svc}:27017", "--telemetry=disable", "--debug-addr=-",
                   f"--state-dir={made.state}", "--log-level=warn")
        made.env = {k: v for k, v in os.environ.items() if not k.startswith("SLESS_")}
        made.env.update({"SLESS_REDIS_URL": f"redis://{svc}:6379/0", "SLESS_MONGO_URL": f"mongodb://{svc}:27017",
                         "SLESS_HOST": svc, "SLESS_PORT": "3000", "SLESS_LEASE_S": "3", "SLESS_SWEEP_INTERVAL_S": "0.5",
                         "SLESS_RETRY_BACKOFF_S": "0.2", "SLESS_ORPHAN_GRACE_S": "2",
                         "SLESS_ORPHAN_SCAN_INTERVAL_S": "3", "PYTHONUNBUFFERED": "1"})
        time.sleep(1.0)  # FerretDB and Redis bind within a second; the daemon waits for them anyway
        made.start("daemon", "svc", sys.executable, "-m", "sless", "daemon", env=made.env)
        made.url = f"http://{svc}:3000"
        wait_until(lambda: reachable(made.url + "/health"), 30, "the services host did not come up")
        for host in ("h1", "h2"):
            made.start(host, host, sys.executable, "-m", "sless", "worker", "--count", "2", env=made.env)
        yield made
    finally:
        made.destroy()


def submit(hosts: Hosts, seconds: float) -> str:
    answer = requests.post(hosts.url + "/submit", json={"code": JOB, "input": seconds, "timeout_s": 30}, timeout=10)
    assert answer.status_code == 202, answer.text
    return answer.json()["jobId"]


def status(hosts: Hosts, job_id: str) -> dict:
    return requests.get(f"{hosts.url}/status/{job_id}", timeout=10).json()


def pool_pid(worker: str | None) -> str:
    """Worker names are `<hostname>.<pool pid>.w<slot>.<generation>`; the pool pid tells the host."""
    parts = (worker or "").split(".")
    return parts[-3] if len(parts) >= 3 else ""  # no worker yet (a job waiting, or held before its claim)


def host_of(hosts: Hosts, worker: str | None) -> str:
    """Which host's pool a worker belongs to (`ip netns exec` execs the pool: same pid)."""
    by_pid = {str(hosts.processes[host].pid): host for host in ("h1", "h2")}
    return by_pid.get(pool_pid(worker), "?")


def wait_all(hosts: Hosts, job_ids: list[str], timeout_s: float) -> list[dict]:
    docs = {}

    def done() -> bool:
        for job_id in job_ids:
            if job_id not in docs:
                doc = status(hosts, job_id)
                if doc["state"] in ("completed", "failed", "cancelled"):
                    docs[job_id] = doc
        return len(docs) == len(job_ids)

    wait_until(done, timeout_s, f"{len(job_ids) - len(docs)} jobs did not end", interval_s=0.2)
    return [docs[job_id] for job_id in job_ids]


def test_two_worker_hosts_share_the_queue_and_one_recovers_the_other(hosts):
    wait_until(lambda: requests.get(hosts.url + "/health", timeout=5).json()["queue"]["live_workers"] == 4, 60,
               "four workers (two per host) did not register")
    first = wait_all(hosts, [submit(hosts, 0.2) for _ in range(24)], 60)
    assert all(d["state"] == "completed" for d in first)
    assert {host_of(hosts, d["worker"]) for d in first} == {"h1", "h2"}  # outcomes from both hosts

    jobs = [submit(hosts, 1.0) for _ in range(16)]
    wait_until(lambda: any(host_of(hosts, status(hosts, j).get("worker")) == "h1"
                           and status(hosts, j)["state"] == "running" for j in jobs), 30, "h1 ran nothing")
    run("ip", "link", "set", hosts.link("h1"), "down")  # h1 is cut off from everything, mid-job
    docs = wait_all(hosts, jobs, 120)
    assert [d["state"] for d in docs] == ["completed"] * len(jobs), [d["error"] for d in docs]
    recovered = [d for d in docs if d["attempts"] > 1]
    assert recovered, "no job was running on h1 when it was cut off"
    for doc in recovered:
        assert doc["attempt_errors"][0]["type"] == "worker_lost"
        assert host_of(hosts, doc["worker"]) == "h2"
