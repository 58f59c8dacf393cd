"""The events of an assistant message's stream and their compact encoding.

Every event of a reply has a `seq`: 1 is `start` (the message exists, GENERATING), then one per text
delta, one `usage`, an optional `title`, and `done` last (the final status, and the failure, if any).
The same encoding is used for the `message_events` rows (one per checkpoint) and for the NOTIFY
payloads that fan a checkpoint out to watchers on every replica:

    batch  = [first_seq, event, event, ...]         consecutive seqs from first_seq
    event  = "text"                                 a text delta (the common case, kept tiny)
           | {"k": "start"}
           | {"k": "usage", "p": 12, "c": 34, "e": false}
           | {"k": "title", "t": "A title"}
           | {"k": "done", "s": "failed", "r": "UPSTREAM_TIMEOUT", "err": {...}}
    poke   = {"upto": seq}                          "events up to seq are stored; read them"

A poke replaces a batch that would not fit in one notification.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from everything_server import errors
from everything_server.db.pubsub import MAX_PAYLOAD

START = "start"
DELTA = "delta"
USAGE = "usage"
TITLE = "title"
DONE = "done"


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    estimated: bool = False


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    kind: str
    text: str = ""  # DELTA: the text; TITLE: the title
    usage: Usage | None = None  # USAGE
    status: str = ""  # DONE: the final status
    error_reason: str = ""  # DONE: the failure's ErrorReason name
    error: dict[str, Any] | None = None  # DONE: the failure, for the streams that raise it (error_to_json)


def coalesce(events: list[Event], after_seq: int) -> list[Event]:
    """What a stream sends of `events` that are ready at once: those after `after_seq` (and `done`,
    whatever its seq), with consecutive text deltas as one (the seq of the last). Several are ready
    when the client, or the server, is slower than the model: one gRPC message instead of one per
    token, and the client resumes from that seq all the same."""
    out: list[Event] = []
    run: list[Event] = []

    def flush() -> None:
        if len(run) == 1:
            out.append(run[0])
        elif run:
            out.append(Event(run[-1].seq, DELTA, text="".join(e.text for e in run)))
        run.clear()

    for ev in events:
        if ev.seq <= after_seq and ev.kind != DONE:
            continue
        if ev.kind == DELTA:
            run.append(ev)
        else:
            flush()
            out.append(ev)
    flush()
    return out


def _encode_one(ev: Event) -> Any:
    if ev.kind == DELTA:
        return ev.text
    if ev.kind == START:
        return {"k": START}
    if ev.kind == USAGE:
        u = ev.usage or Usage(0, 0, True)
        return {"k": USAGE, "p": u.prompt_tokens, "c": u.completion_tokens, "e": u.estimated}
    if ev.kind == TITLE:
        return {"k": TITLE, "t": ev.text}
    if ev.kind == DONE:
        out: dict[str, Any] = {"k": DONE, "s": ev.status}
        if ev.error_reason:
            out["r"] = ev.error_reason
        if ev.error is not None:
            out["err"] = ev.error
        return out
    raise ValueError(f"unknown event kind {ev.kind!r}")


def _decode_one(seq: int, raw: Any) -> Event:
    if isinstance(raw, str):
        return Event(seq, DELTA, text=raw)
    kind = raw["k"]
    if kind == USAGE:
        return Event(seq, USAGE, usage=Usage(int(raw["p"]), int(raw["c"]), bool(raw["e"])))
    if kind == TITLE:
        return Event(seq, TITLE, text=raw["t"])
    if kind == DONE:
        return Event(seq, DONE, status=raw["s"], error_reason=raw.get("r", ""), error=raw.get("err"))
    return Event(seq, kind)


def encode_batch(events: list[Event]) -> str:
    """Consecutive events (seq ascending, no gaps) as one JSON array."""
    return orjson.dumps([events[0].seq, *(_encode_one(e) for e in events)]).decode()


def decode_batch(data: str | bytes) -> list[Event]:
    raw = orjson.loads(data)
    first = int(raw[0])
    return [_decode_one(first + i, item) for i, item in enumerate(raw[1:])]


def notifications(events: list[Event], limit: int = MAX_PAYLOAD) -> list[str]:
    """NOTIFY payloads for a stored batch: pieces of at most `limit` bytes, or a poke for an event
    too large to travel on its own (watchers then read the events from the database)."""
    payloads: list[str] = []
    piece: list[bytes] = []
    first = events[0].seq
    size = 0

    def flush() -> None:
        payloads.append((b"[" + str(first).encode() + b"," + b",".join(piece) + b"]").decode())

    for ev in events:
        encoded = orjson.dumps(_encode_one(ev))
        if len(encoded) + 24 > limit:
            if piece:
                flush()
            payloads.append(orjson.dumps({"upto": events[-1].seq}).decode())
            return payloads
        if piece and size + len(encoded) + 24 > limit:
            flush()
            piece, size, first = [], 0, ev.seq
        piece.append(encoded)
        size += len(encoded) + 1
    if piece:
        flush()
    return payloads


@dataclass(frozen=True, slots=True)
class Poke:
    upto: int


def decode_notification(payload: str) -> list[Event] | Poke:
    raw = orjson.loads(payload)
    if isinstance(raw, dict):
        return Poke(int(raw["upto"]))
    first = int(raw[0])
    return [_decode_one(first + i, item) for i, item in enumerate(raw[1:])]


# -- failures, carried by the `done` event so every stream that relays it can raise the same status --

_KINDS: dict[str, type[errors.DomainError]] = {
    cls.__name__: cls
    for cls in (
        errors.InvalidArgument,
        errors.NotFound,
        errors.FailedPrecondition,
        errors.PermissionDenied,
        errors.ResourceExhausted,
        errors.Unavailable,
        errors.DeadlineExceeded,
        errors.Cancelled,
        errors.Aborted,
    )
}


def error_to_json(err: errors.DomainError | None) -> dict[str, Any]:
    """A failure as JSON; None (an unexpected exception) is recorded as an internal error."""
    if err is None or type(err).__name__ not in _KINDS:
        return {"t": "Internal", "r": "INTERNAL", "m": "the reply failed"}
    out: dict[str, Any] = {"t": type(err).__name__, "r": err.reason, "m": err.message}
    if err.metadata:
        out["md"] = dict(err.metadata)
    retry_after = getattr(err, "retry_after", None)
    if retry_after is not None:
        out["ra"] = retry_after
    if isinstance(err, errors.InvalidArgument):
        out["f"] = [[v.field, v.description] for v in err.violations]
    return out


class InternalFailure(Exception):
    """A reply failed for an unexpected reason (a bug, logged where it happened)."""


def error_from_json(data: dict[str, Any]) -> Exception:
    kind = _KINDS.get(data.get("t", ""))
    message = str(data.get("m", "the reply failed"))
    reason = data.get("r")
    err: errors.DomainError
    if kind is None:
        return InternalFailure(message)
    if kind is errors.InvalidArgument:
        violations = [errors.FieldViolation(f, d) for f, d in data.get("f") or [["message", message]]]
        err = errors.InvalidArgument.many(violations, reason=reason)
    elif kind is errors.NotFound:
        err = errors.NotFound(str((data.get("md") or {}).get("resource", "message")))
    elif kind in (errors.ResourceExhausted, errors.Unavailable):
        err = kind(message, reason=reason, retry_after=data.get("ra"))
    else:
        err = kind(message, reason=reason)
    err.metadata.update(data.get("md") or {})
    return err
