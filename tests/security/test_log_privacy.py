"""Logs carry no emails, passwords, tokens or prompt text: a full session (sign up, chat, search, image,
refresh, a failed sign-in) against a server process, whose whole log is then searched for them."""

from __future__ import annotations

import uuid

import grpc
import pytest

from everything.auth.v1 import auth_service_pb2 as auth_pb
from everything.auth.v1 import auth_service_pb2_grpc
from everything.chat.v1 import chat_service_pb2 as chat_pb
from everything.chat.v1 import chat_service_pb2_grpc
from everything.image.v1 import image_service_pb2 as image_pb
from everything.image.v1 import image_service_pb2_grpc
from everything.search.v1 import search_service_pb2 as search_pb
from everything.search.v1 import search_service_pb2_grpc
from tests.support import server_env, start_server_process


@pytest.fixture
async def logged_server(settings_env, tmp_path):
    # DEBUG: the most talkative level must still say nothing private.
    proc = await start_server_process(
        server_env(settings_env, EVERYTHING_LOG_LEVEL="DEBUG"), tmp_path / "server.log"
    )
    yield proc
    proc.terminate()


async def test_a_full_session_leaves_no_private_values_in_the_logs(logged_server):
    marker = uuid.uuid4().hex[:10]
    email = f"private-{marker}@example.com"
    password = f"pw-{marker}-horse-battery"
    chat_text = f"chat prompt {marker} about my diagnosis"
    query = f"search query {marker} salary"
    image_prompt = f"image prompt {marker} of my house"
    secrets = [email, password, chat_text, query, image_prompt, marker]

    async with grpc.aio.insecure_channel(logged_server.target) as ch:
        auth = auth_service_pb2_grpc.AuthServiceStub(ch)
        signed = await auth.SignUp(auth_pb.SignUpRequest(email=email, password=password, display_name="P"))
        md = (("authorization", f"Bearer {signed.tokens.access_token}"),)
        refreshed = await auth.RefreshToken(
            auth_pb.RefreshTokenRequest(refresh_token=signed.tokens.refresh_token)
        )
        secrets += [
            signed.tokens.access_token,
            signed.tokens.refresh_token,
            refreshed.tokens.refresh_token,
            refreshed.tokens.access_token,
        ]
        with pytest.raises(grpc.aio.AioRpcError):
            await auth.SignIn(auth_pb.SignInRequest(email=email, password=password + "x"))
        with pytest.raises(grpc.aio.AioRpcError):  # reuse of a spent refresh token
            await auth.RefreshToken(auth_pb.RefreshTokenRequest(refresh_token=signed.tokens.refresh_token))
        signed_in = await auth.SignIn(auth_pb.SignInRequest(email=email, password=password))
        md = (("authorization", f"Bearer {signed_in.tokens.access_token}"),)
        secrets.append(signed_in.tokens.access_token)

        chat = chat_service_pb2_grpc.ChatServiceStub(ch)
        events = [
            e async for e in chat.SendMessage(chat_pb.SendMessageRequest(content=chat_text), metadata=md)
        ]
        assert events[-1].HasField("message_completed")
        secrets.append(events[-1].message_completed.message.content)  # the model's reply is private too

        search = search_service_pb2_grpc.SearchServiceStub(ch)
        results = [e async for e in search.Search(search_pb.SearchRequest(query=query), metadata=md)]
        assert results[-1].HasField("completed")

        image = image_service_pb2_grpc.ImageServiceStub(ch)
        generated = [
            e
            async for e in image.GenerateImage(
                image_pb.GenerateImageRequest(prompt=image_prompt, size="256x256"), metadata=md
            )
        ]
        assert generated[-1].HasField("completed")

    logs = logged_server.logs()
    assert '"method":"/everything.chat.v1.ChatService/SendMessage"' in logs  # the session was logged
    for value in secrets:
        if value:
            assert value not in logs, f"a private value appears in the logs: {value[:12]}..."
