"""Input checks shared by every front end. Each failure names the field.

These run on the hot path, so they are plain comparisons and one precompiled
regular expression, no allocation beyond what the checks need.
"""

from __future__ import annotations

import re

from balance_gate import currencies
from balance_gate.constants import (
    MAX_CAPABILITY_BYTES,
    MAX_CREDIT_MICROS,
    MAX_ID_BYTES,
    MAX_REASON_CHARS,
)
from balance_gate.errors import InvalidArgument

# C0 and C1 control characters, and DEL.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


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


def check_capability(value: str) -> None:
    """Optional cost class: empty, or up to 64 bytes without control characters."""
    if not value:
        return
    if _utf8_len(value) > MAX_CAPABILITY_BYTES:
        raise InvalidArgument("capability", f"must be at most {MAX_CAPABILITY_BYTES} bytes")
    if _CONTROL.search(value):
        raise InvalidArgument("capability", "must not contain control characters")


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
