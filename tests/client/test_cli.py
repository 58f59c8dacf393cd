"""The `everything` CLI as a user runs it: a subprocess against the real in-process server, with HOME
in a temporary folder. Subprocesses run through asyncio, so the server (in this event loop) answers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
import pytest

from everything.chat.v1 import chat_pb2
from everything.client import Client, Tokens
from tests.support import BIN, PASSWORD, unique_email

EVERYTHING = str(BIN / "everything")
TIMEOUT = 60


@dataclass
class Result:
    code: int
    out: str
    err: str


@dataclass
class Cli:
    """The CLI for one person: a HOME of their own and the server of this run."""

    home: Path
    server: str

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in {"XDG_CONFIG_HOME", "EVERYTHING_SERVER"}}
        env["HOME"] = str(self.home)
        return env

    @property
    def credentials(self) -> Path:
        return self.home / ".config" / "everything" / "credentials.json"

    def stored(self) -> dict:
        return json.loads(self.credentials.read_text())["servers"][self.server]

    async def __call__(self, *args: str, stdin: str | None = None, cwd: Path | None = None) -> Result:
        proc = await asyncio.create_subprocess_exec(
            EVERYTHING,
            "--server",
            self.server,
            *args,
            env=self.env,
            cwd=cwd or self.home,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin else b""), TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        return Result(proc.returncode, out.decode(), err.decode())

    async def signup(self, email: str | None = None) -> str:
        email = email or unique_email()
        r = await self("signup", "--email", email, "--password-stdin", stdin=PASSWORD + "\n")
        assert r.code == 0, r.err
        return email

    def client(self) -> Client:
        """An async client with the CLI's stored tokens, to check what the CLI did."""
        return Client(self.server, tokens=Tokens.from_dict(self.stored()))


@pytest.fixture
def cli(app, tmp_path) -> Cli:
    home = tmp_path / "home"
    home.mkdir()
    return Cli(home, f"127.0.0.1:{app.port}")


# -- account ----------------------------------------------------------------------------------------


async def test_signup_stores_private_tokens_whoami_works_and_logout_forgets_them(cli):
    email = await cli.signup()
    assert stat.S_IMODE(cli.credentials.stat().st_mode) == 0o600
    stored = cli.stored()
    assert stored["email"] == email and stored["refresh_token"].startswith("rt_")

    r = await cli("whoami")
    assert (r.code, r.out.strip()) == (0, email)

    r = await cli("logout")
    assert r.code == 0, r.err
    assert cli.server not in json.loads(cli.credentials.read_text())["servers"]
    r = await cli("whoami")
    assert r.code == 3
    assert "not logged in" in r.err


async def test_login_with_a_wrong_password_exits_3_naming_the_reason(cli):
    email = await cli.signup()
    await cli("logout")
    r = await cli("login", "--email", email, "--password-stdin", stdin="wrong password entirely\n")
    assert r.code == 3
    assert "INVALID_CREDENTIALS" in r.err
    r = await cli("login", "--email", email, "--password-stdin", stdin=PASSWORD + "\n")
    assert r.code == 0, r.err
    assert (await cli("whoami")).out.strip() == email


async def test_bad_input_exits_2_and_names_the_field(cli):
    r = await cli("signup", "--email", "not-an-email", "--password-stdin", stdin=PASSWORD + "\n")
    assert r.code == 2
    assert "field email" in r.err
    assert "INVALID_ARGUMENT" in r.err


async def test_a_taken_email_exits_1_with_its_reason(cli):
    email = await cli.signup()
    r = await cli("signup", "--email", email, "--password-stdin", stdin=PASSWORD + "\n")
    assert r.code == 1
    assert "EMAIL_TAKEN" in r.err


async def test_commands_need_a_login_first(cli):
    for args in (["threads"], ["prefs", "get"], ["chat", "hello"]):
        r = await cli(*args)
        assert r.code == 3, args
        assert "everything login" in r.err


async def test_an_unreachable_server_exits_5(cli, unused_tcp_port):
    r = await Cli(cli.home, f"127.0.0.1:{unused_tcp_port}")("signup", "--email", unique_email(), "--password-stdin", stdin=PASSWORD + "\n")  # fmt: skip
    assert r.code == 5
    assert "UNAVAILABLE" in r.err


async def test_an_expired_access_token_is_refreshed_and_the_rotated_token_saved(cli, app):
    await cli.signup()
    stored = cli.stored()
    claims = jwt.decode(stored["access_token"], options={"verify_signature": False})
    old, _ = app.container.tokens.issue_access(
        uuid.UUID(claims["sub"]), uuid.UUID(claims["sid"]), now=datetime.now(UTC) - timedelta(hours=1)
    )
    stored.update(access_token=old, access_expires_at=None)  # unknown expiry: the server says so
    doc = json.loads(cli.credentials.read_text())
    doc["servers"][cli.server] = stored
    cli.credentials.write_text(json.dumps(doc))

    r = await cli("whoami")
    assert r.code == 0, r.err
    after = cli.stored()
    assert after["refresh_token"] != stored["refresh_token"], "the rotated refresh token must be kept"
    assert after["access_token"] != old
    assert (await cli("whoami")).code == 0, "and it works for the next command"


