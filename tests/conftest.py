"""Session fixtures: a real PostgreSQL database built by migrations, the OpenAI-compatible mock model
over loopback, and the real server in-process on port 0 with stubs for every service.

PostgreSQL: the server at $DATABASE_URL when set (a fresh database is created on it for the run and
dropped after), else an embedded one (pgserver) in a temporary folder.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest

from everything.auth.v1 import auth_service_pb2_grpc
from everything.chat.v1 import chat_service_pb2_grpc
from everything.image.v1 import image_service_pb2_grpc
from everything.preferences.v1 import preferences_service_pb2_grpc
from everything.search.v1 import search_service_pb2_grpc
from everything_server.app import App
from everything_server.config import Settings
from everything_server.db import migrate
from tests import support

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def pg_admin_url():
    """A URL of a PostgreSQL server where the tests may create databases."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    import pgserver

    # Not under pytest's basetemp: concurrent pytest runs prune each other's old basetemps.
    pgdata = Path(tempfile.mkdtemp(prefix="everything-test-pg-"))
    server = pgserver.get_server(pgdata, cleanup_mode="delete")
    yield server.get_uri("postgres")
    server.cleanup()


@pytest.fixture(scope="session")
async def database_url(pg_admin_url: str):
    """A fresh database for this run, migrated to head; dropped at the end."""
    name = f"everything_test_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(pg_admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = _with_database(pg_admin_url, name)
    await migrate.upgrade_async(url)
    yield url
    admin = await asyncpg.connect(pg_admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="session")
async def mock_model():
    """The project's OpenAI-compatible mock model, over loopback, for the whole run."""
    from everything_server.ai.mock import MockModelServer

    mock = MockModelServer()
    await mock.start(host="127.0.0.1", port=0)
    yield mock
    await mock.stop()


@pytest.fixture(scope="session")
def jwt_keys() -> str:
    return f"test-1:{secrets.token_urlsafe(40)}"


@pytest.fixture(scope="session")
def gateway_port() -> int:
    """A free loopback port kept for the run's Envoy, so signed image URLs can point at it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def settings_env(
    database_url: str, mock_model, jwt_keys: str, tmp_path_factory, gateway_port
) -> dict[str, str]:
    """The environment a server of this run gets (in-process or as a subprocess)."""
    return {
        "EVERYTHING_IMAGE_URL_BASE": f"http://127.0.0.1:{gateway_port}",
        "DATABASE_URL": database_url,
        "EVERYTHING_DATA_DIR": str(tmp_path_factory.mktemp("data")),
        "EVERYTHING_JWT_KEYS": jwt_keys,
        "EVERYTHING_URL_SIGNING_KEY": secrets.token_urlsafe(40),
        "OPENAI_BASE_URL": mock_model.base_url,
        "OPENAI_API_KEY": "sk-test-not-a-real-key",
        "EVERYTHING_OPENAI_STALL_TIMEOUT_SECONDS": "3",
        "EVERYTHING_OPENAI_MAX_RETRIES": "0",
        "EVERYTHING_SHUTDOWN_GRACE_SECONDS": "10",
        "EVERYTHING_LOG_LEVEL": "INFO",
        # The suite signs up and calls far more than a person would; limits get tests of their own.
        "EVERYTHING_RATE_LIMIT_PER_MINUTE": "100000",
        "EVERYTHING_SIGN_UP_PER_ADDRESS_PER_HOUR": "100000",
        "EVERYTHING_SIGN_IN_ADDRESS_THRESHOLD": "100000",
    }


def make_settings(env: dict[str, str], **overrides) -> Settings:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return Settings(_env_file=None, host="127.0.0.1", port=0, **overrides)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def settings(settings_env) -> Settings:
    return make_settings(settings_env)


@pytest.fixture(scope="session")
async def app(settings: Settings):
    server = App(settings)
    await server.start()
    yield server
    await server.stop(grace=5)


@pytest.fixture(scope="session")
async def channel(app: App):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        await asyncio.wait_for(ch.channel_ready(), 10)
        yield ch


@pytest.fixture(scope="session")
def auth_stub(channel):
    return auth_service_pb2_grpc.AuthServiceStub(channel)


@pytest.fixture(scope="session")
def chat_stub(channel):
    return chat_service_pb2_grpc.ChatServiceStub(channel)


@pytest.fixture(scope="session")
def search_stub(channel):
    return search_service_pb2_grpc.SearchServiceStub(channel)


@pytest.fixture(scope="session")
def image_stub(channel):
    return image_service_pb2_grpc.ImageServiceStub(channel)


@pytest.fixture(scope="session")
def preferences_stub(channel):
    return preferences_service_pb2_grpc.PreferencesServiceStub(channel)


@pytest.fixture
async def user(auth_stub) -> support.SignedUpUser:
    """A freshly signed-up user (unique email), so tests never share data."""
    return await support.sign_up(auth_stub)


@pytest.fixture
async def other_user(auth_stub) -> support.SignedUpUser:
    return await support.sign_up(auth_stub)


@pytest.fixture
async def db_conn(database_url: str):
    """A direct asyncpg connection (as the migration owner) for checking what was stored."""
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()
