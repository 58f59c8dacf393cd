"""Small conversions every domain's convert module shares."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp


def ts(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    out = Timestamp()
    out.FromDatetime(value)
    return out


def metadata_value(context, key: str) -> str:
    for k, v in context.invocation_metadata() or ():
        if k.lower() == key and isinstance(v, str):
            return v
    return ""
