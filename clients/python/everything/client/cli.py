"""`everything`: the command line client of the everything backend.

    everything signup                      create an account (asks for the password) and log in
    everything login [--email E]           log in; tokens go to ~/.config/everything/credentials.json (0600)
    everything logout                      end the session and forget the tokens
    everything whoami                      the logged-in user
    everything chat [MESSAGE] [--thread ID]  stream the reply as it arrives; Ctrl-C cancels the generation
    everything threads                     list chat threads
    everything search QUERY                the sources, then the summary with [n] citations
    everything image PROMPT [-o out.png]   generate an image (progress on stderr) and save it
    everything prefs get                   preferences as JSON
    everything prefs set key=value ...     change only the named preferences

The server is `--server`, else `$EVERYTHING_SERVER`, else localhost:50051 ("https://host" or `--tls`
for TLS). Passwords are read with getpass, or from stdin with `--password-stdin` (for scripts).
Tokens are kept per server and refreshed by themselves; the rotated refresh token is saved each time.

Exit codes:
    0    success
    1    the server refused or failed (any other status, e.g. EMAIL_TAKEN, PERMISSION_DENIED, INTERNAL),
         or a reply/search/image that ended FAILED
    2    usage error or INVALID_ARGUMENT (the bad field is named)
    3    UNAUTHENTICATED, or not logged in (run `everything login`)
    4    NOT_FOUND
    5    RESOURCE_EXHAUSTED, UNAVAILABLE or DEADLINE_EXCEEDED (rate limits, quotas, server or model
         provider unreachable): try again later, after `retry after` when printed
    130  interrupted with Ctrl-C (a running chat reply or search is cancelled on the server first)

Errors are printed on stderr from the `google.rpc.Status` details: the message, the code and the
ErrorInfo reason, one line per BadRequest field violation, the RetryInfo delay and the request id.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import sys
import threading
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC
from pathlib import Path
from typing import Any, NoReturn, TextIO

import grpc
from google.protobuf import json_format

from everything.chat.v1 import chat_pb2
from everything.client import _core
from everything.client._core import Tokens
from everything.client.errors import EverythingError, UnauthenticatedError
from everything.client.store import CredentialsFile
from everything.client.sync import SyncClient, SyncStream
from everything.image.v1 import image_pb2
from everything.preferences.v1 import preferences_pb2
from everything.search.v1 import search_pb2

__all__ = ["main", "run"]

DEFAULT_SERVER = "localhost:50051"
USER_AGENT = "everything-cli/0.1"

OK, SERVER_ERROR, USAGE, UNAUTHENTICATED, NOT_FOUND, TRY_LATER, INTERRUPTED = 0, 1, 2, 3, 4, 5, 130

# How long to wait for a reply's message id after Ctrl-C, so the cancel can name it.
CANCEL_LOOKUP_SECONDS = 5.0

_EXIT_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT: USAGE,
    grpc.StatusCode.OUT_OF_RANGE: USAGE,
    grpc.StatusCode.UNAUTHENTICATED: UNAUTHENTICATED,
    grpc.StatusCode.NOT_FOUND: NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED: TRY_LATER,
    grpc.StatusCode.UNAVAILABLE: TRY_LATER,
    grpc.StatusCode.DEADLINE_EXCEEDED: TRY_LATER,
}

# A generation that ended FAILED: which reasons mean "try later".
_TRY_LATER_REASONS = {
    "UPSTREAM_RATE_LIMITED",
    "UPSTREAM_UNAVAILABLE",
    "UPSTREAM_TIMEOUT",
    "SEARCH_PROVIDER_UNAVAILABLE",
    "RATE_LIMITED",
    "QUOTA_EXCEEDED",
    "SERVER_OVERLOADED",
    "TOO_MANY_STREAMS",
    "DATABASE_UNAVAILABLE",
    "SHUTTING_DOWN",
}


class CliError(Exception):
    """A failure the CLI reports itself (not a server status)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def exit_code(err: EverythingError) -> int:
    return _EXIT_CODES.get(err.code, SERVER_ERROR)


