"""Strict local stand-ins for Entra ID, Google STS (plain and mTLS), IAM Credentials and the GCE
metadata server: real HTTPS servers on loopback that check what the real services check.
Long: every emulated upstream with the checks the real service makes, which the tests rely on.

    Entra ID    POST /{tenant}/oauth2/v2.0/token        client-credentials grant with a client assertion:
                signature against the registered certificate (found by x5t#S256 or x5t), alg PS256/RS256,
                aud = the token URL, iss = sub = client_id, exp − nbf ≤ 10 min, inside its window, jti
                never reused, scope = <app id uri>/.default. Issues an RS256 JWT access token.
    STS         POST /v1/token                           token exchange, no Authorization header, form or
                JSON; jwt subject tokens verified (signature, issuer, audience, expiry) for the provider
    STS mTLS    POST /v1/token (mTLS listener)           subject_token_type mtls; the subject token's leaf
                must be the TLS client certificate; client certificates verified against the SPIFFE bundle
    IAM         POST /v1/projects/-/serviceAccounts/{sa}:generateAccessToken   Bearer = an issued STS token
    metadata    GET  /computeMetadata/v1/instance/service-accounts/{sa}/token  Metadata-Flavor: Google

Error bodies have each service's shape (Entra AADSTS codes, OAuth error/error_description, Google
AIP-193). Faults can be injected per endpoint: error rate, status/body, Retry-After, latency, hangs.
Codes the real services document are used where known; the rest are the emulator's own.

Each listener's checks are one `Request -> Response` function (`handler`): the socket servers of `run` call
it, and so does `mock_transport`, an httpx.MockTransport that answers without sockets (the TLS layer
aside: see there).
"""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import hashlib
import json
import random
import secrets
import ssl
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import anyio
import httpx
import jwt
from anyio.abc import TaskStatus
from anyio.streams.tls import TLSListener
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from wlidd.api.connection import ServerLimits
from wlidd.api.messages import Handler, Request, Response
from wlidd.api.peers import Peer
from wlidd.api.server import HttpServer
from wlidd.emulator.ca import CertificateAuthority, cert_pem, issue_server_cert, key_pem
from wlidd.emulator.produced import remember

GRANT_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
TYPE_ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"
TYPE_ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"
TYPE_MTLS = "urn:ietf:params:oauth:token-type:mtls"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ENDPOINTS = ("entra", "sts", "sts_mtls", "iam", "metadata", "iam_id_token", "metadata_identity")
# The listeners (`Upstreams.handler`) and the names their requests carry: Entra ID, STS and IAM over TLS;
# STS and IAM over mTLS (client certificates verified against the SPIFFE bundle); the metadata server.
LISTENERS = {"https": "emulator", "mtls": "emulator-mtls", "metadata": "emulator-metadata"}
# iam_id_token / metadata_identity: faults for the ID-token calls alone (generateIdToken, .../identity),
# checked after those of iam / metadata; `calls` counts them under these names too.


@dataclass
class Fault:
    """What to do instead of (or before) answering: fail a fraction of requests, slow down, hang."""

    error_rate: float = 1.0
    status: int = 503
    body: dict[str, Any] | None = None
    retry_after: str | None = None
    latency: float = 0.0
    hang: bool = False
    latency_rate: float = 1.0  # the share of requests slowed by `latency`
    hang_rate: float = 1.0  # with hang: the share of requests that hang
    count: int | None = None  # only the next N requests; None: until cleared


