"""Helpers shared by the tests: status details, users, subprocess servers. Loopback only."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import orjson
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from everything.auth.v1 import auth_service_pb2 as auth_pb

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PASSWORD = "correct horse battery staple"


@dataclass
class Details:
    code: grpc.StatusCode
    message: str
    reason: str | None
    fields: dict[str, str]
    retry_after: float | None
    quota: list[str]
    metadata: dict[str, str]


def details(err: grpc.aio.AioRpcError | grpc.RpcError) -> Details:
    """Decode google.rpc.Status details of an error (ErrorInfo, BadRequest, RetryInfo, QuotaFailure)."""
    status = rpc_status.from_call(err)
    reason, fields, retry, quota, md = None, {}, None, [], {}
    for any_ in status.details if status else []:
        for cls in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.RetryInfo,
            error_details_pb2.QuotaFailure,
        ):
            if any_.Is(cls.DESCRIPTOR):
                msg = cls()
                any_.Unpack(msg)
                if isinstance(msg, error_details_pb2.ErrorInfo):
                    reason, md = msg.reason, dict(msg.metadata)
                elif isinstance(msg, error_details_pb2.BadRequest):
                    fields = {v.field: v.description for v in msg.field_violations}
                elif isinstance(msg, error_details_pb2.RetryInfo):
                    retry = msg.retry_delay.ToNanoseconds() / 1e9
                else:
                    quota = [v.subject for v in msg.violations]
    return Details(err.code(), err.details() or "", reason, fields, retry, quota, md)


async def expect_error(
    awaitable, code: grpc.StatusCode, reason: str | None = None, field: str | None = None
) -> Details:
    """Await a call that must fail with `code` (and the ErrorInfo reason / BadRequest field)."""
    try:
        await awaitable
    except grpc.aio.AioRpcError as err:
        d = details(err)
        assert d.code == code, f"expected {code}, got {d.code}: {d.message}"
        if reason is not None:
            assert d.reason == reason, f"expected reason {reason}, got {d.reason}: {d.message}"
        if field is not None:
            assert field in d.fields, f"expected a violation of {field}, got {d.fields}"
        return d
    raise AssertionError(f"expected {code}, but the call succeeded")


def unique_email() -> str:
    return f"user-{uuid.uuid4().hex[:12]}@example.com"


@dataclass
class SignedUpUser:
    id: str
    email: str
    password: str
    access_token: str
    refresh_token: str
    session_id: str = ""

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.access_token}"),)


async def sign_up(auth_stub, email: str | None = None, password: str = PASSWORD) -> SignedUpUser:
    email = email or unique_email()
    resp = await auth_stub.SignUp(auth_pb.SignUpRequest(email=email, password=password))
    return SignedUpUser(resp.user.id, email, password, resp.tokens.access_token, resp.tokens.refresh_token)


# -- subprocess servers -------------------------------------------------------------------------


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)


def server_env(settings_env: dict[str, str], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVERYTHING_")}
    env.update(settings_env)
    env.update(extra)
    return env


async def start_server_process(
    env: dict[str, str], log_path: Path, args: tuple[str, ...] = (), timeout: float = 60
) -> ServerProcess:
    """Start `everything-server --port 0` and wait (bounded) for its "listening" log line."""
    log_file = open(log_path, "wb")  # noqa: SIM115 - the child writes to it for its whole life
    proc = subprocess.Popen(
        [str(BIN / "everything-server"), "--host", "127.0.0.1", "--port", "0", *args],
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        text = log_path.read_text(errors="replace")
        for line in text.splitlines():
            if '"message":"listening"' in line:
                port = orjson.loads(line)["port"]
                return ServerProcess(proc, port, log_path)
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{text[-4000:]}")
        await asyncio.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server did not start within {timeout}s:\n{log_path.read_text()[-4000:]}")


class Timed:
    """A task reading `events` (an async iterator), noting each with the loop time it came: for
    tests of when a stream's messages go out (pacing)."""

    def __init__(self, events: AsyncIterator):
        self.got: list[tuple[float, object]] = []
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.create_task(self._run(events))

    async def _run(self, events: AsyncIterator) -> None:
        async for ev in events:
            self.got.append((self.loop.time(), ev))

    async def until(self, n: int, timeout: float = 5.0) -> None:
        """Wait until `n` have come."""
        async with asyncio.timeout(timeout):
            while len(self.got) < n:
                await asyncio.sleep(0.005)


def redact(text: str) -> str:
    return re.sub(r"eyJ[\w-]+\.[\w-]+\.[\w-]+", "<jwt>", text)