def describe(err: EverythingError, server: str) -> str:
    """The error as lines for a person, from the status details."""
    status = err.code.name + (f", reason {err.reason}" if err.reason and err.reason != err.code.name else "")
    lines = [f"everything: {err.message or err.code.name.lower().replace('_', ' ')}", f"  status: {status}"]
    lines += [f"  field {v.field}: {v.description}" for v in err.field_violations]
    lines += [f"  quota {v.subject}: {v.description}" for v in err.quota_violations]
    if err.retry_after is not None:
        lines.append(f"  retry after: {err.retry_after:g}s")
    if err.request_id:
        lines.append(f"  request id: {err.request_id}")
    if err.code == grpc.StatusCode.UNAUTHENTICATED:
        lines.append("  hint: run `everything login`")
    elif err.code == grpc.StatusCode.UNAVAILABLE and err.reason is None:
        lines.append(f"  hint: is the server running at {server}?")
    return "\n".join(lines)


# -- context ----------------------------------------------------------------------------------------


class Context:
    """What every command gets: the parsed args, the server, the token file and a client."""

    def __init__(self, args: argparse.Namespace, out: TextIO, err: TextIO, stdin: TextIO):
        self.args = args
        self.out, self.err, self.stdin = out, err, stdin
        self.server = _core.ChannelConfig(args.server, tls=args.tls).normalized().target
        self.store = CredentialsFile()
        self._email: str | None = None
        self._client: SyncClient | None = None

    def _save(self, tokens: Tokens | None) -> None:
        if tokens is None:
            self.store.remove(self.server)
        else:
            self.store.save(self.server, tokens, self._email)

    def client(self, *, signed_in: bool = True) -> SyncClient:
        if self._client is None:
            tokens, stored_email = self.store.load(self.server)
            self._email = self._email or stored_email
            if signed_in and tokens is None:
                raise CliError(
                    f"everything: not logged in to {self.server}\n  hint: run `everything login`",
                    UNAUTHENTICATED,
                )
            root = Path(self.args.ca_cert).read_bytes() if self.args.ca_cert else None
            self._client = SyncClient(
                self.args.server,
                tls=self.args.tls or root is not None,
                root_certificates=root,
                tokens=tokens,
                on_tokens=self._save,
                timeout=self.args.timeout,
                user_agent=USER_AGENT,
            )
        return self._client

    def signed_in_as(self, email: str) -> None:
        self._email = email

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def note(self, text: str) -> None:
        self.err.write(text + "\n")
        self.err.flush()


def _password(ctx: Context, prompt: str, confirm: bool = False) -> str:
    if ctx.args.password_stdin:
        line = ctx.stdin.readline()
        if not line:
            raise CliError("everything: --password-stdin: no password on stdin", USAGE)
        return line.rstrip("\r\n")
    password = getpass.getpass(prompt, stream=ctx.err)
    if confirm and getpass.getpass("Repeat password: ", stream=ctx.err) != password:
        raise CliError("everything: the passwords differ", USAGE)
    return password


def _email(ctx: Context) -> str:
    if ctx.args.email:
        return ctx.args.email
    if ctx.args.password_stdin:
        raise CliError("everything: --email is required with --password-stdin", USAGE)
    ctx.err.write("Email: ")
    ctx.err.flush()
    return ctx.stdin.readline().strip()


def _when(ts: Any) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    return ts.ToDatetime(tzinfo=UTC).astimezone().strftime("%Y-%m-%d %H:%M")


def _read_text(ctx: Context, words: Sequence[str]) -> str:
    if words:
        return " ".join(words)
    if ctx.stdin.isatty():
        raise CliError("everything: give the text as arguments (or on stdin)", USAGE)
    return ctx.stdin.read().strip()


# -- account ----------------------------------------------------------------------------------------


def cmd_signup(ctx: Context) -> int:
    email = _email(ctx)
    password = _password(ctx, "Password: ", confirm=True)
    ctx.signed_in_as(email)
    resp = ctx.client(signed_in=False).auth.sign_up(email, password, display_name=ctx.args.name or "")
    ctx.note(f"signed up and logged in as {resp.user.email} on {ctx.server}")
    return OK


def cmd_login(ctx: Context) -> int:
    email = _email(ctx)
    password = _password(ctx, "Password: ")
    ctx.signed_in_as(email)
    resp = ctx.client(signed_in=False).auth.sign_in(email, password)
    ctx.note(f"logged in as {resp.user.email} on {ctx.server}")
    return OK


