"""connection_limits: the grpc options it sets, and the descriptor limit it reserves."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

from balance_gate.connection_limits import ConnectionLimits, grpc_options
from balance_gate.settings import Settings


def _limits(**changes: int) -> ConnectionLimits:
    return dataclasses.replace(ConnectionLimits.from_settings(Settings()), **changes)


def test_grpc_options_bound_handshake_idle_and_count() -> None:
    options = dict(grpc_options(_limits(max_connections=7, handshake_timeout_ms=1_500)))
    assert options["grpc.max_allowed_incoming_connections"] == 7
    assert options["grpc.server_handshake_timeout_ms"] == 1_500
    assert options["grpc.max_connection_idle_ms"] == Settings().connection_idle_timeout_ms
    assert "grpc.max_connection_age_ms" not in options  # 0: off, not "at once"
    aged = dict(grpc_options(_limits(max_age_ms=60_000, max_age_grace_ms=5_000)))
    assert aged["grpc.max_connection_age_ms"] == 60_000
    assert aged["grpc.max_connection_age_grace_ms"] == 5_000


def _reserve_in_child(
    soft: int, hard: int, max_connections: int
) -> subprocess.CompletedProcess[str]:
    """reserve_descriptors for 3 listeners in a child whose limits start at (soft, hard)."""
    script = textwrap.dedent(
        f"""
        import dataclasses, logging, resource
        from balance_gate.connection_limits import ConnectionLimits, reserve_descriptors
        from balance_gate.settings import Settings
        logging.basicConfig(level=logging.WARNING)
        resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))
        limits = dataclasses.replace(
            ConnectionLimits.from_settings(Settings()), max_connections={max_connections}
        )
        reserve_descriptors(limits, 3)
        print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        """
    )
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


def test_soft_descriptor_limit_is_raised_to_fit_every_listener_at_its_cap() -> None:
    child = _reserve_in_child(soft=256, hard=4_000, max_connections=500)
    assert int(child.stdout) == 3 * 500 + 1_024
    assert child.stderr == ""


def test_a_hard_limit_too_low_for_the_caps_is_named_in_a_warning() -> None:
    child = _reserve_in_child(soft=256, hard=2_000, max_connections=1_000)
    assert int(child.stdout) == 2_000
    assert "BALANCE_GATE_MAX_CONNECTIONS=1000" in child.stderr
