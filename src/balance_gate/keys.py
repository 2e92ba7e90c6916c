"""Redis key names. Every key of one account carries its shard's hash tag.

    <prefix>:{<shard>}:acct:<account_id>                    hash: balance, unflushed, status
    <prefix>:{<shard>}:req:<len(account_id)>:<account_id>:<request_id>   request record
                                                            (format: lua/lib/records.lua)
    <prefix>:{<shard>}:credit:<credit_id>                   credit applied marker
    <prefix>:{<shard>}:usage                                usage stream of the shard
    <prefix>:{<shard>}:topup:<account_id>                   "top-up triggered" flag
    <prefix>:{<shard>}:topups                               top-up trigger stream of the shard
    <prefix>:{<shard>}:lease:<account_id>                   hash: holder -> "<amount>:<expiry ms>"
    <prefix>:{<shard>}:take:<refund:id | expiry:lot:n>      the micros a lot take took
    <prefix>:{<shard>}:capped:<account_id>                  "auto top-up capped for now" flag

The length prefix in request keys keeps ("a:b", "c") and ("a", "b:c") apart:
ids may contain ':' and a collision would replay another account's decision.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from balance_gate.constants import SHARD_COUNT
from balance_gate.validation import normalized_capabilities


def shard_of(account_id: str) -> int:
    return zlib.crc32(account_id.encode("utf-8")) % SHARD_COUNT


@dataclass(frozen=True, slots=True)
class HotKeys:
    """The keys the hot path touches for one account, built once per account."""

    account: str
    request_prefix: str  # + request_id
    usage_stream: str
    top_up_flag: str
    top_up_stream: str
    leases: str
    capped_flag: str

    def for_request(self, request_id: str) -> tuple[str, str, str, str, str, str, str]:
        """KEYS of the authorize and settle scripts, in their order."""
        return (
            self.account,
            self.request_prefix + request_id,
            self.usage_stream,
            self.top_up_flag,
            self.top_up_stream,
            self.leases,
            self.capped_flag,
        )


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str

    def hot(self, account_id: str) -> HotKeys:
        return _hot_keys(self, account_id)

    def shard_tag(self, shard: int) -> str:
        return f"{self.prefix}:{{{shard}}}"

    def account(self, account_id: str) -> str:
        return f"{self.prefix}:{{{shard_of(account_id)}}}:acct:{account_id}"

    def request(self, account_id: str, request_id: str) -> str:
        return (
            f"{self.prefix}:{{{shard_of(account_id)}}}:req:"
            f"{len(account_id)}:{account_id}:{request_id}"
        )

    def credit_marker(self, account_id: str, credit_id: int) -> str:
        return f"{self.prefix}:{{{shard_of(account_id)}}}:credit:{credit_id}"

    def leases(self, account_id: str) -> str:
        return f"{self.prefix}:{{{shard_of(account_id)}}}:lease:{account_id}"

    def take_marker(self, account_id: str, marker: str) -> str:
        return f"{self.prefix}:{{{shard_of(account_id)}}}:take:{marker}"

    def top_up_flag(self, account_id: str) -> str:
        return f"{self.prefix}:{{{shard_of(account_id)}}}:topup:{account_id}"

    def capped_flag(self, account_id: str) -> str:
        return f"{self.prefix}:{{{shard_of(account_id)}}}:capped:{account_id}"

    def top_up_stream(self, shard: int) -> str:
        return f"{self.prefix}:{{{shard}}}:topups"

    def all_top_up_streams(self) -> list[str]:
        return [self.top_up_stream(shard) for shard in range(SHARD_COUNT)]

    def usage_stream(self, shard: int) -> str:
        return f"{self.prefix}:{{{shard}}}:usage"

    def all_usage_streams(self) -> list[str]:
        return [self.usage_stream(shard) for shard in range(SHARD_COUNT)]

    def account_pattern(self) -> str:
        """SCAN pattern matching every account hash."""
        return f"{self.prefix}:{{*}}:acct:*"


@functools.lru_cache(maxsize=65_536)
def _hot_keys(keys: Keys, account_id: str) -> HotKeys:
    """Keys.hot: the same names as the methods give, built once per account."""
    shard = shard_of(account_id)
    return HotKeys(
        account=keys.account(account_id),
        request_prefix=keys.request(account_id, ""),
        usage_stream=keys.usage_stream(shard),
        top_up_flag=keys.top_up_flag(account_id),
        top_up_stream=keys.top_up_stream(shard),
        leases=keys.leases(account_id),
        capped_flag=keys.capped_flag(account_id),
    )


def credit_line_fields(
    limit_micros: int, share_pct: int, capabilities: Sequence[str], rate_per_s: int
) -> dict[str, str]:
    """How a credit line lives in the account hash: its floor (C1) and stop-loss (C4).

    '' removes a field (no stop-loss without a limit). sl_at: the balance at
    and below which the stop-loss acts; sl_caps: "|cap|cap|", names normalized
    here (lines stored before normalization are normalized when loaded);
    sl_rate: per second.
    """
    if limit_micros == 0:
        return {"floor": "0", "sl_at": "", "sl_caps": "", "sl_rate": ""}
    names = normalized_capabilities(capabilities)
    return {
        "floor": str(-limit_micros),
        "sl_at": str(-(limit_micros * share_pct // 100)),
        "sl_caps": "|" + "|".join(names) + "|" if names else "",
        "sl_rate": str(rate_per_s) if rate_per_s else "",
    }