@pytest.fixture
def unused_tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- chat -------------------------------------------------------------------------------------------


async def test_chat_streams_the_reply_and_threads_lists_the_thread(cli):
    await cli.signup()
    r = await cli("chat", "Hello there [mock:tokens=6]")
    assert r.code == 0, r.err
    assert len(r.out.split()) == 6, r.out
    thread_id = r.err.split("thread ")[-1].split()[0]

    r = await cli("threads")
    assert r.code == 0, r.err
    assert r.out.split()[0] == thread_id

    r = await cli("chat", "--thread", thread_id, "And again [mock:tokens=3]")
    assert r.code == 0, r.err
    async with cli.client() as c:
        messages = (await c.chat.list_messages(thread_id)).messages
    assert len(messages) == 4


async def test_chat_in_an_unknown_thread_exits_4(cli):
    await cli.signup()
    r = await cli("chat", "--thread", str(uuid.uuid4()), "hello")
    assert r.code == 4, r.err
    assert "NOT_FOUND" in r.err


def _ctrl_c_as_in_a_terminal() -> None:
    """A suite started in the background by a shell without job control (`make test &`) inherits
    SIGINT ignored, and so would the CLI (Python keeps an ignored SIGINT ignored): Ctrl-C as a
    user at a terminal sends it is the default disposition."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


async def test_ctrl_c_during_a_reply_cancels_the_generation_and_exits_130(cli):
    await cli.signup()
    proc = await asyncio.create_subprocess_exec(
        EVERYTHING, "--server", cli.server, "chat", "Tell me a long story [mock:tokens=400 rate=20]",
        env=cli.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        preexec_fn=_ctrl_c_as_in_a_terminal,
    )  # fmt: skip
    try:
        first = await asyncio.wait_for(proc.stdout.read(1), TIMEOUT)  # the reply has started
        assert first, "no reply text before the stream ended"
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 130, err.decode()
    assert "[cancelled]" in err.decode()
    text = (first + out).decode()
    assert 0 < len(text.split()) < 400

    async with cli.client() as c:
        (thread,) = (await c.chat.list_threads()).threads
        messages = (await c.chat.list_messages(thread.id)).messages
    reply = [m for m in messages if m.role == chat_pb2.MESSAGE_ROLE_ASSISTANT][-1]
    assert reply.status == chat_pb2.MESSAGE_STATUS_CANCELLED
    assert reply.content and len(reply.content.split()) < 400


# -- search, image, preferences ---------------------------------------------------------------------


async def test_search_prints_sources_then_the_summary(cli):
    await cli.signup()
    await cli("chat", "penguins live in antarctica [mock:tokens=5]")  # something in the history
    r = await cli("search", "-p", "history", "penguins")
    assert r.code == 0, r.err
    assert r.out.strip(), "neither sources nor a summary"
    assert "[1]" in r.out


async def test_image_shows_progress_and_saves_the_png(cli, tmp_path):
    await cli.signup()
    out = tmp_path / "pictures" / "cat.png"
    r = await cli("image", "a cat in a hat", "--size", "256x256", "-o", str(out))
    assert r.code == 0, r.err
    assert "100%" in r.err, r.err
    assert r.out.strip() == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_prefs_set_changes_only_the_named_keys_and_get_shows_them(cli):
    await cli.signup()
    r = await cli("prefs", "set", "temperature=0.3", "theme=dark", "search_providers=history")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert (doc["temperature"], doc["theme"], doc["search_providers"]) == (0.3, "THEME_DARK", ["history"])

    r = await cli("prefs", "set", "system_prompt=Be brief.")
    assert r.code == 0, r.err
    r = await cli("prefs", "get")
    doc = json.loads(r.out)
    assert (doc["temperature"], doc["theme"], doc["system_prompt"]) == (0.3, "THEME_DARK", "Be brief.")


async def test_prefs_set_rejects_unknown_keys_and_bad_values_with_exit_2(cli):
    await cli.signup()
    r = await cli("prefs", "set", "colour=blue")
    assert r.code == 2 and "unknown preference" in r.err
    r = await cli("prefs", "set", "temperature=hot")
    assert r.code == 2 and "temperature" in r.err
    r = await cli("prefs", "set", "temperature=9")  # a number, but the server's range is 0 to 2
    assert r.code == 2, r.err
    assert "field" in r.err and "temperature" in r.err
