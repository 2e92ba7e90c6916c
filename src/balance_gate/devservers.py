"""Local redis-server and postgres processes, for `make run` and the test fixtures.

Each server listens on 127.0.0.1 only, keeps its data in a directory we own,
and is stopped by us. PostgreSQL refuses to run as root, so when we are root
its processes run as the unprivileged user `nobody`.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

_UNPRIVILEGED_USER = "nobody"
_START_TIMEOUT_S = 30.0


class MissingBinary(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def find_redis_server() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise MissingBinary(
            "redis-server not found on PATH: run `make deps` (apt-get install redis-server)"
        )
    return path


def find_postgres_bindir() -> Path:
    """The directory holding initdb and postgres: PATH first, then Debian's layout."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("postgres"):
        return Path(on_path).resolve().parent
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if not candidates:
        raise MissingBinary(
            "PostgreSQL server binaries not found: run `make deps` (apt-get install postgresql)"
        )
    return candidates[-1].parent


def _wait_until(
    ready: Callable[[], bool], what: str, process: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}; see {log}:\n{_tail(log)}")
        if ready():
            return
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(
        f"{what} did not become ready in {_START_TIMEOUT_S:.0f}s; see {log}:\n{_tail(log)}"
    )


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(process: subprocess.Popen[bytes] | None, signum: int) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signum)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# Servers run in their own session: a Ctrl-C in the terminal reaches only the
# gate, which drains its usage into them before stopping them itself.


class RedisServer:
    def __init__(
        self, data_dir: Path, port: int, *, durable: bool, extra_args: Sequence[str] = ()
    ) -> None:
        self.data_dir = data_dir
        self.port = port
        self.durable = durable
        self.extra_args = tuple(extra_args)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        if port_is_open(self.port):
            raise RuntimeError(f"port {self.port} is already in use; choose another Redis port")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.data_dir / "redis.log"
        args = [
            find_redis_server(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--logfile", str(log),
            "--daemonize", "no",
            # Evicting a balance would be a silent loss of state: refuse writes instead.
            "--maxmemory-policy", "noeviction",
            "--save", "",
            "--appendonly", "yes" if self.durable else "no",
            "--appendfsync", "everysec",
            *self.extra_args,
        ]  # fmt: skip
        self._process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
        )
        _wait_until(self._pings, "redis-server", self._process, log)

    def _pings(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        _stop(self._process, signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: a crash; with AOF on, what was not yet fsynced is lost."""
        _stop(self._process, signal.SIGKILL)


_CLUSTER_ARGS = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")


_CLUSTER_ARGS = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")


class RedisClusterServers:
    """A Redis Cluster of `size` masters (no replicas) on consecutive free ports."""

    def __init__(self, data_dir: Path, size: int = 3) -> None:
        self.nodes = [
            RedisServer(
                data_dir / f"node{i}",
                free_port(),
                durable=False,
                # The bus port defaults to port + 10000: too high for ephemeral ports.
                extra_args=(*_CLUSTER_ARGS, "--cluster-port", str(free_port())),
            )
            for i in range(size)
        ]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        cli = shutil.which("redis-cli") or "redis-cli"
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
        )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not all(self._state_ok(cli, node.port) for node in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.1)

    @staticmethod
    def _state_ok(cli: str, port: int) -> bool:
        info = subprocess.run(
            [cli, "-p", str(port), "CLUSTER", "INFO"], capture_output=True, text=True
        ).stdout
        return "cluster_state:ok" in info

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class PostgresServer:
    """A PostgreSQL cluster in `data_dir`, created by initdb on first start.

    Authentication is `trust` for the `postgres` role on 127.0.0.1: this is a
    server for one developer's machine or one test session, never production.
    """

    def __init__(self, data_dir: Path, port: int, *, durable: bool) -> None:
        self.data_dir = data_dir
        self.port = port
        self.durable = durable
        self.bindir = find_postgres_bindir()
        self._process: subprocess.Popen[bytes] | None = None
        self._user = pwd.getpwnam(_UNPRIVILEGED_USER) if os.geteuid() == 0 else None

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def pid(self) -> int | None:
        """The postmaster's pid; its children are the backends."""
        return None if self._process is None else self._process.pid

    def _as_server_user(self, args: list[str]) -> list[str]:
        """`args`, run as the unprivileged user when we are root.

        setpriv switches users in its own (single-threaded) process. Asking
        subprocess for user=/group= instead makes Python fork() the caller,
        and a fork of a process running gRPC's threads crashed now and then
        (SIGSEGV before exec, seen when a fault test restarted Postgres).
        Without them, subprocess uses vfork and execs at once.
        """
        if self._user is None:
            return args
        return [
            "setpriv",
            f"--reuid={self._user.pw_uid}",
            f"--regid={self._user.pw_gid}",
            "--clear-groups",
            *args,
        ]

    def _prepare_directory(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            # Every ancestor must be traversable by the server's user.
            for parent in self.data_dir.parents:
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    raise RuntimeError(
                        f"{parent} is not traversable by {_UNPRIVILEGED_USER}; postgres cannot"
                        " run there as root's stand-in (chmod o+x it or choose another directory)"
                    )
            os.chown(self.data_dir, self._user.pw_uid, self._user.pw_gid)
        self.data_dir.chmod(0o700)

    def _initdb(self) -> None:
        subprocess.run(
            self._as_server_user([
                str(self.bindir / "initdb"),
                "-D", str(self.data_dir),
                "--username=postgres",
                "--auth=trust",
                "--no-locale",
                "--encoding=UTF8",
                *([] if self.durable else ["--no-sync"]),
            ]),
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip

    def start(self) -> None:
        if port_is_open(self.port):
            raise RuntimeError(f"port {self.port} is already in use; choose another Postgres port")
        self._prepare_directory()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        log = self.data_dir / "postgres.log"
        speed = (
            []
            if self.durable
            else ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        )
        args = self._as_server_user([
            str(self.bindir / "postgres"),
            "-D", str(self.data_dir),
            "-p", str(self.port),
            "-c", "listen_addresses=127.0.0.1",
            "-c", "unix_socket_directories=",
            "-c", "max_connections=200",
            *speed,
        ])  # fmt: skip
        with log.open("ab") as out:
            if self._user is not None:
                os.chown(log, self._user.pw_uid, self._user.pw_gid)
            self._process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_until(self._accepts_connections, "postgres", self._process, log)

    def _accepts_connections(self) -> bool:
        probe = subprocess.run(
            [
                str(self.bindir / "pg_isready"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-q",
            ],
            check=False,
        )
        return probe.returncode == 0

    def ensure_database(self, name: str) -> None:
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"unsafe database name {name!r}")
        psql = [str(self.bindir / "psql"), self.dsn(), "-v", "ON_ERROR_STOP=1", "-tAc"]
        exists = subprocess.run(
            [*psql, f"SELECT 1 FROM pg_database WHERE datname = '{name}'"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        if not exists:
            subprocess.run([*psql, f'CREATE DATABASE "{name}"'], check=True, capture_output=True)

    def stop(self) -> None:
        # SIGINT is PostgreSQL's "fast" shutdown: roll back sessions, checkpoint, exit.
        _stop(self._process, signal.SIGINT)
