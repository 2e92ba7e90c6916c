"""Input checks shared by every front end. Each failure names the field.

These run on the hot path, so they are plain comparisons and one precompiled
regular expression, no allocation beyond what the checks need.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from balance_gate import currencies
from balance_gate.constants import (
    MAX_CAPABILITY_BYTES,
    MAX_CREDIT_MICROS,
    MAX_ID_BYTES,
    MAX_REASON_CHARS,
    MAX_TIME_ZONE_CHARS,
)
from balance_gate.errors import InvalidArgument

# C0 and C1 control characters, and DEL.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# Idempotency keys the system makes itself (a top-up's credit and gateway charge, a
# refund's, an appeal's refund, an expiry) start with this; clients may not use it
# (issue 13 item 4), so an operator's key can never take one of them first.
SYSTEM_KEY_PREFIX = "balance-gate-"


def _utf8_len(value: str) -> int:
    return len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))


def check_id(field: str, value: str) -> None:
    """An identifier: 1..128 bytes of UTF-8, no control characters."""
    if not value:
        raise InvalidArgument(field, "must not be empty")
    if _utf8_len(value) > MAX_ID_BYTES:
        raise InvalidArgument(field, f"must be at most {MAX_ID_BYTES} bytes")
    if _CONTROL.search(value):
        raise InvalidArgument(field, "must not contain control characters")


def system_key(name: str) -> str:
    """An idempotency key in the system's own namespace, e.g. 'balance-gate-refund-7'."""
    return SYSTEM_KEY_PREFIX + name


def check_client_key(field: str, value: str) -> None:
    """A client's idempotency key: an identifier outside the system's namespace (any case)."""
    check_id(field, value)
    if value[: len(SYSTEM_KEY_PREFIX)].lower() == SYSTEM_KEY_PREFIX:
        raise InvalidArgument(
            field, f"must not start with {SYSTEM_KEY_PREFIX!r}: reserved for the system's own keys"
        )


def check_capability(value: str) -> None:
    """Optional cost class: empty, or up to 64 bytes without control characters."""
    if not value:
        return
    if _utf8_len(value) > MAX_CAPABILITY_BYTES:
        raise InvalidArgument("capability", f"must be at most {MAX_CAPABILITY_BYTES} bytes")
    if _CONTROL.search(value):
        raise InvalidArgument("capability", "must not contain control characters")


def normalize_capability(value: str) -> str:
    """The one spelling of a capability name (C4): surrounding space stripped, case-folded.

    Used for a credit line's high-cost capabilities (when stored and when loaded)
    and for every request's capability before it is decided, so that `GPT-4o`,
    `gpt-4o ` and `gpt-4o` are one capability. Only whitespace-only becomes ''.
    """
    return value.strip().casefold()


def normalized_capabilities(capabilities: Iterable[str]) -> tuple[str, ...]:
    """A line's high-cost capabilities in their one spelling, without empties or repeats."""
    names = (normalize_capability(name) for name in capabilities)
    return tuple(dict.fromkeys(name for name in names if name))


def check_request_amount(field: str, value: int, maximum: int) -> None:
    """A request's cost: 0 (free) up to the configured maximum."""
    if value < 0:
        raise InvalidArgument(field, "must not be negative")
    if value > maximum:
        raise InvalidArgument(field, f"must be at most {maximum} micros")


def check_credit_amount(field: str, value: int) -> None:
    """An operator's adjustment: non-zero, within +/- MAX_CREDIT_MICROS."""
    if value == 0:
        raise InvalidArgument(field, "must not be zero")
    if abs(value) > MAX_CREDIT_MICROS:
        raise InvalidArgument(
            field, f"must be between -{MAX_CREDIT_MICROS} and {MAX_CREDIT_MICROS}"
        )


def check_reason(value: str, field: str = "reason") -> None:
    """Free text for people (a reason, a description): 1..500 characters, no controls."""
    if not value.strip():
        raise InvalidArgument(field, "must not be empty")
    if len(value) > MAX_REASON_CHARS:
        raise InvalidArgument(field, f"must be at most {MAX_REASON_CHARS} characters")
    if _CONTROL.search(value):
        raise InvalidArgument(field, "must not contain control characters")


def normalize_currency(value: str) -> str:
    """'' -> 'USD'; otherwise an ISO 4217 code we accept, upper case exactly."""
    if not value:
        return currencies.DEFAULT_CURRENCY
    if not currencies.is_known(value):
        raise InvalidArgument("currency", f"{value!r} is not a supported ISO 4217 currency code")
    return value


def check_time_zone(value: str) -> None:
    """An IANA time zone name such as 'Europe/Paris'.

    The length is checked first: zoneinfo looks the name up as a file, and a name
    too long for the file system is an OSError, not a ValueError.
    """
    if not value or len(value) > MAX_TIME_ZONE_CHARS or _CONTROL.search(value):
        raise InvalidArgument("time_zone", "must be an IANA time zone such as 'Europe/Paris'")
    try:
        ZoneInfo(value)
    except (ValueError, OSError, ZoneInfoNotFoundError):
        raise InvalidArgument("time_zone", f"{value!r} is not an IANA time zone") from None
