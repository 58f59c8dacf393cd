"""The compact event encoding: stored batches, NOTIFY payloads under PostgreSQL's limit, failures."""

from __future__ import annotations

from everything_server import errors
from everything_server.chat.events import (
    DELTA,
    DONE,
    START,
    TITLE,
    USAGE,
    Event,
    Poke,
    Usage,
    coalesce,
    decode_batch,
    decode_notification,
    encode_batch,
    error_from_json,
    error_to_json,
    notifications,
)
from everything_server.chat.generation import clean_title
from everything_server.db.pubsub import MAX_PAYLOAD


def sample(n: int) -> list[Event]:
    events = [Event(1, START)]
    events += [Event(i + 2, DELTA, text=f' wörd{i} "q"') for i in range(n)]
    events += [
        Event(n + 2, USAGE, usage=Usage(10, n, False)),
        Event(n + 3, TITLE, text="A title"),
        Event(n + 4, DONE, status="failed", error_reason="UPSTREAM_TIMEOUT", error={"t": "DeadlineExceeded"}),
    ]
    return events


def test_a_batch_round_trips():
    events = sample(5)
    assert decode_batch(encode_batch(events)) == events
    assert decode_batch(encode_batch(events[3:])) == events[3:]


def test_large_batches_are_split_into_notifications_under_the_limit_in_order():
    events = sample(3000)
    payloads = notifications(events)
    assert len(payloads) > 1
    assert all(len(p.encode()) <= MAX_PAYLOAD for p in payloads)
    decoded = [ev for p in payloads for ev in decode_notification(p)]
    assert decoded == events


def test_an_event_too_large_for_a_notification_becomes_a_poke():
    events = [Event(7, DELTA, text="x"), Event(8, DELTA, text="y" * 10_000), Event(9, DELTA, text="z")]
    payloads = notifications(events)
    assert decode_notification(payloads[0]) == events[:1]
    assert decode_notification(payloads[-1]) == Poke(9)


def test_failures_survive_the_round_trip_with_their_details():
    limited = errors.ResourceExhausted("slow down", reason="UPSTREAM_RATE_LIMITED", retry_after=2.5)
    back = error_from_json(error_to_json(limited))
    assert isinstance(back, errors.ResourceExhausted)
    assert (back.reason, back.retry_after, back.message) == ("UPSTREAM_RATE_LIMITED", 2.5, "slow down")
    bad_model = error_from_json(error_to_json(errors.InvalidArgument("model", "unknown")))
    assert isinstance(bad_model, errors.InvalidArgument) and bad_model.violations[0].field == "model"
    assert not isinstance(error_from_json(error_to_json(None)), errors.DomainError)


def test_generated_titles_are_cleaned():
    assert clean_title('Title: "Sailing the Baltic."\nmore') == "Sailing the Baltic"
    assert clean_title("   ") == ""
    long = clean_title("word " * 40)
    assert len(long) <= 80 and not long.endswith(" ")


def test_coalesce_sends_what_follows_after_seq_with_consecutive_deltas_as_one():
    events = [
        Event(1, START),
        Event(2, DELTA, text="a"),
        Event(3, DELTA, text="b"),
        Event(4, DELTA, text="c"),
        Event(5, USAGE, usage=Usage(1, 3)),
        Event(6, DELTA, text="d"),
        Event(7, DONE, status="completed"),
    ]
    assert coalesce(events, 0) == [
        Event(1, START),
        Event(4, DELTA, text="abc"),
        Event(5, USAGE, usage=Usage(1, 3)),
        Event(6, DELTA, text="d"),
        Event(7, DONE, status="completed"),
    ]
    # Resuming after seq 2: the deltas already sent are left out; `done` always comes.
    assert coalesce(events, 2) == [
        Event(4, DELTA, text="bc"),
        Event(5, USAGE, usage=Usage(1, 3)),
        Event(6, DELTA, text="d"),
        Event(7, DONE, status="completed"),
    ]
    assert coalesce(events[6:], 9) == [Event(7, DONE, status="completed")]
