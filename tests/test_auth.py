"""SLESS_API_TOKEN: every endpoint but GET / and GET /openapi.json needs the bearer token."""

from __future__ import annotations

from sless_daemon.settings import Settings

TOKEN = "s3cret-token"


def test_token_required_everywhere_but_root(make_stack):
    s = make_stack(workers=1, api_token=TOKEN)
    assert s.get("/").status_code == 200 and s.get("/openapi.json").status_code == 200
    job = "0" * 32
    for method, path in (("GET", "/redis"), ("GET", "/mongo"), ("GET", "/health"), ("GET", "/status/" + job),
                         ("POST", "/submit"), ("POST", "/execute"), ("POST", "/retry/" + job), ("POST", "/cancel/" + job),
                         ("GET", "/jobs"), ("GET", "/events/" + job), ("GET", "/logs/" + job), ("GET", "/metrics")):
        answer = s.get(path) if method == "GET" else s.post(path, {"code": "return 1"})
        assert answer.status_code == 401, path
        assert "Authorization: Bearer" in answer.json()["error"]
    wrong = s.post("/submit", {"code": "return 1"}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    good = s.post("/execute", {"code": "return 5"}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert good.status_code == 200 and good.json()["result"] == 5


def test_cli_sends_the_token(make_stack):
    s = make_stack(workers=1, api_token=TOKEN)
    del s.env["SLESS_API_TOKEN"]  # the daemon has it; the CLI starts without it
    denied = s.cli("submit", "-", input="return 1")
    assert denied.returncode == 5 and "Authorization" in denied.stderr
    s.env["SLESS_API_TOKEN"] = TOKEN
    allowed = s.cli("submit", "-", "--wait", input="return 3")
    assert allowed.returncode == 0 and allowed.stdout.strip() == "3"


def test_daemon_binds_loopback_by_default():
    assert Settings.from_env({}).host == "127.0.0.1"
    assert Settings.from_env({}).port == 3000
    assert Settings.from_env({}).queue_name == "compute-tasks"
