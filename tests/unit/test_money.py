"""Money formatting for invoices (P4): integer minor units, the currency's symbol."""

from __future__ import annotations

import pytest

from balance_gate import money
from balance_gate.errors import InvalidArgument


def test_p4_invoice_line_is_description_padding_amount() -> None:
    line = money.invoice_line("Top-up — auto, threshold $50", 20_000, "USD")
    assert line.startswith("Top-up — auto, threshold $50 ")
    assert line.endswith(" $200.00")
    assert len(line) == money.INVOICE_LINE_WIDTH
    assert line.split() == ["Top-up", "—", "auto,", "threshold", "$50", "$200.00"]


@pytest.mark.parametrize(
    ("minor", "currency", "text"),
    [
        (20_000, "USD", "$200.00"),
        (5, "USD", "$0.05"),
        (123_456_789, "EUR", "€1,234,567.89"),
        (500, "JPY", "¥500"),
        (1_234, "KWD", "KWD 1.234"),
        (-250, "USD", "-$2.50"),
    ],
)
def test_minor_units_are_formatted_with_the_currency_exponent(
    minor: int, currency: str, text: str
) -> None:
    assert money.format_minor(minor, currency) == text


def test_whole_amounts_can_drop_their_cents() -> None:
    assert money.format_micros(50_000_000, "USD", drop_zero_cents=True) == "$50"
    assert money.format_micros(50_500_000, "USD", drop_zero_cents=True) == "$50.50"


def test_only_whole_minor_units_convert() -> None:
    assert money.to_minor(1_230_000, "USD") == 123
    assert money.to_minor(500_000_000, "JPY") == 500
    with pytest.raises(ValueError, match="minor units"):
        money.to_minor(1_234_567, "USD")
    with pytest.raises(InvalidArgument) as raised:
        money.check_whole_minor_units("amount_micros", 1_500_000, "JPY")
    assert raised.value.field == "amount_micros"
