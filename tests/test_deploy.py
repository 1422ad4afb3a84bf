"""The Kubernetes manifests (deploy/kubernetes) agree with the code, the Dockerfile and the compose file.

No cluster runs here: the manifests are parsed and their wiring checked. The KEDA
trigger must watch the very list the workers consume, every variable must be one the
code reads (or the one KEDA reads), and images, ports and privileges must match what
the Dockerfile builds and the compose file grants.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
import redis
import yaml

from sless_daemon.queue import JobQueue
from sless_daemon.settings import Settings, describe

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "deploy" / "kubernetes"
KNOWN_VARIABLES = {name for name, _, _ in describe()}
KEDA_ONLY = {"REDIS_ADDRESS"}


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict]:
    """(kind, name) -> object, from every manifest."""
    found = {}
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            found[(document["kind"], document["metadata"]["name"])] = document
    return found


def container(objects, name: str) -> dict:
    (only,) = objects[("Deployment", name)]["spec"]["template"]["spec"]["containers"]
    return only


def env_of(spec: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in spec.get("env", [])}


def test_every_object_is_there(objects):
    assert set(objects) == {("Secret", "sless-services"), ("Deployment", "sless-daemon"), ("Service", "sless"),
                            ("Deployment", "sless-worker"), ("ScaledObject", "sless-worker")}


def test_keda_watches_the_list_the_workers_consume(objects):
    scaled = objects[("ScaledObject", "sless-worker")]["spec"]
    assert scaled["scaleTargetRef"]["name"] == "sless-worker"
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "redis"
    worker_env = env_of(container(objects, "sless-worker"))
    queue_name = worker_env.get("SLESS_QUEUE_NAME", {}).get("value", Settings().queue_name)
    consumed = JobQueue(redis.Redis(), queue_name).rq_queue.key  # builds the key, connects to nothing
    assert trigger["metadata"]["listName"] == consumed == "rq:queue:compute-tasks"
    secret = objects[("Secret", "sless-services")]["stringData"]
    url = urlparse(secret["SLESS_REDIS_URL"])
    assert trigger["metadata"]["databaseIndex"] == (url.path.strip("/") or "0")
    assert trigger["metadata"]["addressFromEnv"] in worker_env
    assert secret["REDIS_ADDRESS"] == f"{url.hostname}:{url.port}"
    assert scaled["minReplicaCount"] >= 1 <= scaled["maxReplicaCount"]
    # with minReplicaCount >= 1, cooldownPeriod does nothing: scale-in is the HPA's window
    assert "cooldownPeriod" not in scaled
    assert scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] > 0


def test_environment_names_are_the_settings_the_code_reads(objects):
    secret = objects[("Secret", "sless-services")]["stringData"]
    for name in ("sless-daemon", "sless-worker"):
        for variable, entry in env_of(container(objects, name)).items():
            assert variable in KNOWN_VARIABLES | KEDA_ONLY, f"{name} sets {variable}, which nothing reads"
            reference = entry.get("valueFrom", {}).get("secretKeyRef")
            if reference:
                assert reference["name"] == "sless-services" and reference["key"] in secret, (name, variable)
    assert set(secret) - KEDA_ONLY <= KNOWN_VARIABLES


def test_images_ports_and_commands_agree_with_the_dockerfile_and_compose(objects):
    dockerfile = (ROOT / "Dockerfile").read_text()
    exposed = int(re.search(r"^EXPOSE (\d+)", dockerfile, re.MULTILINE).group(1))
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    daemon, worker = container(objects, "sless-daemon"), container(objects, "sless-worker")
    assert daemon["image"] == worker["image"] == compose["api"]["image"] == compose["worker"]["image"]
    assert daemon["command"] == compose["api"]["command"] == ["sless", "daemon"]
    assert worker["command"][:2] == ["sless", "worker"]
    assert daemon["ports"][0]["containerPort"] == exposed == int(env_of(daemon)["SLESS_PORT"]["value"])
    assert env_of(daemon)["SLESS_HOST"]["value"] == "0.0.0.0"  # reachable through the Service
    service = objects[("Service", "sless")]["spec"]
    assert service["selector"] == objects[("Deployment", "sless-daemon")]["spec"]["template"]["metadata"]["labels"]
    assert service["ports"][0]["targetPort"] == daemon["ports"][0]["name"]
    assert daemon["readinessProbe"]["httpGet"]["path"] == "/"  # the one route that needs no token


def test_the_worker_gets_what_the_sandbox_needs_and_no_more(objects):
    pod = objects[("Deployment", "sless-worker")]["spec"]["template"]["spec"]
    security = container(objects, "sless-worker")["securityContext"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["worker"]
    assert pod["hostUsers"] is False and security["procMount"] == "Unmasked"
    assert security["seccompProfile"]["type"] == security["appArmorProfile"]["type"] == "Unconfined"
    assert security["capabilities"] == {"drop": ["ALL"], "add": compose["cap_add"]} and compose["cap_drop"] == ["ALL"]
    assert security["allowPrivilegeEscalation"] is False and "privileged" not in security
    assert {"seccomp=unconfined", "apparmor=unconfined", "systempaths=unconfined"} <= set(compose["security_opt"])
    grace = int(env_of(container(objects, "sless-worker"))["SLESS_SHUTDOWN_GRACE_S"]["value"])
    assert pod["terminationGracePeriodSeconds"] > grace  # running jobs finish before the kubelet kills


def test_the_daemon_runs_unprivileged(objects):
    security = container(objects, "sless-daemon")["securityContext"]
    pod = objects[("Deployment", "sless-daemon")]["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["seccompProfile"]["type"] == "RuntimeDefault"
    assert security == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]}}
