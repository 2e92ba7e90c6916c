"""P6 conversions: decimal only, documented rounding."""

from __future__ import annotations

from decimal import Decimal

from balance_gate.fx import convert, is_plausible


def test_p6_eur_top_up_on_a_usd_card_is_converted_at_the_days_rate() -> None:
    done = convert(20_000_000, "EUR", "USD", Decimal("1.0842"), Decimal("1.0842"))
    assert (done.credited_usd_micros, done.charge_currency, done.charge_amount_minor) == (
        21_684_000,
        "USD",
        2_168,  # $21.684 charged as $21.68: half-up to the cent
    )


def test_p6_a_card_in_the_default_currency_is_charged_the_exact_amount() -> None:
    done = convert(20_000_000, "EUR", "EUR", Decimal("1.0842"), Decimal(1))
    assert (done.credited_usd_micros, done.charge_amount_minor) == (21_684_000, 2_000)


def test_p6_rounding_is_half_up_for_the_charge_and_half_even_for_the_credit() -> None:
    charge = convert(20_000_000, "EUR", "USD", Decimal("1.08425"), Decimal("1.08425"))
    assert charge.charge_amount_minor == 2_169  # 21.685 -> 21.69
    credit = convert(1, "EUR", "USD", Decimal("2.5"), Decimal("2.5"))
    assert credit.credited_usd_micros == 2  # 2.5 micros -> 2 (half-even)
    jpy = convert(1_500_000_000, "JPY", "USD", Decimal("0.0066"), Decimal("0.0066"))
    assert (jpy.credited_usd_micros, jpy.charge_amount_minor) == (9_900_000, 990)


def test_usd_accounts_never_touch_a_rate() -> None:
    done = convert(12_340_000, "USD", "USD", Decimal(1), Decimal(1))
    assert (done.credited_usd_micros, done.charge_amount_minor) == (12_340_000, 1_234)


def test_issue13_item7_plausibility_is_the_same_factor_up_and_down() -> None:
    last = Decimal("1.0842")
    assert is_plausible(last * Decimal("1.25"), last, 25)
    assert not is_plausible(last * Decimal("1.2501"), last, 25)
    assert is_plausible(last / Decimal("1.25"), last, 25)
    assert not is_plausible(last / Decimal("1.2501"), last, 25)
    assert not is_plausible(Decimal(10842), last, 25)  # the typo
    # The inverse pair judges alike: 1/rate against 1/last.
    assert is_plausible(1 / (last * Decimal("1.2")), 1 / last, 25)
