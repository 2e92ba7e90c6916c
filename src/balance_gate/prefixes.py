"""Account id prefix lists, as settings give them: "acme-,beta-", or "*" for every account."""

from __future__ import annotations

from dataclasses import dataclass

WILDCARD = "*"


@dataclass(frozen=True, slots=True)
class AccountPrefixes:
    prefixes: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> AccountPrefixes:
        return cls(tuple(p.strip() for p in text.split(",") if p.strip()))

    def __bool__(self) -> bool:
        return bool(self.prefixes)

    def covers(self, account_id: str) -> bool:
        return WILDCARD in self.prefixes or account_id.startswith(self.prefixes)


NO_ACCOUNTS = AccountPrefixes()