def cmd_logout(ctx: Context) -> int:
    client = ctx.client(signed_in=False)
    if client.tokens is None:
        ctx.note(f"not logged in to {ctx.server}")
        return OK
    try:
        client.auth.sign_out()
    except UnauthenticatedError:
        pass  # the session is over already
    finally:
        ctx.store.remove(ctx.server)
    ctx.note(f"logged out of {ctx.server}")
    return OK


def cmd_whoami(ctx: Context) -> int:
    user = ctx.client().auth.get_current_user().user
    name = f" ({user.display_name})" if user.display_name else ""
    ctx.write(f"{user.email}{name}\n")
    if ctx.args.verbose:
        ctx.write(f"id: {user.id}\nserver: {ctx.server}\n")
    return OK


# -- chat -------------------------------------------------------------------------------------------


def _until(stream: SyncStream[Any], seconds: float, found: Callable[[Any], bool]) -> Any:
    """Read `stream` until an event satisfies `found` (returned), its end, or `seconds` (None).
    The stream is closed afterwards."""
    timer = threading.Timer(seconds, stream.cancel)
    timer.start()
    try:
        for event in stream:
            if found(event):
                return event
    except EverythingError:
        return None
    finally:
        timer.cancel()
        stream.cancel()
    return None


def _reply_id(stream: SyncStream[Any]) -> str:
    started = _until(stream, CANCEL_LOOKUP_SECONDS, lambda e: e.WhichOneof("event") == "message_started")
    return started.message_id if started is not None else ""


def _send(ctx: Context, text: str, thread_id: str) -> tuple[str, int]:
    """Send one message and stream the reply; returns (thread id, exit code)."""
    client = ctx.client()
    # Our own idempotency key: after a Ctrl-C that came before the reply's id, sending again with
    # it finds the same reply (or nothing new), so the cancel can name it.
    key = str(uuid.uuid4())

    def send() -> SyncStream[Any]:
        return client.chat.send_message(
            text, thread_id=thread_id, model=ctx.args.model or "", client_message_id=key
        )

    stream = send()
    reply_id = ""
    wrote_text = False
    try:
        for event in stream:
            kind = event.WhichOneof("event")
            if kind == "user_message_saved":
                thread_id = event.user_message_saved.message.thread_id or thread_id
            elif kind == "message_started":
                reply_id = event.message_id
            elif kind == "text_delta":
                ctx.write(event.text_delta.text)
                wrote_text = True
            elif kind == "message_completed":
                if wrote_text:
                    ctx.write("\n")
                return thread_id, _finished(ctx, "reply", event.message_completed.message)
    except KeyboardInterrupt:
        if wrote_text:
            ctx.write("\n")
        if not reply_id:
            reply_id = _reply_id(stream) or _reply_id(send())
        stream.cancel()
        if reply_id:
            with contextlib.suppress(EverythingError):  # it may have finished meanwhile
                client.chat.cancel_generation(reply_id)
            ctx.note(f"[cancelled] message {reply_id}")
        else:
            ctx.note("[interrupted] no reply was found to cancel")
        return thread_id, INTERRUPTED
    finally:
        stream.cancel()
    if wrote_text:
        ctx.write("\n")
    ctx.note("everything: the reply stream ended without a result")
    return thread_id, SERVER_ERROR


def _finished(ctx: Context, what: str, message: Any) -> int:
    status = message.status
    if status == chat_pb2.MESSAGE_STATUS_COMPLETED:
        return OK
    if status == chat_pb2.MESSAGE_STATUS_CANCELLED:
        ctx.note(f"[cancelled] the {what} was cancelled")
        return SERVER_ERROR
    reason = message.error_reason or "UNKNOWN"
    ctx.note(f"everything: the {what} failed\n  reason: {reason}")
    return TRY_LATER if reason in _TRY_LATER_REASONS else SERVER_ERROR


