"""Top-up results become bounded metric labels: a gateway's free-form decline code
must never create a new time series."""

from __future__ import annotations

from balance_gate.top_up_worker import metric_result


def test_known_results_are_kept_and_decline_codes_are_counted_as_declined() -> None:
    assert metric_result("succeeded") == "succeeded"
    assert metric_result("daily_cap") == "daily_cap"
    assert metric_result("network_error") == "network_error"
    for code in ("generic_decline", "insufficient_funds", "fraudulent", "card-says-🤷"):
        assert metric_result(code) == "declined"
