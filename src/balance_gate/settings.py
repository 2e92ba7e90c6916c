"""One typed settings object, read from BALANCE_GATE_* environment variables.

Every field has a default that works for `make run` on one machine, and a
description that the README's settings table repeats.
"""

from __future__ import annotations

import ipaddress
import os
from functools import cached_property
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from balance_gate.auth import parse_tokens, read_token_file
from balance_gate.constants import (
    MAX_CREDIT_MICROS,
    MAX_REQUEST_MICROS_LIMIT,
    MIN_REQUEST_TTL_SECONDS,
)


def split_host_port(address: str) -> tuple[str, int]:
    """'127.0.0.1:50051' -> ('127.0.0.1', 50051); '[::1]:50051' -> ('::1', 50051)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """True for localhost and 127.0.0.0/8 or ::1; a name other than localhost is not trusted."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    # hide_input_in_errors: a failed check would otherwise print every input, secrets too.
    model_config = SettingsConfigDict(
        env_prefix="BALANCE_GATE_", frozen=True, extra="ignore", hide_input_in_errors=True
    )

    redis_url: SecretStr = Field(
        default=SecretStr("redis://127.0.0.1:6379/0"),
        description="Redis holding the hot balances (redis:// or rediss://).",
    )
    database_url: SecretStr = Field(
        default=SecretStr("postgresql://postgres@127.0.0.1:5432/balance_gate"),
        description="Postgres, the system of record.",
    )
    gate_listen: str = Field(
        default="127.0.0.1:50051", description="host:port of the proxies' gRPC API (BalanceGate)."
    )
    admin_listen: str = Field(
        default="127.0.0.1:50052", description="host:port of the operators' gRPC API (Admin)."
    )
    admin_tokens: SecretStr = Field(
        default=SecretStr(""),
        description="Bearer tokens the admin API accepts, comma-separated (two during a"
        " rotation); none and a loopback admin_listen: the admin API is open.",
    )
    admin_token_file: str = Field(
        default="",
        description="File of admin tokens, one per line (blank lines and # comments skipped),"
        " read at start-up; added to admin_tokens.",
    )
    tls_cert_file: str = Field(
        default="",
        description="PEM certificate chain every listener serves (gate, admin, HTTP endpoint);"
        " empty: plaintext.",
    )
    tls_key_file: str = Field(default="", description="PEM private key of tls_cert_file.")
    tls_client_ca_file: str = Field(
        default="",
        description="PEM CA certificates; set: every listener requires a client certificate"
        " signed by one of them (mutual TLS).",
    )
    proxy_identities: dict[str, list[str]] = Field(
        default_factory=dict,
        description="JSON: client-certificate common names allowed on the gate port, each with"
        ' the account id prefixes it may debit ("*": any); needs tls_client_ca_file.',
    )
    max_message_bytes: int = Field(
        default=65_536,
        ge=1_024,
        le=64 * 1024 * 1024,
        description="Largest message either listener receives and the gate sends.",
    )
    admin_max_send_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1_024,
        le=1024 * 1024 * 1024,
        description="Largest answer the admin API sends (its lists can be long).",
    )
    max_concurrent_streams: int = Field(
        default=1_024,
        ge=1,
        le=100_000,
        description="Calls open at once on one client connection (HTTP/2 streams); grpc"
        " refuses more with UNAVAILABLE.",
    )
    # Idle and slow connections (connection_limits.py, docs/security.md#connections).
    max_connections: int = Field(
        default=1_000,
        ge=1,
        le=100_000,
        description="Connections each listener (gate, admin, HTTP endpoint) holds at once;"
        " one more is closed as it arrives.",
    )
    handshake_timeout_ms: int = Field(
        default=10_000,
        ge=100,
        le=300_000,
        description="Time a new gRPC connection has to finish TLS and send the HTTP/2"
        " preface and SETTINGS; then it is closed.",
    )
    connection_idle_timeout_ms: int = Field(
        default=300_000,
        ge=1_000,
        le=86_400_000,
        description="A gRPC connection without a call for this long is sent away (GOAWAY);"
        " the client reconnects on its next call.",
    )
    connection_max_age_ms: int = Field(
        default=0,
        ge=0,
        le=7 * 86_400_000,
        description="A gRPC connection this old is sent away (GOAWAY), e.g. to spread clients"
        " over restarted replicas; 0: never (an AuthorizeStream lives for hours).",
    )
    connection_max_age_grace_ms: int = Field(
        default=60_000,
        ge=0,
        le=86_400_000,
        description="After connection_max_age_ms, how long the connection's calls may go on"
        " before they are cut.",
    )
    keepalive_time_ms: int = Field(
        default=60_000,
        ge=10_000,
        le=7_200_000,
        description="The gRPC listeners ping a connection that has been quiet this long.",
    )
    keepalive_timeout_ms: int = Field(
        default=20_000,
        ge=1_000,
        le=600_000,
        description="A ping unanswered this long closes the connection (a dead peer).",
    )
    http_authz_header_timeout_ms: int = Field(
        default=10_000,
        ge=100,
        le=300_000,
        description="Time a new HTTP endpoint connection has to send its first request's"
        " headers; then it is answered 408 and closed.",
    )
    http_authz_idle_timeout_ms: int = Field(
        default=180_000,
        ge=1_000,
        le=86_400_000,
        description="An HTTP endpoint connection waiting this long for its next request is"
        " closed; longer than the proxies' own keep-alive (nginx 60 s, Traefik 90 s).",
    )
    metrics_listen: str = Field(
        default="127.0.0.1:9464", description="host:port serving Prometheus /metrics."
    )
    redis_cluster: bool = Field(
        default=False,
        description="redis_url names one node of a Redis Cluster (docs/reliability.md:"
        " every key of an account, and its shard's streams, share one slot).",
    )
    redis_key_prefix: str = Field(
        default="bg",
        pattern=r"^[a-z][a-z0-9_]{0,15}$",
        description="Prefix of every Redis key; lets several gates share one Redis.",
    )
    request_ttl_seconds: int = Field(
        default=172_800,
        ge=MIN_REQUEST_TTL_SECONDS,
        description="How long a request_id is remembered for de-duplication and Settle (>= 24 h).",
    )
    max_request_micros: int = Field(
        default=1_000_000_000,
        ge=0,
        le=MAX_REQUEST_MICROS_LIMIT,
        description="Largest amount one Authorize or Settle may carry ($1,000 by default).",
    )
    redis_timeout_ms: int = Field(
        default=1_000,
        ge=1,
        le=60_000,
        description="Timeout of every Redis call and of waiting for a pooled connection"
        " (the flusher's blocking read adds flush_block_ms).",
    )
    redis_max_connections: int = Field(
        default=64, ge=2, le=10_000, description="Connections in the Redis pool."
    )
    database_timeout_ms: int = Field(
        default=10_000,
        ge=100,
        description="Timeout of connecting to Postgres and of every statement.",
    )
    database_pool_size: int = Field(
        default=10, ge=2, le=1_000, description="Connections in the Postgres pool."
    )
    flush_batch_size: int = Field(
        default=1_000, ge=1, le=100_000, description="Usage events read per stream per flush."
    )
    flush_block_ms: int = Field(
        default=100,
        ge=1,
        le=10_000,
        description="How long the flusher waits for new usage before looping.",
    )
    flush_interval_ms: int = Field(
        default=100,
        ge=0,
        le=10_000,
        description="Pause after a flush that found less than a full batch, so usage reaches"
        " Postgres in batches (less CPU per event) at the price of this much more lag.",
    )
    flush_claim_idle_ms: int = Field(
        default=30_000,
        ge=100,
        description="Usage read by a consumer that has been silent this long is taken over.",
    )
    credit_sweep_interval_ms: int = Field(
        default=10_000,
        ge=100,
        description="How often credits that a crash left out of Redis are applied.",
    )
    lot_expiry_interval_ms: int = Field(
        default=60_000,
        ge=100,
        description="How often expired, unconsumed credit lots are taken out of balances (O2).",
    )
    credit_review_interval_ms: int = Field(
        default=3_600_000,
        ge=100,
        description="How often credit lines are checked for due or triggered reviews (C3).",
    )
    credit_review_overdue_invoices: int = Field(
        default=2, ge=1, description="Consecutive overdue invoices that open a review (C3)."
    )
    credit_review_surge_factor: float = Field(
        default=3.0,
        gt=1.0,
        description="Yesterday's spend above this times the 30-day daily average opens a review.",
    )
    credit_review_high_cost_margin_pct: int = Field(
        default=10,
        ge=0,
        le=100,
        description="A high-cost share this many points above the expected one opens a review.",
    )
    credit_review_auto_cut_pct: int = Field(
        default=0,
        ge=0,
        le=100,
        description="Opening a review cuts the limit by this percentage (0: it does not).",
    )
    stats_interval_ms: int = Field(
        default=2_000, ge=100, description="How often the flush lag and backlog gauges refresh."
    )
    top_up_trigger_ttl_ms: int = Field(
        default=600_000,
        ge=1_000,
        description="Longest a raised top-up trigger holds off new ones; then it expires.",
    )
    top_up_retry_interval_ms: int = Field(
        default=30_000,
        ge=0,
        description="After a failed or skipped top-up, the next trigger waits this long (P10).",
    )
    top_up_concurrency: int = Field(
        default=16, ge=1, le=1_000, description="Top-up triggers handled at once per sidecar."
    )
    top_up_max_charge_micros: int = Field(
        default=10_000_000_000,
        ge=1_000_000,
        le=MAX_CREDIT_MICROS,
        description="Most one top-up may charge or credit, in micro-USD (the charge valued at"
        " the day's rate); above it the top-up fails (charge_over_limit) before the gateway.",
    )
    fx_rate_max_change_pct: int = Field(
        default=25,
        ge=1,
        le=100_000,
        description="A new FX rate more than this % above the last one for the pair (or below it"
        " by the same factor) is refused unless forced with a reason.",
    )
    payment_gateway: Literal["sandbox", "http"] = Field(
        default="sandbox",
        description="sandbox (test cards, charges in Postgres) or http (docs/payment-gateway.md).",
    )
    payment_gateway_url: str = Field(default="", description="Base URL of the http gateway.")
    payment_gateway_token: SecretStr = Field(
        default=SecretStr(""), description="Bearer token for the http gateway."
    )
    payment_gateway_timeout_ms: int = Field(
        default=5_000, ge=1, description="Timeout of one http gateway request."
    )
    payment_gateway_retries: int = Field(
        default=2, ge=0, le=10, description="Retries of an http gateway request on network errors."
    )
    smtp_host: str = Field(
        default="",
        description="SMTP server for customer emails (P8); empty: emails wait in the outbox.",
    )
    smtp_port: int = Field(default=587, ge=1, le=65_535, description="SMTP port.")
    smtp_from: str = Field(
        default="billing@localhost", description="From address of customer emails."
    )
    smtp_username: str = Field(default="", description="SMTP user; empty: no login.")
    smtp_password: SecretStr = Field(default=SecretStr(""), description="SMTP password.")
    smtp_starttls: bool = Field(
        default=True, description="Upgrade the SMTP connection with STARTTLS."
    )
    not_found_cache_ms: int = Field(
        default=2_000,
        ge=0,
        description="How long an unknown account_id is remembered, sparing Postgres a lookup.",
    )
    not_found_cache_entries: int = Field(
        default=100_000,
        ge=0,
        le=10_000_000,
        description="Most unknown account_ids remembered per process; when full, the least"
        " recently used is forgotten (never the whole cache).",
    )
    account_load_concurrency: int = Field(
        default=4,
        ge=1,
        le=1_000,
        description="Cold loads (accounts missing from Redis, unknown ids included) one process"
        " runs at once, each on a Postgres connection; at most database_pool_size - 1 are used,"
        " so a flood of unknown ids leaves the flusher, credits and top-ups a connection.",
    )
    account_load_wait_ms: int = Field(
        default=1_000,
        ge=0,
        le=60_000,
        description="How long a cold load waits for a free slot (account_load_concurrency)"
        " before the call is answered UNAVAILABLE, to be retried.",
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Processes serving the same ports (SO_REUSEPORT), each with its own event"
        " loop; worker i serves /metrics on the metrics port + i. Needs fixed ports.",
    )
    stream_max_in_flight: int = Field(
        default=1_024,
        ge=1,
        le=100_000,
        description="Requests of one AuthorizeStream decided at once; the stream waits beyond.",
    )
    redis_batch_max: int = Field(
        default=256,
        ge=1,
        le=10_000,
        description="Most Authorize/Settle scripts sent to Redis in one pipeline.",
    )
    http_authz_listen: str = Field(
        default="",
        description="host:port of the plain HTTP Authorize endpoint for nginx auth_request,"
        " Traefik forwardAuth, Caddy forward_auth, HAProxy (docs/http-proxies.md); empty: off.",
    )
    authz_account_key: str = Field(
        default="x-balance-account",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="ext_authz and HTTP endpoint: the header (or Envoy context_extensions"
        " key, which wins) naming the account to debit.",
    )
    authz_request_id_key: str = Field(
        default="x-request-id",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="ext_authz and HTTP endpoint: the header or context key of the request"
        " id (Envoy sets x-request-id on every request).",
    )
    authz_cost_key: str = Field(
        default="x-balance-cost-micros",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="ext_authz and HTTP endpoint: the header or context key of the estimated"
        " cost in micro-USD.",
    )
    authz_capability_key: str = Field(
        default="x-balance-capability",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="ext_authz and HTTP endpoint: the header or context key of the capability.",
    )
    authz_default_cost_micros: int | None = Field(
        default=None,
        ge=0,
        le=MAX_REQUEST_MICROS_LIMIT,
        description="ext_authz and HTTP endpoint: the cost when the request names none; unset:"
        " such a request is refused (400), never served for free by omission.",
    )
    ext_authz_header_price: bool = Field(
        default=False,
        description="ext_authz: also read the cost and capability from request headers;"
        " off: only the route's context_extensions set them, so a client header never sets"
        " its own price.",
    )
    http_authz_secret: SecretStr = Field(
        default=SecretStr(""),
        description="HTTP endpoint: a secret the proxy sends in x-balance-gate-proxy-secret on"
        " every request (compared in constant time; else 401); empty: none asked.",
    )
    allow_insecure_listen: bool = Field(
        default=False,
        description="Start listeners on non-loopback addresses without the protection they"
        " need (gate: mutual TLS; HTTP endpoint: TLS plus client CA or http_authz_secret;"
        " admin: TLS); logs a warning at every start. Never in production.",
    )
    low_balance_warning_micros: int = Field(
        default=1_000_000,
        ge=0,
        le=MAX_REQUEST_MICROS_LIMIT,
        description="An allowed answer carries low_balance once the balance is under this"
        " while auto top-up is off or paused (armed: under its threshold while capped).",
    )
    shadow_accounts: str = Field(
        default="",
        description="Shadow mode: comma-separated account id prefixes ('*' for all) whose"
        " requests are decided and counted as usual but always allowed; a would-be denial"
        " answers allowed with shadow=true and its code, and debits nothing.",
    )
    redis_fail_mode: Literal["fail_closed", "fail_open"] = Field(
        default="fail_closed",
        description="When Redis does not answer: fail_closed denies with code 'unavailable';"
        " fail_open allows up to fail_open_budget_micros per account and outage, and debits"
        " those requests once Redis is back (docs/reliability.md).",
    )
    fail_open_budget_micros: int = Field(
        default=1_000_000,
        ge=0,
        le=MAX_REQUEST_MICROS_LIMIT,
        description="fail_open: most one account may spend on this sidecar during one outage.",
    )
    fail_open_max_requests: int = Field(
        default=100_000,
        ge=0,
        description="fail_open: most requests this sidecar remembers for debiting after an"
        " outage; beyond it, requests are denied 'unavailable'.",
    )
    outage_max_voids: int = Field(
        default=100_000,
        ge=1,
        le=10_000_000,
        description="fail_closed: most timed-out calls this sidecar journals as voids"
        " (to give back once Redis answers). At the cap it stops sending Authorize to"
        " Redis and answers 'unavailable' until the journal drains; no void is dropped.",
    )
    redis_call_timeout_ms: int = Field(
        default=500,
        ge=1,
        le=60_000,
        description="Deadline of one pipeline of Authorize/Settle scripts in Redis; past it,"
        " its calls get the fail mode's answer. A call may wait for one pipeline before its"
        " own: keep this under half the proxies' gRPC deadline.",
    )
    breaker_failures: int = Field(
        default=5,
        ge=1,
        description="Failed Redis calls in a row that open the circuit (calls then fail at"
        " once, without waiting for Redis).",
    )
    breaker_open_ms: int = Field(
        default=1_000,
        ge=1,
        description="How long the circuit stays open before one call probes Redis again.",
    )
    usage_backlog_max: int = Field(
        default=20_000,
        ge=1,
        description="Most usage events one shard's stream may hold while Postgres is away;"
        " beyond it, Authorize denies 'unavailable' rather than debit what it cannot record"
        " (256 shards: about 5 million events, ~1 GB of Redis).",
    )
    lease_accounts: str = Field(
        default="",
        description="Balance leasing (docs/leasing.md): comma-separated account id prefixes"
        " whose busy accounts a sidecar may authorize from memory; '*' for all; empty: off.",
    )
    lease_min_rate: int = Field(
        default=20, ge=1, description="Requests/s an account must reach here before a lease."
    )
    lease_horizon_ms: int = Field(
        default=1_000, ge=10, description="A lease holds about this much of the recent spend."
    )
    lease_ttl_ms: int = Field(
        default=5_000,
        ge=100,
        description="Lease lifetime in Redis; a dead sidecar's lease returns after it.",
    )
    lease_report_interval_ms: int = Field(
        default=20, ge=1, le=1_000, description="How often leased usage is reported to Redis."
    )
    lease_idle_ms: int = Field(
        default=2_000, ge=1, description="A lease unused this long is given back."
    )
    lease_recall_wait_ms: int = Field(
        default=250,
        ge=0,
        description="How long a request that only leased money could pay waits for it back.",
    )
    shutdown_grace_ms: int = Field(
        default=5_000, ge=0, description="How long in-flight calls may finish on SIGTERM."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Least severe log level written."
    )
    log_format: Literal["json", "text"] = Field(
        default="text", description="json in production: one object per line."
    )

    @model_validator(mode="after")
    def _gateway_configured(self) -> Settings:
        if self.payment_gateway == "http" and not self.payment_gateway_url:
            raise ValueError("payment_gateway 'http' needs payment_gateway_url")
        return self

    @model_validator(mode="after")
    def _workers_need_fixed_ports(self) -> Settings:
        if self.workers > 1:
            names = ["gate_listen", "admin_listen", "metrics_listen"]
            names += ["http_authz_listen"] if self.http_authz_listen else []
            for name in names:
                if split_host_port(getattr(self, name))[1] == 0:
                    raise ValueError(f"{name}: workers > 1 needs a fixed port, not 0")
        return self

    @field_validator("http_authz_listen")
    @classmethod
    def _optional_address(cls, value: str) -> str:
        if value:
            split_host_port(value)
        return value

    @field_validator("gate_listen", "admin_listen", "metrics_listen")
    @classmethod
    def _valid_address(cls, value: str) -> str:
        split_host_port(value)
        return value

    @model_validator(mode="after")
    def _admin_token_off_loopback(self) -> Settings:
        host = split_host_port(self.admin_listen)[0]
        if not self.admin_token_values and not is_loopback(host):
            raise ValueError(
                f"admin_listen {self.admin_listen!r} is not a loopback address: set"
                " BALANCE_GATE_ADMIN_TOKENS or BALANCE_GATE_ADMIN_TOKEN_FILE"
            )
        return self

    @model_validator(mode="after")
    def _protected_off_loopback(self) -> Settings:
        """A listener another host can reach needs what stops a caller from lying."""
        if self.allow_insecure_listen:
            return self
        for name, needs in self.unprotected_listeners():
            raise ValueError(
                f"{name} {getattr(self, name)!r} is not a loopback address: it needs {needs}"
                " (or BALANCE_GATE_ALLOW_INSECURE_LISTEN=true, never in production)"
            )
        return self

    def unprotected_listeners(self) -> list[tuple[str, str]]:
        """(setting, what it lacks) of each non-loopback listener without its protection."""
        tls = bool(self.tls_cert_file)
        mutual = tls and bool(self.tls_client_ca_file)
        lacking: list[tuple[str, str]] = []
        if not mutual and not is_loopback(self.gate_address[0]):
            lacking.append(("gate_listen", "mutual TLS (tls_cert_file, tls_client_ca_file)"))
        if self.http_authz_listen and not is_loopback(split_host_port(self.http_authz_listen)[0]):
            secret = bool(self.http_authz_secret.get_secret_value())
            if not (mutual or (tls and secret)):
                lacking.append(
                    ("http_authz_listen", "TLS plus tls_client_ca_file or http_authz_secret")
                )
        if not tls and not is_loopback(split_host_port(self.admin_listen)[0]):
            lacking.append(("admin_listen", "TLS (tls_cert_file) and an admin token"))
        return lacking

    @model_validator(mode="after")
    def _tls_files(self) -> Settings:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            path = getattr(self, name)
            if path and not os.access(path, os.R_OK):
                raise ValueError(f"{name}: cannot read {path!r}")
        return self

    @model_validator(mode="after")
    def _proxy_identities_need_client_certs(self) -> Settings:
        if not self.proxy_identities:
            return self
        if not self.tls_client_ca_file:
            raise ValueError("proxy_identities needs tls_client_ca_file (client certificates)")
        for name, prefixes in self.proxy_identities.items():
            if not name or not prefixes or not all(prefixes):
                raise ValueError(
                    f"proxy_identities[{name!r}]: needs a common name and a list of non-empty"
                    ' account id prefixes ("*" for every account)'
                )
        return self

    @cached_property
    def admin_token_values(self) -> tuple[SecretStr, ...]:
        """The admin tokens of admin_tokens and admin_token_file; read once.

        A setting that is there but yields no token (" , ", a file of comments) is
        refused: it reads as "protected" and would leave the admin API open.
        """
        raw = self.admin_tokens.get_secret_value()
        tokens = parse_tokens(raw)
        if raw and not tokens:
            raise ValueError("admin_tokens is set but holds no token")
        if self.admin_token_file:
            from_file = read_token_file(self.admin_token_file)
            if not from_file:
                raise ValueError(f"admin_token_file {self.admin_token_file!r} holds no token")
            tokens += from_file
        return tuple(SecretStr(token) for token in tokens)

    @cached_property
    def account_load_slots(self) -> int:
        """account_load_concurrency, leaving at least one pool connection to everything else."""
        return min(self.account_load_concurrency, self.database_pool_size - 1)

    @cached_property
    def gate_address(self) -> tuple[str, int]:
        return split_host_port(self.gate_listen)

    @cached_property
    def metrics_address(self) -> tuple[str, int]:
        return split_host_port(self.metrics_listen)