def cmd_chat(ctx: Context) -> int:
    thread_id = ctx.args.thread or ""
    if ctx.args.message or not ctx.stdin.isatty():
        thread_id, code = _send(ctx, _read_text(ctx, ctx.args.message), thread_id)
        if thread_id:
            ctx.note(f"thread {thread_id}")
        return code
    ctx.note("chat: type a message, an empty line or Ctrl-D ends; Ctrl-C stops a reply")
    while True:
        try:
            ctx.err.write("> ")
            ctx.err.flush()
            line = ctx.stdin.readline()
        except KeyboardInterrupt:
            ctx.write("\n")
            return INTERRUPTED
        if not line.strip():
            if thread_id:
                ctx.note(f"thread {thread_id}")
            return OK
        thread_id, code = _send(ctx, line.strip(), thread_id)
        if code != OK:
            return code


def cmd_threads(ctx: Context) -> int:
    client = ctx.client()
    threads: list[Any] = []
    token = ""
    while len(threads) < ctx.args.limit:
        resp = client.chat.list_threads(page_size=min(100, ctx.args.limit - len(threads)), page_token=token)
        threads += resp.threads
        token = resp.next_page_token
        if not token:
            break
    if ctx.args.json:
        rows = [json_format.MessageToDict(t, preserving_proto_field_name=True) for t in threads]
        ctx.write(json.dumps(rows, indent=2) + "\n")
        return OK
    if not threads:
        ctx.note("no threads yet")
    for t in threads:
        ctx.write(f"{t.id}  {_when(t.update_time)}  {t.title or '(untitled)'}\n")
    return OK


# -- search -----------------------------------------------------------------------------------------


def cmd_search(ctx: Context) -> int:
    client = ctx.client()
    query, key = _read_text(ctx, ctx.args.query), str(uuid.uuid4())  # key: as in _send

    def search() -> SyncStream[Any]:
        return client.search.search(
            query, providers=ctx.args.provider or (), max_sources=ctx.args.max_sources, client_request_id=key
        )

    stream = search()
    search_id = ""
    summary = False
    try:
        for event in stream:
            search_id = event.search_id or search_id
            kind = event.WhichOneof("event")
            if kind == "sources_found":
                for s in event.sources_found.sources:
                    ctx.write(f"[{s.index}] {s.title}\n    {s.url}\n")
                ctx.write("\n")
            elif kind == "summary_delta":
                ctx.write(event.summary_delta.text)
                summary = True
            elif kind == "completed":
                if summary:
                    ctx.write("\n")
                record = event.completed.search
                if record.status == search_pb2.SEARCH_STATUS_COMPLETED:
                    return OK
                if record.status == search_pb2.SEARCH_STATUS_CANCELLED:
                    ctx.note("[cancelled] the search was cancelled")
                    return SERVER_ERROR
                reason = record.error_reason or "UNKNOWN"
                ctx.note(f"everything: the search failed\n  reason: {reason}")
                return TRY_LATER if reason in _TRY_LATER_REASONS else SERVER_ERROR
    except KeyboardInterrupt:
        if summary:
            ctx.write("\n")
        if not search_id:
            first = _until(stream, CANCEL_LOOKUP_SECONDS, lambda e: bool(e.search_id))
            first = first or _until(search(), CANCEL_LOOKUP_SECONDS, lambda e: bool(e.search_id))
            search_id = first.search_id if first is not None else ""
        stream.cancel()
        if search_id:
            with contextlib.suppress(EverythingError):
                client.search.cancel_search(search_id)
            ctx.note(f"[cancelled] search {search_id}")
        return INTERRUPTED
    finally:
        stream.cancel()
    ctx.note("everything: the search stream ended without a result")
    return SERVER_ERROR


# -- image ------------------------------------------------------------------------------------------

_EXTENSIONS = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}


