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


async def _migrate(settings: Settings) -> None:
    from everything_server.container import Container
    from everything_server.db import migrate

    if settings.migration_database_url is not None:
        url = settings.migration_database_url.get_secret_value()
        await migrate.upgrade_async(url)
        return
    container = await Container.create(settings)
    try:
        await migrate.upgrade_async(container.database_url)
    finally:
        await container.aclose()
    log.info("migrated", extra={"revision": migrate.head_revision()})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="everything-server", description=__doc__)
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "migrate"])
    parser.add_argument(
        "--port", type=int, help="port to listen on (0 picks a free one); env EVERYTHING_PORT"
    )
    parser.add_argument("--host", help="address to bind; env EVERYTHING_HOST (default [::])")
    parser.add_argument("--migrate", action="store_true", help="upgrade the database before serving")
    args = parser.parse_args(argv)
    settings = _settings(args)
    logs.setup(settings.log_level, settings.log_json)
    if args.command == "migrate":
        asyncio.run(_migrate(settings))
    else:
        asyncio.run(_serve(settings))


if __name__ == "__main__":
    main()
