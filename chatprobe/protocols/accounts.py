"""Pre-registered customer accounts, shared round-robin (for platforms without anonymous
visitors, e.g. XMPP and Matrix): config ``extra.customers: {prefix, count, password}``."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from chatprobe.errors import HarnessError


@dataclass
class AccountPool:
    prefix: str
    count: int
    password: str
    _taken: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @classmethod
    def from_extra(cls, extra: dict[str, Any], protocol: str) -> AccountPool:
        customers = extra.get("customers")
        if not isinstance(customers, dict) or not isinstance(customers.get("password"), str):
            raise HarnessError(f"{protocol} target config needs extra.customers: "
                               "{prefix, count, password} (pre-registered accounts)")
        count = customers.get("count", 1)
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise HarnessError("extra.customers.count must be a positive integer")
        return cls(str(customers.get("prefix", "customer")), count, customers["password"])

    def take(self) -> tuple[int, str]:
        """(connection number, account user). A swarm opens far more conversations than
        there are accounts, so accounts are reused round-robin."""
        number = next(self._taken)
        return number, f"{self.prefix}{(number - 1) % self.count + 1}"