class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, one line per step otherwise."""

    WIDTH = 30

    def __init__(self, err: TextIO):
        self.err = err
        self.tty = err.isatty()
        self.last: tuple[int, str] | None = None

    def show(self, percent: int, stage: str) -> None:
        percent = max(0, min(100, percent))
        if (percent, stage) == self.last:
            return
        self.last = (percent, stage)
        filled = self.WIDTH * percent // 100
        bar = f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {percent:3d}% {stage}"
        self.err.write(f"\r{bar:<60}" if self.tty else bar + "\n")
        self.err.flush()

    def done(self) -> None:
        if self.tty and self.last is not None:
            self.err.write("\n")
            self.err.flush()


def _output_path(ctx: Context, image: image_pb2.Image, content_type: str, n: int, total: int) -> Path:
    suffix = _EXTENSIONS.get(content_type, ".png")
    if ctx.args.output:
        path = Path(ctx.args.output)
        if total > 1:
            path = path.with_name(f"{path.stem}-{n}{path.suffix or suffix}")
        return path
    return Path(f"everything-{image.id[:8]}{suffix}")


def _save(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def cmd_image(ctx: Context) -> int:
    client = ctx.client()
    count = max(1, ctx.args.count)
    stream = client.image.generate_image(
        _read_text(ctx, ctx.args.prompt), size=ctx.args.size or "", model=ctx.args.model or "", count=count
    )
    bar = Progress(ctx.err)
    finished = 0
    code = OK
    try:
        for event in stream:
            kind = event.WhichOneof("event")
            if kind == "progress":
                bar.show(event.progress.percent, event.progress.stage)
            elif kind == "completed":
                image = event.completed.image
                finished += 1
                if image.status != image_pb2.IMAGE_STATUS_COMPLETED:
                    bar.done()
                    reason = image.error_reason or "UNKNOWN"
                    ctx.note(f"everything: the image failed\n  reason: {reason}")
                    code = TRY_LATER if reason in _TRY_LATER_REASONS else SERVER_ERROR
                    continue
                bar.show(100, "done")
                bar.done()
                data, content_type = client.image.read_image(image.id)
                path = _output_path(ctx, image, content_type or image.content_type, finished, count)
                _save(path, data)
                ctx.write(f"{path}\n")
    except KeyboardInterrupt:
        bar.done()
        stream.cancel()
        ctx.note("[interrupted] the image is still generated and stored on the server")
        return INTERRUPTED
    finally:
        stream.cancel()
    if finished == 0:
        bar.done()
        ctx.note("everything: the image stream ended without a result")
        return SERVER_ERROR
    return code


# -- preferences ------------------------------------------------------------------------------------

_PREF_FIELDS = {
    f.name: f for f in preferences_pb2.Preferences.DESCRIPTOR.fields if f.name not in {"update_time"}
}


def _pref_value(name: str, raw: str) -> Any:
    """A `key=value` value as JSON for json_format, by the field's type."""
    field = _PREF_FIELDS[name]
    if field.message_type is not None:  # client_settings (google.protobuf.Struct)
        try:
            value = json.loads(raw) if raw else {}
        except ValueError as exc:
            raise CliError(f"everything: {name}: not JSON ({exc})", USAGE) from None
        if not isinstance(value, dict):
            raise CliError(f"everything: {name}: must be a JSON object", USAGE)
        return value
    if field.is_repeated:
        return [p.strip() for p in raw.split(",") if p.strip()]
    if field.enum_type is not None:
        prefix = field.enum_type.name.upper() + "_"  # THEME_
        wanted = raw.strip().upper()
        wanted = wanted if wanted.startswith(prefix) else prefix + (wanted or "UNSPECIFIED")
        names = [v.name for v in field.enum_type.values]
        if wanted not in names:
            choices = ", ".join(
                n.removeprefix(prefix).lower() for n in names if not n.endswith("UNSPECIFIED")
            )
            raise CliError(f"everything: {name}: one of {choices}", USAGE)
        return wanted
    if field.type in (field.TYPE_DOUBLE, field.TYPE_FLOAT):
        if raw == "":
            return None  # unset: the server default
        try:
            return float(raw)
        except ValueError:
            raise CliError(f"everything: {name}: not a number: {raw!r}", USAGE) from None
    return raw


