"""Two everything-server processes on one database behind one Envoy: a reply started through one
replica is watched and cancelled through the other. Envoy's admin statistics say which replica
served each call, so nothing here assumes how Envoy balances."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import grpc

from everything.auth.v1 import auth_service_pb2_grpc
from everything.chat.v1 import chat_pb2, chat_service_pb2_grpc
from everything.chat.v1 import chat_service_pb2 as chat_pb
from tests.support import server_env, sign_up, start_server_process


def host_stats(admin_url: str) -> dict[str, dict[str, int]]:
    """{"127.0.0.1:PORT": {"rq_active": n, "rq_total": n}} for the upstream cluster's hosts."""
    with urllib.request.urlopen(f"{admin_url}/clusters?format=json", timeout=5) as resp:  # noqa: S310
        data = json.load(resp)
    out = {}
    for cluster in data["cluster_statuses"]:
        for host in cluster.get("host_statuses", []):
            sock = host["address"]["socket_address"]
            stats = {
                s["name"]: int(s.get("value", 0))
                for s in host["stats"]
                if s["name"] in ("rq_active", "rq_total")
            }
            out[f"{sock['address']}:{sock['port_value']}"] = stats
    return out


async def stats(admin_url: str):
    return await asyncio.to_thread(host_stats, admin_url)


async def settled(admin_url: str, expected: dict[str, int] | None = None, timeout: float = 10) -> dict:
    """Wait (bounded) until streams that were just closed are no longer counted as open."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        now = await stats(admin_url)
        active = {h: s["rq_active"] for h, s in now.items()}
        if (expected is None and sum(active.values()) == 0) or (
            expected is not None and all(active[h] <= n for h, n in expected.items())
        ):
            return active
        if asyncio.get_running_loop().time() > deadline:
            return active
        await asyncio.sleep(0.05)


async def test_a_reply_started_on_one_replica_is_watched_and_cancelled_through_the_other(
    settings_env, tmp_path, gateway_factory, mock_model
):
    env = server_env(settings_env)
    started = await asyncio.gather(
        start_server_process(env, tmp_path / "a.log"),
        start_server_process(env, tmp_path / "b.log"),
        return_exceptions=True,
    )
    try:
        for p in started:
            if isinstance(p, BaseException):
                raise p  # whichever did start is stopped below
        a, b = started
        gw = await gateway_factory([a.target, b.target])
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}") as ch:
            auth = auth_service_pb2_grpc.AuthServiceStub(ch)
            chat = chat_service_pb2_grpc.ChatServiceStub(ch)
            user = await sign_up(auth)

            async def last_event(stream):
                last = None
                while (event := await stream.read()) is not grpc.aio.EOF:
                    last = event
                return last

            # Envoy balances by least requests, so which replica takes a call is not ours to choose:
            # the scenario is retried (bounded) until the cancel has gone through the other replica.
            for _attempt in range(12):
                # 1. Start a slow reply and find the replica that serves (and so generates) it: the one
                #    whose open requests went up by one.
                idle = await settled(gw.admin_url)
                send = chat.SendMessage(
                    chat_pb.SendMessageRequest(content="tell me a story [mock:tokens=200 rate=20]"),
                    metadata=user.md,
                )
                message_id = None
                while (event := await send.read()) is not grpc.aio.EOF:
                    if event.HasField("message_started"):
                        message_id = event.message_id
                        break
                assert message_id
                now = await stats(gw.admin_url)
                generating = next(h for h in now if now[h]["rq_active"] == idle[h] + 1)
                other = b.target if generating == a.target else a.target

                # 2. Watch it through Envoy until a watch lands on the other replica (bounded).
                watch = None
                for _ in range(10):
                    before = (await stats(gw.admin_url))[other]["rq_active"]
                    candidate = chat.WatchMessage(
                        chat_pb.WatchMessageRequest(message_id=message_id, after_seq=0), metadata=user.md
                    )
                    await candidate.read()  # the first event: the stream is open now
                    if (await stats(gw.admin_url))[other]["rq_active"] == before + 1:
                        watch = candidate
                        break
                    candidate.cancel()
                    await settled(gw.admin_url, {generating: now[generating]["rq_active"], other: before})
                assert watch is not None, "no WatchMessage reached the other replica"
                live = await watch.read()
                assert live.message_id == message_id

                # 3. Cancel through Envoy and see which replica served it.
                before = (await stats(gw.admin_url))[other]["rq_total"]
                cancelled = await chat.CancelGeneration(
                    chat_pb.CancelGenerationRequest(message_id=message_id), metadata=user.md
                )
                served_by_other = (await stats(gw.admin_url))[other]["rq_total"] == before + 1
                assert cancelled.message.status == chat_pb2.MESSAGE_STATUS_CANCELLED
                sent_last, watched_last = await asyncio.wait_for(
                    asyncio.gather(last_event(send), last_event(watch)), 30
                )
                if served_by_other:
                    break
            assert served_by_other, "no CancelGeneration went through the other replica in 12 tries"

            # 4. Both streams ended with the cancelled message; the model saw the abort.
            for last in (sent_last, watched_last):
                assert last.HasField("message_completed")
                assert last.message_completed.message.status == chat_pb2.MESSAGE_STATUS_CANCELLED
            assert sent_last.message_completed.message.content == cancelled.message.content
            assert len(cancelled.message.content) > 0
            await mock_model.wait_for_abort(timeout=10)

        # The access logs agree: the reply was sent on one replica, watched and cancelled on the other.
        # (A stream's access line is written as its handler finishes, a moment after the client read
        # the last event: wait for it, bounded.)
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            logs = {a.target: a.logs(), b.target: b.logs()}
            if (
                '.ChatService/SendMessage"' in logs[generating]
                or asyncio.get_running_loop().time() > deadline
            ):
                break
            await asyncio.sleep(0.1)
        assert '.ChatService/SendMessage"' in logs[generating]
        assert '.ChatService/CancelGeneration"' in logs[other]
    finally:
        for p in started:
            if not isinstance(p, BaseException):
                p.terminate()
