"""The `sless` command: submit and follow jobs over HTTP, run the daemon and the workers.

Errors become one sentence on stderr and an exit code in `main` only (tracebacks
with --debug). Data goes to stdout, talk to stderr; `--json` for scripts.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Optional

import click
import typer
from rich.live import Live
from rich.text import Text

from . import __version__
from .client import DEFAULT_URL, DaemonClient
from .errors import CliError
from .exit_codes import ExitStatus
from .follow import TERMINAL, Follower, follow_to_end
from .render import LiveJob, err, health_table, jobs_table, out, print_json, status_line, status_view

app = typer.Typer(help="sless: run functions in sandboxes, track every outcome.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=True)

INSECURE_HELP = "Run user code WITHOUT the sandbox (plain processes, rlimits only). Trusted code only."
JSON_HELP = "Machine-readable output."
AUTOSCALE_HELP = ("Grow and shrink the pool between MIN and MAX workers with the queue (instead of --count); "
                  "README: Scaling.")
JSON_LOGS_HELP = "Log one JSON object per line (as SLESS_LOG_FORMAT=json)."


class Context:
    """Global options shared by the commands."""

    def __init__(self, url: str, token: str | None, debug: bool):
        self.url = url
        self.token = token
        self.debug = debug

    def client(self, timeout_s: float | None = None) -> DaemonClient:
        return DaemonClient(self.url, self.token, timeout_s)


def show_version(asked: bool) -> None:
    """`--version`, eager: it answers before Click asks for a command."""
    if asked:
        out.print(f"sless {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    url: str = typer.Option(DEFAULT_URL, envvar="SLESS_URL", help="Daemon URL."),
    token: Optional[str] = typer.Option(None, envvar="SLESS_API_TOKEN", help="API token, if the daemon has one."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks of unexpected errors."),
    version: bool = typer.Option(False, "--version", callback=show_version, is_eager=True,
                                 help="Print the version and exit."),
):
    ctx.obj = Context(url, token, debug)


def parse_input(text: str):
    """JSON when it parses as JSON, else the text itself as a string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def read_text(path: Path, what: str) -> str:
    """A local file's text ('-' is stdin), or a CliError naming the file."""
    try:
        return sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise CliError(f"Cannot read the {what} file {str(path)!r}: {reason}.", ExitStatus.FILE_ERROR) from None


def job_exit_code(doc: dict) -> ExitStatus:
    return {"completed": ExitStatus.SUCCESS, "failed": ExitStatus.JOB_FAILED,
            "cancelled": ExitStatus.JOB_CANCELLED}.get(doc["state"], ExitStatus.NOT_FINISHED)


