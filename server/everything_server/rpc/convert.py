"""Small conversions every domain's convert module shares."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def ts(value: datetime | None) -> Timestamp | None:
    """Timestamp.FromDatetime's result (a naive time is UTC), in a third of its time: lists convert
    two per row."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    d = value - _EPOCH
    return Timestamp(seconds=d.days * 86400 + d.seconds, nanos=d.microseconds * 1000)


def metadata_value(context, key: str) -> str:
    for k, v in context.invocation_metadata() or ():
        if k.lower() == key and isinstance(v, str):
            return v
    return ""
