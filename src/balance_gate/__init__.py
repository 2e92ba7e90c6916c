"""balance-gate: authorizes proxied requests against a prepaid balance.

Hot balances live in Redis (one Lua script per decision); Postgres is the
system of record. See docs/architecture.md for the module map.
"""

__version__ = "0.1.0"
