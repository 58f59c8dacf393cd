"""AuthService over gRPC: validate, call the service, convert."""

from __future__ import annotations

from everything.auth.v1 import auth_service_pb2 as pb
from everything.auth.v1 import auth_service_pb2_grpc
from everything_server.auth import convert
from everything_server.auth.export import Exporter
from everything_server.auth.service import AuthService
from everything_server.limits import client_address
from everything_server.rpc import validate
from everything_server.rpc.context import principal
from everything_server.rpc.convert import metadata_value


class AuthServicer(auth_service_pb2_grpc.AuthServiceServicer):
    def __init__(self, auth: AuthService, exporter: Exporter, trusted_proxies=()):
        self._auth = auth
        self._exporter = exporter
        self._trusted = list(trusted_proxies)

    def _address(self, context) -> str:
        return client_address(context.peer() or "", metadata_value(context, "x-forwarded-for"), self._trusted)

    async def SignUp(self, request, context):
        result = await self._auth.sign_up(
            email=request.email,
            password=request.password,
            display_name=request.display_name,
            user_agent=metadata_value(context, "user-agent"),
            address=self._address(context),
        )
        return pb.SignUpResponse(
            user=convert.user_to_proto(result.user), tokens=convert.tokens_to_proto(result.tokens)
        )

    async def SignIn(self, request, context):
        result = await self._auth.sign_in(
            email=request.email,
            password=request.password,
            user_agent=metadata_value(context, "user-agent"),
            address=self._address(context),
        )
        return pb.SignInResponse(
            user=convert.user_to_proto(result.user), tokens=convert.tokens_to_proto(result.tokens)
        )

    async def RefreshToken(self, request, context):
        tokens = await self._auth.refresh(request.refresh_token)
        return pb.RefreshTokenResponse(tokens=convert.tokens_to_proto(tokens))

    async def SignOut(self, request, context):
        await self._auth.sign_out(principal())
        return pb.SignOutResponse()

    async def GetCurrentUser(self, request, context):
        user = await self._auth.current_user(principal())
        return pb.GetCurrentUserResponse(user=convert.user_to_proto(user))

    async def ListSessions(self, request, context):
        p = principal()
        sessions, token = await self._auth.list_sessions(
            p, page_size=validate.page_size(request.page_size), page_token=request.page_token
        )
        return pb.ListSessionsResponse(
            sessions=[convert.session_to_proto(s, p.session_id) for s in sessions], next_page_token=token
        )

    async def RevokeSession(self, request, context):
        session_id = validate.parse_uuid("session_id", request.session_id)
        await self._auth.revoke_session(principal(), session_id)
        return pb.RevokeSessionResponse()

    async def ChangePassword(self, request, context):
        await self._auth.change_password(
            principal(), current_password=request.current_password, new_password=request.new_password
        )
        return pb.ChangePasswordResponse()

    async def DeleteAccount(self, request, context):
        await self._auth.delete_account(principal(), password=request.password)
        return pb.DeleteAccountResponse()

    async def ExportUserData(self, request, context):
        first = True
        async for chunk in self._exporter.export(principal(), include_bytes=request.include_image_bytes):
            yield pb.ExportUserDataResponse(data=chunk, content_type="application/json" if first else "")
            first = False