@app.command()
def submit(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="Python file: a function body using `input`, or a module with main(input). '-' reads stdin."),
    input: Optional[str] = typer.Option(None, "--input", "-i", help="Input: parsed as JSON when it is JSON, else a string."),
    input_file: Optional[Path] = typer.Option(None, "--input-file", help="Read the JSON input from a file."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Wall-clock limit per attempt, seconds."),
    memory: Optional[int] = typer.Option(None, "--memory", help="Memory limit per attempt, MiB."),
    retries: Optional[int] = typer.Option(None, "--retries", help="Retries after a failed attempt."),
    entry: Optional[str] = typer.Option(None, "--entry", help="Function to call in a module (default main)."),
    limit: list[str] = typer.Option([], "--limit", help="Another limit as NAME=VALUE (cpu_s, processes, open_files, "
                                    "file_mb, tmpfs_mb, output_bytes, result_bytes); repeatable."),
    wait: bool = typer.Option(False, "--wait", help="Wait for the outcome and print the result."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Submit a function; print its job id (or, with --wait, its result)."""
    if input is not None and input_file is not None:
        raise CliError("Give either --input or --input-file, not both.", ExitStatus.USAGE)
    job = {"code": read_text(file, "code"), "input": parse_input(input) if input is not None else None}
    if input_file is not None:
        job["input"] = parse_json_file(input_file)
    job.update({k: v for k, v in (("timeout_s", timeout), ("memory_mb", memory), ("retries", retries),
                                  ("entry", entry)) if v is not None})
    job.update(parse_limits(limit))
    client = ctx.obj.client()
    if not wait:
        answer = client.submit(job)
        print_json(answer) if as_json else out.print(answer["jobId"])
        return
    doc = follow_to_end(client, client.execute(job))
    show_outcome(doc, as_json)
    raise typer.Exit(job_exit_code(doc))


def parse_limits(pairs: list[str]) -> dict:
    """`--limit processes=8` -> {"processes": 8}; the daemon checks names and ranges."""
    limits = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise CliError(f"--limit takes NAME=VALUE, not {pair!r}.", ExitStatus.USAGE)
        limits[name.strip()] = parse_input(value.strip())
    return limits


def parse_json_file(path: Path):
    text = read_text(path, "input")
    try:
        return json.loads(text)
    except ValueError as e:
        raise CliError(f"The input file {str(path)!r} is not valid JSON: {e}.", ExitStatus.FILE_ERROR) from None


def show_outcome(doc: dict, as_json: bool) -> None:
    """Result to stdout; error and captured output to stderr."""
    if as_json:
        print_json(doc)
        return
    for stream in ("stdout", "stderr"):
        if doc.get(stream):
            err.print(doc[stream].rstrip("\n"), markup=False)
    if doc["state"] == "completed":
        out.print(json.dumps(doc["result"]), markup=False)
    elif doc.get("error"):
        err.print(Text.assemble((f"job {doc['jobId']} {doc['state']}: ", "red"),
                                f"{doc['error']['type']}: {doc['error']['message']}"), soft_wrap=True)
    else:
        err.print(f"job {doc['jobId']} is {doc['state']}")


@app.command()
def status(
    ctx: typer.Context,
    job_id: str = typer.Argument(..., help="The job id `sless submit` printed."),
    watch: bool = typer.Option(False, "--watch", "-w", help="Follow the job live until it ends."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP + " With --watch, one object per change."),
):
    """Show a job's state and result. Exit 0 completed, 1 failed, 8 not finished, 13 cancelled."""
    client = ctx.obj.client()
    doc = client.status(job_id)
    if watch:
        doc = watch_job(client, doc, as_json)
    elif as_json:
        print_json(doc)
    if not as_json:
        out.print(status_view(doc))
    raise typer.Exit(job_exit_code(doc))


def watch_job(client: DaemonClient, doc: dict, as_json: bool) -> dict:
    """Follow a job to its end: a live rich view on a terminal, plain lines when piped,
    one JSON document per change with --json. Returns the final document."""
    follower = Follower(client, doc)
    if as_json or not out.is_terminal:
        for change in follower.changes():
            if change.output is None:
                print_json(change.doc) if as_json else err.print(status_line(change.doc), markup=False)
        return follower.doc
    view = LiveJob(doc)
    with Live(view, console=out, refresh_per_second=4, transient=True):
        for change in follower.changes():
            view.update(change.doc, change.output)
    return follower.doc


@app.command()
def retry(
    ctx: typer.Context,
    job_id: str = typer.Argument(..., help="A failed job's id."),
    wait: bool = typer.Option(False, "--wait", help="Wait for the new attempt's outcome."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Run a failed job again as a new attempt (its earlier errors are kept)."""
    client = ctx.obj.client()
    doc = client.retry(job_id)
    if not wait:
        print_json(doc) if as_json else err.print(f"job {job_id} queued for attempt {doc['attempts'] + 1}")
        return
    doc = follow_to_end(client, doc)
    show_outcome(doc, as_json)
    raise typer.Exit(job_exit_code(doc))


@app.command()
def logs(
    ctx: typer.Context,
    job_id: str = typer.Argument(..., help="The job id."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing output while the job runs."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP + " With --follow, one object per feed event."),
):
    """Print the job's captured stdout and stderr (its latest attempt's)."""
    client = ctx.obj.client()
    page = client.logs(job_id)
    if as_json and not follow:
        print_json(page)
        return
    if as_json:
        print_json({"kind": "output-so-far", **page})
    else:
        write_output("stdout", page["stdout"])
        write_output("stderr", page["stderr"])
    if not follow or page["state"] in TERMINAL:
        raise typer.Exit(job_exit_code(page) if follow else ExitStatus.SUCCESS)
    follower = Follower(client, client.status(job_id), cursor=page["cursor"])
    attempt = page["attempt"]
    for change in follower.changes():
        if change.output is not None:
            print_json(change.output) if as_json else write_output(change.output["stream"], change.output["text"])
        elif as_json:
            print_json({"kind": "state", "jobId": job_id, "state": change.doc["state"],
                        "attempt": change.doc["attempts"]})
        elif change.doc["attempts"] != attempt and change.doc["state"] == "running":
            attempt = change.doc["attempts"]
            err.print(f"── attempt {attempt} ──", style="dim")
    raise typer.Exit(job_exit_code(follower.doc))


def write_output(stream: str, text: str) -> None:
    """The job's own bytes, as they are (no markup, no wrapping), to our stdout or stderr."""
    target = sys.stdout if stream == "stdout" else sys.stderr
    target.write(text)
    target.flush()


@app.command(name="list")
def list_jobs(
    ctx: typer.Context,
    state: Optional[str] = typer.Option(None, "--state", "-s", help="Only jobs in this state (submitted, running, "
                                        "completed, failed, cancelled)."),
    limit: int = typer.Option(20, "--limit", "-n", min=1, max=1000, help="How many jobs, newest first."),
    since: Optional[str] = typer.Option(None, "--since", help="Only jobs submitted since: an ISO time, or an age "
                                        "like 30s, 15m, 2h, 7d."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
):
    """List recent jobs in a table."""
    listing = ctx.obj.client().jobs(state, limit, parse_since(since) if since else None)
    if as_json:
        print_json(listing)
    else:
        if not out.is_terminal:
            out.width = max(out.width, PIPED_TABLE_WIDTH)  # whole ids and times, for grep and cut
        out.print(jobs_table(listing["jobs"]))


PIPED_TABLE_WIDTH = 150
AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str) -> str:
    """`15m` -> the ISO time 15 minutes ago; an ISO time passes as it is (the daemon checks it)."""
    number, unit = text[:-1], text[-1:].lower()
    if unit in AGE_UNITS and number.replace(".", "", 1).isdigit():
        try:
            moment = datetime.now(timezone.utc) - timedelta(seconds=float(number) * AGE_UNITS[unit])
        except OverflowError:  # further back than year 1
            raise CliError(f"--since {text} reaches back before the year 1; give a shorter age.",
                           ExitStatus.USAGE) from None
        return moment.isoformat(timespec="seconds").replace("+00:00", "Z")
    return text


@app.command()
def cancel(
    ctx: typer.Context,
    job_id: str = typer.Argument(..., help="The job id."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until a running job's sandbox is killed."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
):
    """Cancel a job: a queued one never starts, a running one has its sandbox killed.

    Exit 0 once cancelled (or asked, with --no-wait); 12 if the job ended another way first.
    """
    client = ctx.obj.client()
    doc, cancelled = client.cancel(job_id)
    if not cancelled and wait:
        doc = follow_to_end(client, doc)
    if as_json:
        print_json(doc)
    elif doc["state"] == "cancelled":
        err.print(f"job {job_id} cancelled")
    elif not wait:
        err.print(f"job {job_id}: cancel requested; its worker stops it within a second")
    else:
        err.print(f"job {job_id} ended {doc['state']} before it could be cancelled")
    if wait and doc["state"] != "cancelled":
        raise typer.Exit(ExitStatus.CONFLICT)


@app.command()
def health(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """Check the daemon, Redis, MongoDB, queue depth and live workers. Non-zero exit if any is down."""
    started = time.perf_counter()
    report = ctx.obj.client(timeout_s=5.0).health()
    daemon_ms = (time.perf_counter() - started) * 1000
    healthy = report["status"] == "ok" and bool(report["queue"].get("live_workers"))
    if as_json:
        print_json({**report, "client_latency_ms": round(daemon_ms, 2), "healthy": healthy})
    else:
        out.print(health_table(report, daemon_ms))
    raise typer.Exit(ExitStatus.SUCCESS if healthy else ExitStatus.UNAVAILABLE)


def server_settings(**overrides):
    """Daemon/worker settings from SLESS_* variables, with command-line overrides."""
    from sless_daemon.errors import ConfigError
    from sless_daemon.settings import Settings

    try:
        return Settings.from_env(**overrides)
    except ConfigError as e:
        raise CliError(str(e), ExitStatus.CONFIG) from None


@app.command()
def daemon(
    host: Optional[str] = typer.Option(None, help="Address to bind (env SLESS_HOST; default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="Port (env SLESS_PORT; default 3000)."),
    redis_url: Optional[str] = typer.Option(None, help="Redis URL (env SLESS_REDIS_URL)."),
    mongo_url: Optional[str] = typer.Option(None, help="MongoDB URL (env SLESS_MONGO_URL)."),
    log_format: Optional[str] = typer.Option(None, help="text or json (env SLESS_LOG_FORMAT)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_LOGS_HELP),
):
    """Run the HTTP daemon in the foreground."""
    from sless_daemon.daemon import serve
    from sless_daemon.errors import ConfigError

    settings = server_settings(host=host, port=port, redis_url=redis_url, mongo_url=mongo_url,
                               log_format="json" if as_json else log_format)
    try:
        serve(settings)
    except ConfigError as e:
        raise CliError(str(e), ExitStatus.CONFIG) from None


@app.command()
def worker(
    count: int = typer.Option(2, "--count", "-c", min=1, max=256, help="Worker processes to run."),
    redis_url: Optional[str] = typer.Option(None, help="Redis URL (env SLESS_REDIS_URL)."),
    mongo_url: Optional[str] = typer.Option(None, help="MongoDB URL (env SLESS_MONGO_URL)."),
    log_format: Optional[str] = typer.Option(None, help="text or json (env SLESS_LOG_FORMAT)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_LOGS_HELP),
    autoscale: Optional[str] = typer.Option(None, "--autoscale", metavar="MIN:MAX", help=AUTOSCALE_HELP),
    insecure_no_sandbox: bool = typer.Option(False, "--insecure-no-sandbox", help=INSECURE_HELP),
):
    """Run N supervised worker processes in the foreground (Ctrl-C stops them gently)."""
    settings = server_settings(redis_url=redis_url, mongo_url=mongo_url, log_format="json" if as_json else log_format)
    raise typer.Exit(run_pool(settings, count, insecure_no_sandbox, autoscale))


def run_pool(settings, count: int, insecure: bool, autoscale: str | None = None, stop=None) -> int:
    """Run the worker pool until stopped (Ctrl-C, SIGTERM, or the `stop` event set);
    non-zero when the sandbox cannot be created."""
    from sless_daemon.autoscale import parse_range
    from sless_daemon.logs import configure_logging
    from sless_daemon.worker_pool import build_pool

    try:
        bounds = parse_range(autoscale) if autoscale is not None else None
    except ValueError as e:
        raise CliError(str(e), ExitStatus.USAGE) from None
    configure_logging(settings.log_format, settings.log_level, "pool")
    if stop is not None and stop.is_set():
        return 0  # stopped before it started: no workers to start only to stop
    pool = build_pool(settings, count, insecure, bounds)
    if stop is not None:
        pool.stop_requested = stop
    code = pool.run()
    if code:
        raise CliError("The workers cannot create their sandbox; the worker log above says why and how to fix it.",
                       ExitStatus.SANDBOX_UNAVAILABLE)
    return code


@app.command()
def up(
    count: int = typer.Option(2, "--count", "-c", min=1, max=256, help="Worker processes to run."),
    port: Optional[int] = typer.Option(None, help="Daemon port (env SLESS_PORT; default 3000)."),
    log_format: Optional[str] = typer.Option(None, help="text or json (env SLESS_LOG_FORMAT)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_LOGS_HELP),
    autoscale: Optional[str] = typer.Option(None, "--autoscale", metavar="MIN:MAX", help=AUTOSCALE_HELP),
    insecure_no_sandbox: bool = typer.Option(False, "--insecure-no-sandbox", help=INSECURE_HELP),
):
    """Run the daemon and the workers together in the foreground; Ctrl-C stops all cleanly.

    If the daemon exits on its own (its port taken, a bad setting, a crash), the workers are
    stopped too and `up` exits with the daemon's code: workers with no API in front of them
    would look like a running stack.
    """
    import subprocess
    import threading

    settings = server_settings(port=port, log_format="json" if as_json else log_format)
    env = {**os.environ, **settings.to_env()}
    daemon_process = subprocess.Popen([sys.executable, "-m", "sless", "daemon"], env=env, start_new_session=True)
    stop_pool, ended_alone = threading.Event(), []  # set by Ctrl-C, SIGTERM, the pool's end, or this watch

    def stop_pool_if_the_daemon_ends() -> None:
        code = daemon_process.wait()
        if not stop_pool.is_set():  # not stopped along with up itself
            ended_alone.append(code)
            stop_pool.set()  # as Ctrl-C does: the workers finish what they run, then stop

    threading.Thread(target=stop_pool_if_the_daemon_ends, name="daemon-watch", daemon=True).start()
    try:
        run_pool(settings, count, insecure_no_sandbox, autoscale, stop_pool)
    finally:
        stop_pool.set()
        daemon_process.terminate()
        daemon_process.wait(timeout=10)
    if ended_alone:
        code = ended_alone[0]
        raise CliError(f"The daemon exited on its own (code {code}); its log above says why. The workers were stopped.",
                       code if code > 0 else ExitStatus.INTERNAL)


# Typer 0.2x raises its own copy of Click's exceptions (typer._click, under TyperException);
# earlier versions raise Click's. Both are caught, so a bad flag is a usage error (2), not
# an "unexpected" one (10).
CLICK_EXITS = (click.exceptions.Exit, typer.Exit)
CLICK_ABORTS = (click.exceptions.Abort, typer.Abort)
CLICK_ERRORS = (click.ClickException, getattr(typer, "TyperException", click.ClickException))


def main() -> None:
    """Entry point: run the app and turn errors into a sentence and an exit code."""
    debug = "--debug" in sys.argv
    try:
        code = app(standalone_mode=False, prog_name="sless")
    except CliError as e:
        say_error(str(e))
        sys.exit(e.exit_code)
    except CLICK_EXITS as e:
        sys.exit(e.exit_code)
    except CLICK_ERRORS as e:
        if hasattr(e, "show"):
            e.show()  # Click's usage line and message
        else:
            say_error(e.format_message())
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, *CLICK_ABORTS):
        say_error("interrupted")
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the one place unexpected errors become a sentence
        if debug:
            raise
        say_error(f"unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback)")
        sys.exit(ExitStatus.INTERNAL)
    sys.exit(code if isinstance(code, int) else ExitStatus.SUCCESS)


def say_error(message: str) -> None:
    err.print(Text.assemble(("error: ", "red bold"), message), soft_wrap=True)