def _print_prefs(ctx: Context, prefs: preferences_pb2.Preferences) -> None:
    doc = json_format.MessageToDict(
        prefs, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    ctx.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def cmd_prefs_get(ctx: Context) -> int:
    _print_prefs(ctx, ctx.client().preferences.get_preferences().preferences)
    return OK


def cmd_prefs_set(ctx: Context) -> int:
    values: dict[str, Any] = {}
    for item in ctx.args.assignments:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CliError(f"everything: expected key=value, got {item!r}", USAGE)
        if key not in _PREF_FIELDS:
            raise CliError(f"everything: unknown preference {key!r}; known: {', '.join(_PREF_FIELDS)}", USAGE)
        values[key] = _pref_value(key, raw)
    prefs = preferences_pb2.Preferences()
    json_format.ParseDict({k: v for k, v in values.items() if v is not None}, prefs)
    resp = ctx.client().preferences.update_preferences(prefs, list(values))
    _print_prefs(ctx, resp.preferences)
    return OK


# -- parser -----------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="everything",
        description="Command line client of the everything backend.",
        epilog="Exit codes: 0 ok, 1 server error, 2 usage/invalid argument, 3 unauthenticated, "
        "4 not found, 5 rate limited/unavailable, 130 interrupted.",
    )
    p.add_argument(
        "--server",
        default=os.environ.get("EVERYTHING_SERVER") or DEFAULT_SERVER,
        help=f"host:port or https://host (env EVERYTHING_SERVER; default {DEFAULT_SERVER})",
    )
    p.add_argument("--tls", action="store_true", help="use TLS")
    p.add_argument("--ca-cert", metavar="PEM", help="CA certificates for TLS (implies --tls)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds for each unary call (default 30)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def account(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument("--email")
        c.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
        return c

    c = account("signup", "create an account and log in")
    c.add_argument("--name", help="display name")
    c.set_defaults(func=cmd_signup)
    account("login", "log in and store the tokens").set_defaults(func=cmd_login)
    sub.add_parser("logout", help="end the session and forget the tokens").set_defaults(func=cmd_logout)
    c = sub.add_parser("whoami", help="show the logged-in user")
    c.add_argument("-v", "--verbose", action="store_true")
    c.set_defaults(func=cmd_whoami)

    c = sub.add_parser("chat", help="send a message and stream the reply (Ctrl-C cancels it)")
    c.add_argument("message", nargs="*", help="the message (else stdin, or interactive on a terminal)")
    c.add_argument("-t", "--thread", help="thread id to continue (default: a new thread)")
    c.add_argument("-m", "--model")
    c.set_defaults(func=cmd_chat)

    c = sub.add_parser("threads", help="list chat threads, most recent first")
    c.add_argument("-n", "--limit", type=int, default=50)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_threads)

    c = sub.add_parser("search", help="search: sources, then a summary citing them")
    c.add_argument("query", nargs="*")
    c.add_argument("-p", "--provider", action="append", help="provider to ask (repeatable)")
    c.add_argument("--max-sources", type=int, default=0)
    c.set_defaults(func=cmd_search)

    c = sub.add_parser("image", help="generate an image and save it")
    c.add_argument("prompt", nargs="*")
    c.add_argument("-o", "--output", help="file to write (default everything-<id>.png)")
    c.add_argument("-s", "--size", help="WIDTHxHEIGHT, e.g. 1024x1024")
    c.add_argument("-m", "--model")
    c.add_argument("-n", "--count", type=int, default=1)
    c.set_defaults(func=cmd_image)

    c = sub.add_parser("prefs", help="get or set preferences")
    prefs = c.add_subparsers(dest="prefs_command", required=True, metavar="get|set")
    prefs.add_parser("get", help="print the preferences as JSON").set_defaults(func=cmd_prefs_get)
    s = prefs.add_parser(
        "set",
        help="change preferences: key=value ...",
        description="Keys: "
        + ", ".join(_PREF_FIELDS)
        + ". Lists are comma separated, client_settings is JSON, an empty value resets the key.",
    )
    s.add_argument("assignments", nargs="+", metavar="key=value")
    s.set_defaults(func=cmd_prefs_set)
    return p


def run(
    argv: Sequence[str] | None = None,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    stdin: TextIO | None = None,
) -> int:
    """Run the CLI; returns the exit code."""
    out, err, stdin = out or sys.stdout, err or sys.stderr, stdin or sys.stdin
    args = parser().parse_args(argv)
    ctx = Context(args, out, err, stdin)
    try:
        return args.func(ctx)
    except EverythingError as exc:
        err.write(describe(exc, ctx.server) + "\n")
        return exit_code(exc)
    except CliError as exc:
        err.write(f"{exc}\n")
        return exc.code
    except KeyboardInterrupt:
        err.write("\n")
        return INTERRUPTED
    except BrokenPipeError:
        return OK  # `everything threads | head`
    finally:
        ctx.close()


def main(argv: Sequence[str] | None = None) -> NoReturn:
    code = run(argv)
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.flush()
    sys.exit(code)


if __name__ == "__main__":
    main()
