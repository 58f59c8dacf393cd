"""`everything-server`: run the gRPC server (default) or `migrate` the database."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from pydantic import ValidationError

from everything_server import logs
from everything_server.config import Settings

log = logging.getLogger("everything_server")


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {}
    if getattr(args, "port", None) is not None:
        overrides["port"] = args.port
    if getattr(args, "host", None):
        overrides["host"] = args.host
    if getattr(args, "migrate", False):
        overrides["migrate_on_start"] = True
    if getattr(args, "workers", None) is not None:
        overrides["workers"] = args.workers
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()]
        sys.exit("invalid configuration:\n" + "\n".join(lines))


async def _serve(settings: Settings) -> None:
    from everything_server.app import App

    app = App(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await app.start()
    await stop.wait()
    await app.stop()


def _supervise(settings: Settings) -> int:
    """Run `settings.workers` server processes on one port (SO_REUSEPORT): the kernel spreads
    connections over them, so every core serves. What must happen once (the embedded database,
    migrations, development keys) happens here first; SIGTERM/SIGINT are passed on to the workers,
    which drain as usual. Exits 0 when every worker did."""
    import os
    import socket
    import subprocess

    from everything_server.container import migration_url, resolve_database_url, signing_keys
    from everything_server.db import migrate

    env = dict(os.environ)
    env["DATABASE_URL"] = url = resolve_database_url(settings)
    if settings.migrate_on_start:
        migrate.upgrade(migration_url(settings, url))
    signing_keys(settings)  # development keys are created here once, so every worker signs alike
    port = settings.port
    if port == 0:
        with socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((settings.host.strip("[]"), 0))
            port = sock.getsockname()[1]
    env.update(
        {
            "EVERYTHING_WORKERS": "1",
            "EVERYTHING_REUSE_PORT": "true",
            "EVERYTHING_PORT": str(port),
            "EVERYTHING_HOST": settings.host,
            "EVERYTHING_MIGRATE_ON_START": "false",
        }
    )
    workers = []
    for i in range(settings.workers):
        worker_env = dict(env)
        if settings.metrics_port:
            worker_env["EVERYTHING_METRICS_PORT"] = str(settings.metrics_port + i)
        workers.append(subprocess.Popen([sys.executable, "-m", "everything_server", "serve"], env=worker_env))
    log.info(
        "workers started", extra={"workers": settings.workers, "port": port, "pids": [w.pid for w in workers]}
    )

    def forward(signum, _frame) -> None:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [w.wait() for w in workers]
    failed = [c for c in codes if c != 0]
    if failed:
        log.error("workers exited with errors", extra={"codes": codes})
    return 1 if failed else 0


async def _migrate(settings: Settings) -> None:
    from everything_server.container import resolve_database_url
    from everything_server.db import migrate

    # The owner's URL when given; else the database's (only then is an embedded one started).
    if settings.migration_database_url is not None:
        url = settings.migration_database_url.get_secret_value()
    else:
        url = await asyncio.to_thread(resolve_database_url, settings)
    await migrate.upgrade_async(url)
    log.info("migrated", extra={"revision": migrate.head_revision()})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="everything-server", description=__doc__)
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "migrate"])
    parser.add_argument(
        "--port", type=int, help="port to listen on (0 picks a free one); env EVERYTHING_PORT"
    )
    parser.add_argument("--host", help="address to bind; env EVERYTHING_HOST (default [::])")
    parser.add_argument("--migrate", action="store_true", help="upgrade the database before serving")
    parser.add_argument(
        "--workers", type=int, help="server processes on one port, e.g. one per core; env EVERYTHING_WORKERS"
    )
    args = parser.parse_args(argv)
    settings = _settings(args)
    logs.setup(settings.log_level, settings.log_json)
    if args.command == "migrate":
        asyncio.run(_migrate(settings))
    elif settings.workers > 1:
        sys.exit(_supervise(settings))
    else:
        # On a loop whose selector admission control reads the load from (rpc.admission).
        from everything_server.rpc.admission import new_event_loop

        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(_serve(settings))


if __name__ == "__main__":
    main()
