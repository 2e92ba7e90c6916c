"""Redis key names. Every key of one account carries its shard's hash tag.

    <prefix>:{<shard>}:acct:<account_id>                    hash: balance, unflushed, status
    <prefix>:{<shard>}:req:<len(account_id)>:<account_id>:<request_id>   request record
    <prefix>:{<shard>}:credit:<credit_id>                   credit applied marker
    <prefix>:{<shard>}:usage                                usage stream of the shard
    <prefix>:{<shard>}:topup:<account_id>                   "top-up triggered" flag
    <prefix>:{<shard>}:topups                               top-up trigger stream of the shard

The length prefix in request keys keeps ("a:b", "c") and ("a", "b:c") apart:
ids may contain ':' and a collision would replay another account's decision.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from balance_gate.constants import SHARD_COUNT


def shard_of(account_id: str) -> int:
    return zlib.crc32(account_id.encode("utf-8")) % SHARD_COUNT


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str

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

    def top_up_flag(self, account_id: str) -> str:
        return f"{self.prefix}:{{{shard_of(account_id)}}}:topup:{account_id}"

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
