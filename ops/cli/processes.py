"""Commands that run a process: the web, the scheduler, history, a sandbox, the whole
system locally."""

from __future__ import annotations

import click

from ops.cli import main


@main.command()
def scheduler() -> None:
    """Run the scheduler (due retries, lost-work sweep, CallRail dispatch, reconciliation)."""
    # Imported here, as in the commands below: only the command that runs a process loads
    # what that process needs (workers, gevent, a sandbox).
    from workers.runtime import runtime, watch_config
    from workers.scheduler import run_forever, start_job_runner

    rt = runtime()
    watcher = watch_config("scheduler")
    runner = start_job_runner(rt)
    try:
        run_forever(rt)
    finally:
        runner.stop()
    if watcher:
        watcher.forget()


@main.command()
@click.option("--host", default="0.0.0.0", show_default=True,  # noqa: S104 - dyno port
              help="address to listen on (the port is PORT)")
def web(host: str) -> None:
    """Run the web process: granian, WEB_CONCURRENCY workers, webhooks and /metrics."""
    from ops.web import serve

    serve(host)


@main.command()
def history() -> None:
    """Run the history process (writes the history records Redis holds into DATABASE_URL)."""
    from workers.history import main as history_main

    history_main()


@main.command(context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("which", type=click.Choice(["rilla", "callrail"]))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def sandbox(which: str, args: tuple[str, ...]) -> None:
    """Run a local stand-in for Rilla or CallRail; ``rilla-bridge sandbox rilla --help``."""
    if which == "rilla":
        from sandbox.rilla import main as sandbox_main
    else:
        from sandbox.callrail import main as sandbox_main
    sandbox_main(list(args))


@main.command()
def run() -> None:
    """Run the whole system locally (Redis if needed, sandboxes, every Procfile process)."""
    from ops.localrun import run_local

    run_local()
