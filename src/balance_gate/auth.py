"""Who may call: the admin bearer token, TLS credentials, proxy identities.

- The admin port asks every call for `authorization: Bearer <token>`
  (`AdminTokenInterceptor`). Tokens are compared in constant time against every
  configured token, so neither the timing nor the answer tells which one was
  close. grpc.health.v1 stays open for probes; server reflection does not.
- Both ports serve TLS when a certificate is configured, and demand a client
  certificate signed by the client CA when one is configured (`tls_credentials`).
- With client certificates, `ProxyIdentities` limits the gate port to listed
  proxies (the certificate's common name) and each proxy to account id prefixes.

Tokens never reach a log line, an error message or a repr: the interceptor keeps
only their SHA-256 digests.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import grpc

from balance_gate import errors, metrics

HEALTH_PREFIX = "/grpc.health.v1.Health/"
MIN_TOKEN_CHARS = 16
# Visible ASCII: a token travels as an HTTP/2 header value and must not need quoting.
_TOKEN = re.compile(r"^[\x21-\x7e]+$")
_BEARER = "bearer "
# Words of a token someone meant to replace (deploy/kubernetes/secret.yaml ships one).
_PLACEHOLDER = re.compile(
    r"replace|change|example|todo|fixme|placeholder|dummy|sample|xxxx", re.IGNORECASE
)
WILDCARD = "*"

Context = grpc.aio.ServicerContext[Any, Any]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


def _checked(tokens: list[str], source: str) -> list[str]:
    for number, token in enumerate(tokens, 1):
        # The messages say where the bad token is, never what it is.
        if len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"{source}: token {number} is shorter than {MIN_TOKEN_CHARS} chars")
        if not _TOKEN.match(token):
            raise ValueError(f"{source}: token {number} must be visible ASCII without spaces")
        if _PLACEHOLDER.search(token):
            raise ValueError(
                f"{source}: token {number} looks like a placeholder (REPLACE, CHANGE, EXAMPLE,"
                " TODO, ...): generate a real one, e.g. `openssl rand -hex 32`"
            )
    return tokens


def parse_tokens(text: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']: the comma-separated form of BALANCE_GATE_ADMIN_TOKENS."""
    return _checked([t.strip() for t in text.split(",") if t.strip()], "admin_tokens")


def read_token_file(path: str) -> list[str]:
    """One token per line; blank lines and lines starting with # are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"admin_token_file: cannot read {path!r}: {type(exc).__name__}") from None
    lines = (line.strip() for line in text.splitlines())
    return _checked([line for line in lines if line and not line.startswith("#")], path)


def _digest(token: bytes) -> bytes:
    # Equal-length inputs for compare_digest, whatever length was presented.
    return hashlib.sha256(token).digest()


class AdminTokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """UNAUTHENTICATED for every admin call without a valid bearer token, Health excepted."""

    def __init__(self, tokens: Sequence[str]) -> None:
        if not tokens:
            raise ValueError("AdminTokenInterceptor needs at least one token")
        self._digests = tuple(_digest(t.encode()) for t in tokens)

    def valid(self, presented: str) -> bool:
        """True if `presented` is one of the tokens; looks at every token, whatever matches."""
        digest = _digest(presented.encode("utf-8", "surrogatepass"))
        matched = False
        for expected in self._digests:
            matched |= hmac.compare_digest(digest, expected)
        return matched

    def _refusal(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
        """Why the call must be refused, or None if its token is valid."""
        header = next((v for k, v in metadata or () if k == "authorization"), None)
        if header is None:
            metrics.ADMIN_AUTH_FAILURES.labels("missing").inc()
            return "the admin API needs 'authorization: Bearer <token>' metadata"
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        if header[: len(_BEARER)].lower() != _BEARER:
            metrics.ADMIN_AUTH_FAILURES.labels("not_bearer").inc()
            return "the authorization metadata must be 'Bearer <token>'"
        if not self.valid(header[len(_BEARER) :].strip()):
            metrics.ADMIN_AUTH_FAILURES.labels("invalid").inc()
            return "the bearer token is not valid for the admin API"
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(HEALTH_PREFIX):
            return handler
        refusal = self._refusal(details.invocation_metadata)
        if refusal is None:
            return handler
        return _refusing(handler, refusal)


def _refusing(handler: Handler, message: str) -> Handler:
    """A handler of the same shape as `handler` that ends the call UNAUTHENTICATED."""

    async def refuse(_request: Any, context: Context) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds: dict[tuple[bool, bool], Callable[..., Handler]] = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def tls_credentials(
    cert_file: str, key_file: str, client_ca_file: str
) -> grpc.ServerCredentials | None:
    """Server credentials, or None for plaintext; with a client CA, client certs are required."""
    if not cert_file:
        return None
    pair = (Path(key_file).read_bytes(), Path(cert_file).read_bytes())
    client_ca = Path(client_ca_file).read_bytes() if client_ca_file else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def http_ssl_context(cert_file: str, key_file: str, client_ca_file: str) -> ssl.SSLContext | None:
    """The HTTP endpoint's TLS, from the same files as the gRPC listeners; None: plaintext."""
    if not cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    if client_ca_file:
        context.load_verify_locations(client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class ProxyIdentities:
    """Which proxies (client-certificate common names) may debit which account ids.

    Built from BALANCE_GATE_PROXY_IDENTITIES: {"proxy-a": ["acme-", "beta-"],
    "proxy-b": ["*"]}. An empty mapping lets every caller debit every account.
    """

    def __init__(self, allowed: Mapping[str, Sequence[str]]) -> None:
        self._prefixes = {name: tuple(prefixes) for name, prefixes in allowed.items()}

    def proxy(self, context: Context) -> str | None:
        """The caller's common name if it is a listed proxy; None when nothing is restricted.

        A caller that is not listed gets PermissionDenied.
        """
        names = context.auth_context().get("x509_common_name") or ()
        return self.listed(raw.decode("utf-8", "replace") for raw in names)

    def listed(self, common_names: Iterable[str]) -> str | None:
        """The first of a client certificate's common names that is a listed proxy (see proxy)."""
        if not self._prefixes:
            return None
        for name in common_names:
            if name in self._prefixes:
                return name
        raise errors.PermissionDenied("this client certificate is not a listed proxy")

    def check_account(self, proxy: str | None, account_id: str) -> None:
        """PermissionDenied unless `proxy` (from `proxy()`) may debit `account_id`."""
        if proxy is None:
            return
        prefixes = self._prefixes[proxy]
        if WILDCARD in prefixes or account_id.startswith(prefixes):
            return
        raise errors.PermissionDenied(f"account_id: proxy {proxy!r} may not debit this account")

    def check(self, context: Context, account_id: str) -> None:
        """PermissionDenied unless the caller is a listed proxy allowed this account id."""
        self.check_account(self.proxy(context), account_id)