@dataclass
class EntraApp:
    client_id: str
    app_id_uri: str
    certificates: list[x509.Certificate] = field(default_factory=list)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _iso(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _form(request: Request) -> dict[str, str]:
    content_type = (request.header("content-type") or "").split(";")[0].strip()
    if content_type == "application/json":
        try:
            document = json.loads(request.body or b"{}")
        except ValueError:
            return {}
        return (
            {k: v if isinstance(v, str) else json.dumps(v) for k, v in document.items()}
            if isinstance(document, dict)
            else {}
        )
    if content_type != "application/x-www-form-urlencoded":
        return {}
    parsed = parse_qs(request.body.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[0] for k, v in parsed.items() if len(v) == 1}


class Upstreams:
    """All emulated upstreams; start with `await tg.start(upstreams.run)`, then read the URLs."""

    def __init__(
        self,
        workdir: Path,
        *,
        tenant_id: str = "00000000-0000-0000-0000-00000000aaaa",
        entra_lifetime: float = 3600,
        sts_lifetime: float = 3600,
        iam_max_lifetime: float = 3600,
        metadata_lifetime: float = 3600,
        service_accounts: Sequence[str] = ("app@demo-project.iam.gserviceaccount.com",),
        metadata_email: str = "default-sa@demo-project.iam.gserviceaccount.com",
        spiffe_bundle_pem: bytes | None = None,
        seed: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.tenant_id = tenant_id
        self.entra_lifetime = entra_lifetime
        self.sts_lifetime = sts_lifetime
        self.iam_max_lifetime = iam_max_lifetime
        self.metadata_lifetime = metadata_lifetime
        self.service_accounts = set(service_accounts)
        self.metadata_email = metadata_email
        self.spiffe_bundle_pem = spiffe_bundle_pem
        self.rng = random.Random(seed)  # noqa: S311 (fault injection, not cryptography)
        self.apps: dict[str, EntraApp] = {}
        self.providers: dict[str, dict[str, Any]] = {}
        self.faults: dict[str, Fault] = {}
        self.calls: Counter[str] = Counter()
        self.refusals: Counter[str] = Counter()
        self.seen_jti: set[str] = set()
        self.issued: dict[str, tuple[dt.datetime, str]] = {}  # STS/IAM/metadata tokens → (expiry, subject)
        self.entra_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.google_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.id_token_lifetime = 3600.0
        # Seconds Google's clock is ahead of ours (negative: behind), as IAM shows it: in expireTime, in the
        # ID tokens' iat/exp and in the Date header of IAM's answers. `issued` stays on the local clock (the
        # real expiry of every token), so tests can check that nothing is served past it.
        self.clock_skew = 0.0
        self.web_ca = CertificateAuthority("emulator.invalid", intermediate=False)
        workdir.mkdir(parents=True, exist_ok=True)
        self.ca_file = workdir / "emulator-ca.pem"
        self.ca_file.write_bytes(self.web_ca.bundle_pem)
        self.https_port = 0
        self.mtls_port = 0
        self.metadata_port = 0
        self.mtls_leaves: list[int] = []  # serial numbers of the client certificates of accepted mTLS exchanges
        self._stop: anyio.Event | None = None

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    # ---- configuration ---------------------------------------------------------------------
    @property
    def entra_issuer(self) -> str:
        return f"https://login.microsoftonline.com/{self.tenant_id}/v2.0"

    @property
    def authority(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    @property
    def sts_url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}/v1/token"

    @property
    def sts_mtls_url(self) -> str:
        return f"https://127.0.0.1:{self.mtls_port}/v1/token"

    @property
    def iam_url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    @property
    def iam_mtls_url(self) -> str:
        return f"https://127.0.0.1:{self.mtls_port}"

    @property
    def metadata_url(self) -> str:
        return f"http://127.0.0.1:{self.metadata_port}"

    def register_app(self, client_id: str, app_id_uri: str, *certificates: x509.Certificate) -> EntraApp:
        app = self.apps.setdefault(client_id, EntraApp(client_id, app_id_uri))
        app.certificates.extend(certificates)
        return app

    def register_oidc_provider(self, audience: str, *, allowed_audiences: Sequence[str]) -> None:
        """A Workload Identity provider trusting this Entra tenant's tokens."""
        self.providers[audience] = {"kind": "oidc", "issuer": self.entra_issuer, "audiences": set(allowed_audiences)}

    def register_x509_provider(self, audience: str) -> None:
        self.providers[audience] = {"kind": "x509"}

    def inject(self, endpoint: str, fault: Fault) -> None:
        assert endpoint in ENDPOINTS, endpoint
        self.faults[endpoint] = fault

    def clear(self, endpoint: str | None = None) -> None:
        if endpoint is None:
            self.faults.clear()
        else:
            self.faults.pop(endpoint, None)

    # ---- serving ---------------------------------------------------------------------------
    def _server_context(self, *, client_bundle: bytes | None) -> ssl.SSLContext:
        issued = issue_server_cert(self.web_ca)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2 if client_bundle is None else ssl.TLSVersion.TLSv1_3
        path = self.workdir / f"server-{secrets.token_hex(4)}.pem"
        path.write_bytes(cert_pem(*issued.chain) + key_pem(issued.key))
        context.load_cert_chain(path)
        path.unlink()
        if client_bundle is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cadata=client_bundle.decode())
        return context

    def handler(self, listener: str) -> Handler:
        """The checks behind `listener` ("https", "mtls" or "metadata": LISTENERS), as one Request -> Response
        function: what the socket servers of `run` call, and `mock_transport` without sockets."""
        handlers: dict[str, Handler] = {"https": self._https, "mtls": self._mtls, "metadata": self._metadata}
        return handlers[listener]

    def mock_transport(self, client_certificate: bytes | None = None) -> httpx.MockTransport:
        """An httpx transport answering with the emulator's own checks (`handler`), without sockets: a request
        goes to the listener whose port its URL names (`https_port`, `mtls_port`, `metadata_port`: give them
        distinct values when the emulator is not run), converted to the Request the socket server would make.

        No TLS happens, so the TLS layer's part is done here or not at all: `client_certificate` (a leaf, DER)
        is the mTLS listener's peer certificate, as its handshake would record the certificate a client
        presents (the STS mTLS check compares the subject token's leaf with it); a request to the mTLS port
        without one fails as its handshake would (httpx.ConnectError). Not emulated: the server certificate
        check against the client's ca_file, TLS 1.3 as the minimum, and the verification of the client's
        chain against the SPIFFE bundle."""

        async def answer(request: httpx.Request) -> httpx.Response:
            port = request.url.port or (443 if request.url.scheme == "https" else 80)
            ports = {self.https_port: "https", self.mtls_port: "mtls", self.metadata_port: "metadata"}
            listener = ports.get(port)
            if listener is None:
                raise httpx.ConnectError(f"the emulator listens on no port {port}", request=request)
            if listener == "mtls" and client_certificate is None:
                raise httpx.ConnectError("the mTLS listener requires a client certificate", request=request)
            query = request.url.query.decode("latin-1")
            checked = Request(
                method=request.method,
                path=request.url.path or "/",
                query=parse_qs(query, keep_blank_values=True) if query else {},
                headers=tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in request.headers.raw),
                body=await request.aread(),
                peer=Peer(address="127.0.0.1", certificate=client_certificate if listener == "mtls" else None),
                listener=LISTENERS[listener],
            )
            response = await self.handler(listener)(checked)
            headers = [("content-type", response.content_type), *response.headers]
            return httpx.Response(response.status, headers=headers, content=response.body)

        return httpx.MockTransport(answer)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        limits = ServerLimits(request_timeout=30, idle_timeout=30)
        https = HttpServer(self.handler("https"), name=LISTENERS["https"], limits=limits)
        mtls = HttpServer(self.handler("mtls"), name=LISTENERS["mtls"], limits=limits)
        metadata = HttpServer(self.handler("metadata"), name=LISTENERS["metadata"], limits=limits)
        tcp_https = await anyio.create_tcp_listener(local_host="127.0.0.1")
        tcp_mtls = await anyio.create_tcp_listener(local_host="127.0.0.1")
        tcp_metadata = await anyio.create_tcp_listener(local_host="127.0.0.1")
        self.https_port = tcp_https.extra(anyio.abc.SocketAttribute.local_port)
        self.mtls_port = tcp_mtls.extra(anyio.abc.SocketAttribute.local_port)
        self.metadata_port = tcp_metadata.extra(anyio.abc.SocketAttribute.local_port)
        listeners = [
            (TLSListener(tcp_https, self._server_context(client_bundle=None), standard_compatible=False), https),
            (
                TLSListener(
                    tcp_mtls,
                    self._server_context(client_bundle=self.spiffe_bundle_pem or self.web_ca.bundle_pem),
                    standard_compatible=False,
                ),
                mtls,
            ),
            (tcp_metadata, metadata),
        ]
        try:
            async with anyio.create_task_group() as tg:
                for listener, server in listeners:
                    tg.start_soon(_serve_quietly, listener, server)
                self._stop = anyio.Event()
                task_status.started()
                await self._stop.wait()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                for listener, _ in listeners:
                    await listener.aclose()

    async def _with_faults(self, endpoint: str, request: Request) -> Response | None:
        self.calls[endpoint] += 1
        fault = self.faults.get(endpoint)
        if fault is None:
            return None
        if fault.count is not None:
            if fault.count <= 0:
                self.faults.pop(endpoint, None)
                return None
            fault.count -= 1
        if fault.latency and (fault.latency_rate >= 1 or self.rng.random() < fault.latency_rate):
            await anyio.sleep(fault.latency)
        if fault.hang and (fault.hang_rate >= 1 or self.rng.random() < fault.hang_rate):
            await anyio.sleep(3600)
        if self.rng.random() < fault.error_rate:
            body = fault.body or _default_error(endpoint, fault.status)
            headers = (("retry-after", fault.retry_after),) if fault.retry_after else ()
            return Response.json(fault.status, body, headers=headers)
        return None

    async def _https(self, request: Request) -> Response:
        if request.path.startswith(f"/{self.tenant_id}/") or request.path.endswith("/oauth2/v2.0/token"):
            return await self._entra(request)
        if request.path == "/v1/token":
            return await self._sts(request, mtls=False)
        if request.path.startswith("/v1/projects/-/serviceAccounts/"):
            return await self._iam(request)
        return Response.error(404, "not_found", request.path)

    async def _mtls(self, request: Request) -> Response:
        if request.path == "/v1/token":
            return await self._sts(request, mtls=True)
        if request.path.startswith("/v1/projects/-/serviceAccounts/"):
            return await self._iam(request)
        return Response.error(404, "not_found", request.path)

    # ---- Entra ID --------------------------------------------------------------------------
    def _aad(self, status: int, error: str, code: int, text: str) -> Response:
        self.refusals[f"entra:AADSTS{code}"] += 1
        trace = str(uuid.uuid4())
        return Response.json(
            status,
            {
                "error": error,
                "error_description": f"AADSTS{code}: {text} Trace ID: {trace} Correlation ID: {uuid.uuid4()}",
                "error_codes": [code],
                "timestamp": _iso(dt.datetime.now(dt.UTC)),
                "trace_id": trace,
                "correlation_id": str(uuid.uuid4()),
            },
        )

    async def _entra(self, request: Request) -> Response:
        if (fault := await self._with_faults("entra", request)) is not None:
            return fault
        if request.method != "POST":
            return self._aad(405, "invalid_request", 900561, "The endpoint only accepts POST requests.")
        tenant = request.path.split("/")[1]
        if tenant != self.tenant_id or request.path != f"/{tenant}/oauth2/v2.0/token":
            return self._aad(400, "invalid_request", 90002, f"Tenant '{tenant}' not found.")
        form = _form(request)
        if (request.header("content-type") or "").split(";")[0] != "application/x-www-form-urlencoded":
            return self._aad(400, "invalid_request", 900144, "The request body must be form-encoded.")
        for name in ("client_id", "scope", "client_assertion_type", "client_assertion", "grant_type"):
            if not form.get(name):
                return self._aad(
                    400, "invalid_request", 900144, f"The request body must contain the parameter: '{name}'."
                )
        if form["grant_type"] != "client_credentials":
            return self._aad(400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type.")
        if form["client_assertion_type"] != ASSERTION_TYPE:
            return self._aad(400, "invalid_request", 700011, "Invalid client_assertion_type.")
        app = self.apps.get(form["client_id"])
        if app is None:
            return self._aad(400, "unauthorized_client", 700016, f"Application '{form['client_id']}' was not found.")
        if form["scope"] != f"{app.app_id_uri}/.default":
            return self._aad(
                400, "invalid_scope", 1002012, f"The provided value for scope {form['scope']} is not valid."
            )
        token_url = f"{self.authority}/{self.tenant_id}/oauth2/v2.0/token"
        remember("client assertion", form["client_assertion"])
        refusal = self._check_assertion(form["client_assertion"], app, token_url)
        if refusal is not None:
            return refusal
        now = dt.datetime.now(dt.UTC)
        claims = {
            "iss": self.entra_issuer,
            "aud": app.app_id_uri,
            "sub": app.client_id,
            "azp": app.client_id,
            "tid": self.tenant_id,
            "iat": int(now.timestamp()),
            "nbf": int(now.timestamp()),
            "exp": int(now.timestamp() + self.entra_lifetime),
            "ver": "2.0",
        }
        token = jwt.encode(claims, self.entra_key, algorithm="RS256", headers={"kid": "emulator"})
        remember("Entra access token", token)
        return Response.json(
            200,
            {
                "token_type": "Bearer",
                "expires_in": int(self.entra_lifetime),
                "ext_expires_in": int(self.entra_lifetime),
                "access_token": token,
            },
        )

    def _check_assertion(self, assertion: str, app: EntraApp, token_url: str) -> Response | None:
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError:
            return self._aad(401, "invalid_client", 50027, "JWT token is invalid or malformed.")
        alg = header.get("alg")
        if alg not in ("PS256", "RS256"):
            return self._aad(
                401, "invalid_client", 5002738, f"The client assertion uses an unsupported algorithm {alg!r}."
            )
        if header.get("typ") not in (None, "JWT"):
            return self._aad(401, "invalid_client", 50027, "JWT typ must be JWT.")
        cert = None
        for candidate in app.certificates:
            der = candidate.public_bytes(serialization.Encoding.DER)
            if header.get("x5t#S256") == _b64url(hashlib.sha256(der).digest()) or (
                "x5t#S256" not in header and header.get("x5t") == _b64url(hashlib.sha1(der).digest())  # noqa: S324
            ):
                cert = candidate
                break
        if cert is None:
            return self._aad(
                401, "invalid_client", 700027, "Client assertion failed signature validation: key was not found (x5t)."
            )
        der = cert.public_bytes(serialization.Encoding.DER)
        if "x5t" in header and header["x5t"] != _b64url(hashlib.sha1(der).digest()):  # noqa: S324
            return self._aad(401, "invalid_client", 700027, "x5t does not match x5t#S256.")
        try:
            claims = jwt.decode(
                assertion,
                cert.public_key(),  # type: ignore[arg-type]
                algorithms=[alg],
                audience=token_url,
                options={"require": ["aud", "iss", "sub", "jti", "exp", "nbf", "iat"]},
                leeway=60,
            )
        except jwt.InvalidSignatureError:
            return self._aad(401, "invalid_client", 700027, "Client assertion failed signature validation.")
        except jwt.InvalidAudienceError:
            return self._aad(
                401, "invalid_client", 700021, f"Client assertion audience claim does not match '{token_url}'."
            )
        except (jwt.ExpiredSignatureError, jwt.ImmatureSignatureError):
            return self._aad(401, "invalid_client", 700024, "Client assertion is not within its valid time range.")
        except jwt.PyJWTError as exc:
            return self._aad(401, "invalid_client", 50027, f"Invalid JWT: {type(exc).__name__}.")
        if claims["iss"] != app.client_id or claims["sub"] != app.client_id:
            return self._aad(401, "invalid_client", 700023, "Client assertion iss and sub must be the client id.")
        if int(claims["exp"]) - int(claims["nbf"]) > 600:
            return self._aad(401, "invalid_client", 700024, "Client assertion lifetime exceeds 10 minutes.")
        if claims["jti"] in self.seen_jti:
            return self._aad(401, "invalid_client", 7000215, "Client assertion jti was already used (replay).")
        self.seen_jti.add(claims["jti"])
        return None

    # ---- STS -------------------------------------------------------------------------------
    def _oauth_error(self, endpoint: str, status: int, error: str, description: str) -> Response:
        self.refusals[f"{endpoint}:{error}"] += 1
        return Response.json(status, {"error": error, "error_description": description})

    async def _sts(self, request: Request, *, mtls: bool) -> Response:
        endpoint = "sts_mtls" if mtls else "sts"
        if (fault := await self._with_faults(endpoint, request)) is not None:
            return fault
        if request.method != "POST":
            return self._oauth_error(endpoint, 405, "invalid_request", "POST only")
        if request.header("authorization") is not None:
            return self._oauth_error(
                endpoint, 400, "invalid_request", "The token exchange must not carry an Authorization header."
            )
        form = _form(request)
        for name in ("grant_type", "audience", "scope", "requested_token_type", "subject_token", "subject_token_type"):
            if not form.get(name):
                return self._oauth_error(endpoint, 400, "invalid_request", f"Missing required field {name!r}.")
        if form["grant_type"] != GRANT_TOKEN_EXCHANGE:
            return self._oauth_error(
                endpoint, 400, "unsupported_grant_type", f"Unsupported grant type {form['grant_type']!r}."
            )
        if form["requested_token_type"] != TYPE_ACCESS_TOKEN:
            return self._oauth_error(endpoint, 400, "invalid_request", "requested_token_type must be access_token.")
        provider = self.providers.get(form["audience"])
        if provider is None:
            return self._oauth_error(
                endpoint, 400, "invalid_target", f"The target audience {form['audience']!r} is invalid."
            )
        refusal = self._check_mtls_subject(form, provider, request) if mtls else self._check_jwt_subject(form, provider)
        if refusal is not None:
            return refusal
        token = f"ya29.sts-{secrets.token_urlsafe(24)}"
        subject = form["audience"]
        self.issued[token] = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.sts_lifetime), subject)
        remember("access token", token)
        return Response.json(
            200,
            {
                "access_token": token,
                "issued_token_type": TYPE_ACCESS_TOKEN,
                "token_type": "Bearer",
                "expires_in": int(self.sts_lifetime),
            },
        )

    def _check_jwt_subject(self, form: Mapping[str, str], provider: Mapping[str, Any]) -> Response | None:
        if provider["kind"] != "oidc" or form["subject_token_type"] not in (TYPE_JWT, TYPE_ID_TOKEN):
            return self._oauth_error("sts", 400, "invalid_request", "subject_token_type does not fit the provider.")
        try:
            remember("subject token", form["subject_token"])
            claims = jwt.decode(
                form["subject_token"],
                self.entra_key.public_key(),
                algorithms=["RS256"],
                audience=list(provider["audiences"]),
                issuer=provider["issuer"],
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            return self._oauth_error("sts", 400, "invalid_grant", "The subject token has expired.")
        except jwt.InvalidAudienceError:
            return self._oauth_error(
                "sts", 400, "invalid_grant", "The audience in the subject token does not match the provider."
            )
        except jwt.InvalidIssuerError:
            return self._oauth_error(
                "sts", 400, "invalid_grant", "The issuer in the subject token does not match the provider."
            )
        except jwt.PyJWTError:
            return self._oauth_error("sts", 400, "invalid_grant", "Invalid subject token signature or format.")
        del claims
        return None

    def _check_mtls_subject(
        self, form: Mapping[str, str], provider: Mapping[str, Any], request: Request
    ) -> Response | None:
        if provider["kind"] != "x509" or form["subject_token_type"] != TYPE_MTLS:
            return self._oauth_error(
                "sts_mtls", 400, "invalid_request", "subject_token_type must be mtls for this provider."
            )
        try:
            chain = json.loads(form["subject_token"])
            leaf_der = base64.b64decode(chain[0], validate=True)
        except (ValueError, TypeError, IndexError, KeyError):
            return self._oauth_error(
                "sts_mtls", 400, "invalid_grant", "subject_token must be a JSON array of base64 DER certificates."
            )
        if request.peer.certificate is None or leaf_der != request.peer.certificate:
            return self._oauth_error(
                "sts_mtls", 400, "invalid_grant", "The subject token's leaf is not the TLS client certificate."
            )
        self.mtls_leaves.append(x509.load_der_x509_certificate(leaf_der).serial_number)
        return None

    # ---- IAM Credentials -------------------------------------------------------------------
    def _google_error(self, endpoint: str, code: int, status: str, message: str) -> Response:
        self.refusals[f"{endpoint}:{status}"] += 1
        return Response.json(code, {"error": {"code": code, "message": message, "status": status}})

    async def _iam(self, request: Request) -> Response:
        if (fault := await self._with_faults("iam", request)) is not None:
            return fault
        name = request.path.removeprefix("/v1/projects/-/serviceAccounts/")
        method = name.rpartition(":")[2]
        if request.method != "POST" or method not in ("generateAccessToken", "generateIdToken"):
            return self._google_error("iam", 404, "NOT_FOUND", f"Method not found: {request.method} {request.path}")
        if method == "generateIdToken" and (fault := await self._with_faults("iam_id_token", request)) is not None:
            return fault
        email = name.rpartition(":")[0]
        auth = request.header("authorization") or ""
        bearer = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else ""
        issued = self.issued.get(bearer)
        if issued is None or issued[0] <= dt.datetime.now(dt.UTC):
            return self._google_error("iam", 401, "UNAUTHENTICATED", "Request had invalid authentication credentials.")
        if email not in self.service_accounts:
            return self._google_error(
                "iam", 403, "PERMISSION_DENIED", f"Permission 'iam.serviceAccounts.getAccessToken' denied on {email}."
            )
        if (request.header("content-type") or "").split(";")[0] != "application/json":
            return self._google_error("iam", 400, "INVALID_ARGUMENT", "Content-Type must be application/json.")
        if method == "generateIdToken":
            return self._iam_id_token(email, request.body)
        try:
            body = json.loads(request.body)
            scope = body["scope"]
            lifetime = float(str(body.get("lifetime", "3600s")).removesuffix("s"))
        except (ValueError, KeyError, TypeError):
            return self._google_error("iam", 400, "INVALID_ARGUMENT", "Invalid JSON payload.")
        if not isinstance(scope, list) or not scope or not all(isinstance(s, str) for s in scope):
            return self._google_error("iam", 400, "INVALID_ARGUMENT", "scope must be a non-empty list.")
        if not 0 < lifetime <= self.iam_max_lifetime:
            return self._google_error(
                "iam", 400, "INVALID_ARGUMENT", f"lifetime must be between 1s and {self.iam_max_lifetime:g}s."
            )
        expire = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=lifetime)
        token = f"ya29.iam-{secrets.token_urlsafe(24)}"
        self.issued[token] = (expire, email)
        remember("access token", token)
        shown = expire + dt.timedelta(seconds=self.clock_skew)
        return Response.json(200, {"accessToken": token, "expireTime": _iso(shown)}, headers=self._date())

    def _date(self) -> tuple[tuple[str, str], ...]:
        """A Date header (RFC 9110 §6.6.1) from Google's clock, as Google's front ends send on every answer."""
        return (("date", email.utils.formatdate(time.time() + self.clock_skew, usegmt=True)),)

    def id_token(self, email: str, audience: str) -> str:
        """A Google-style ID token (RS256, emulator key) for `email` and `audience`."""
        now = int(dt.datetime.now(dt.UTC).timestamp() + self.clock_skew)
        claims: dict[str, object] = {
            "iss": "https://accounts.google.com",
            "aud": audience,
            "sub": email,
            "email": email,
        }
        claims |= {"email_verified": True, "iat": now, "exp": now + int(self.id_token_lifetime)}
        token = jwt.encode(claims, self.google_key, algorithm="RS256", headers={"kid": "emulator-google"})
        remember("ID token", token)
        return token

    def _iam_id_token(self, email: str, body_bytes: bytes) -> Response:
        try:
            body = json.loads(body_bytes)
            audience = body["audience"]
        except (ValueError, KeyError, TypeError):
            return self._google_error("iam", 400, "INVALID_ARGUMENT", "audience is required.")
        if not isinstance(audience, str) or not audience:
            return self._google_error("iam", 400, "INVALID_ARGUMENT", "audience must be a non-empty string.")
        return Response.json(200, {"token": self.id_token(email, audience)}, headers=self._date())

    # ---- metadata --------------------------------------------------------------------------
    async def _metadata(self, request: Request) -> Response:
        flavor = (("metadata-flavor", "Google"),)
        if request.header("x-forwarded-for") is not None:
            return Response.text(403, "Forbidden: X-Forwarded-For", "text/html")
        if request.path != "/" and request.header("metadata-flavor") != "Google":
            return Response(403, b'Missing required header "Metadata-Flavor": "Google"', "text/html", flavor)
        if (fault := await self._with_faults("metadata", request)) is not None:
            return fault
        prefix = "/computeMetadata/v1/instance/service-accounts/"
        if request.path == "/":
            return Response(200, b"computeMetadata/\n", "application/text", flavor)
        if request.path.startswith(prefix) and request.path.endswith("/identity"):
            if (fault := await self._with_faults("metadata_identity", request)) is not None:
                return fault
            audience = request.query.get("audience", [""])[0]
            if not audience:
                return Response(400, b"non-empty audience parameter required", "text/html", flavor)
            return Response(200, self.id_token(self.metadata_email, audience).encode(), "text/html", flavor)
        if request.path.startswith(prefix) and request.path.endswith("/token"):
            account = request.path.removeprefix(prefix).removesuffix("/token")
            if account not in ("default", self.metadata_email):
                return Response(404, b"Not Found", "text/html", flavor)
            token = f"ya29.mds-{secrets.token_urlsafe(24)}"
            self.issued[token] = (
                dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.metadata_lifetime),
                self.metadata_email,
            )
            remember("access token", token)
            body = {"access_token": token, "expires_in": int(self.metadata_lifetime), "token_type": "Bearer"}
            return Response(200, json.dumps(body).encode(), "application/json", flavor)
        return Response(404, b"Not Found", "text/html", flavor)


def _default_error(endpoint: str, status: int) -> dict[str, Any]:
    if endpoint == "entra":
        return {
            "error": "temporarily_unavailable",
            "error_description": "AADSTS90033: A transient error has occurred.",
            "error_codes": [90033],
        }
    if endpoint in ("sts", "sts_mtls"):
        return {"error": "temporarily_unavailable", "error_description": f"injected fault ({status})"}
    names = {429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE", 403: "PERMISSION_DENIED"}
    return {"error": {"code": status, "message": "injected fault", "status": names.get(status, "UNKNOWN")}}


async def _serve_quietly(listener: Any, server: HttpServer) -> None:
    await server.serve(listener)
