"""Integer money: micro-units to a currency's minor units, and invoice formatting.

No floats anywhere: a micro-unit amount converts to minor units only when it is
a whole number of them (a card network cannot charge a fraction of a cent).
"""

from __future__ import annotations

from balance_gate.currencies import MINOR_UNIT_EXPONENT
from balance_gate.errors import InvalidArgument

MICROS_EXPONENT = 6
_SYMBOLS = {"USD": "$", "EUR": "€", "GBP": "£", "JPY": "¥", "CNY": "¥", "INR": "₹"}
# Invoice lines: the description left, the amount right, in a fixed width (P4).
INVOICE_LINE_WIDTH = 56


def micros_per_minor(currency: str) -> int:
    step: int = 10 ** (MICROS_EXPONENT - MINOR_UNIT_EXPONENT[currency])
    return step


def check_whole_minor_units(field: str, micros: int, currency: str) -> None:
    if micros % micros_per_minor(currency):
        raise InvalidArgument(field, f"must be a whole number of {currency} minor units")


def to_minor(micros: int, currency: str) -> int:
    step = micros_per_minor(currency)
    if micros % step:
        raise ValueError(f"{micros} micros is not a whole number of {currency} minor units")
    return micros // step


def format_minor(amount_minor: int, currency: str, *, drop_zero_cents: bool = False) -> str:
    """12345 USD -> '$123.45'; 5000 USD with drop_zero_cents -> '$50'; 500 JPY -> '¥500'."""
    exponent = MINOR_UNIT_EXPONENT[currency]
    sign = "-" if amount_minor < 0 else ""
    units, fraction = divmod(abs(amount_minor), 10**exponent)
    text = f"{units:,}"
    if exponent and not (drop_zero_cents and fraction == 0):
        text += f".{fraction:0{exponent}d}"
    symbol = _SYMBOLS.get(currency)
    return f"{sign}{symbol}{text}" if symbol else f"{sign}{currency} {text}"


def format_micros(micros: int, currency: str, *, drop_zero_cents: bool = False) -> str:
    """Like format_minor, for an amount in micro-units (truncated to minor units)."""
    step = micros_per_minor(currency)
    minor = -(-micros // step) if micros < 0 else micros // step
    return format_minor(minor, currency, drop_zero_cents=drop_zero_cents)


def invoice_line(description: str, amount_minor: int, currency: str) -> str:
    """'Top-up — auto, threshold $50' padded, then '$200.00' (P4)."""
    amount = format_minor(amount_minor, currency)
    width = max(INVOICE_LINE_WIDTH - len(amount), len(description) + 4)
    return f"{description:<{width}}{amount}"
