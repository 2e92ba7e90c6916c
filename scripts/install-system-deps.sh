#!/usr/bin/env bash
# Find, or install with apt-get (when root), what balance-gate needs from the OS:
# Python >= 3.11 with venv, redis-server, the PostgreSQL server binaries, and for
# the tests nginx and Prometheus (promtool and prometheus, for deploy/prometheus).
set -euo pipefail

PYTHON=${PYTHON:-python3}
missing=()

if ! command -v "$PYTHON" >/dev/null; then
    missing+=(python3 python3-venv)
elif ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "balance-gate needs Python >= 3.11; $PYTHON is $("$PYTHON" --version 2>&1)." >&2
    echo "Install a newer Python and run: make PYTHON=/path/to/python3.11 ..." >&2
    exit 1
elif ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    missing+=(python3-venv)
fi

command -v redis-server >/dev/null || missing+=(redis-server)
{ command -v promtool >/dev/null && command -v prometheus >/dev/null; } || missing+=(prometheus)

if ! { command -v initdb >/dev/null && command -v postgres >/dev/null; } \
    && ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
    missing+=(postgresql)
fi

# The tests run a real nginx in front of the gate (auth_request); it is never served.
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)

[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "Missing system packages: ${missing[*]}" >&2
    echo "Install them (e.g. sudo apt-get install ${missing[*]}) and run make again." >&2
    exit 1
fi

echo "Installing system packages: ${missing[*]}"
# balance-gate runs its own Postgres clusters; don't let the package create one
# (postgresql-common reads this drop-in directory, present or not yet installed).
if [[ " ${missing[*]} " == *" postgresql "* ]]; then
    mkdir -p /etc/postgresql-common/createcluster.d
    echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/balance-gate.conf
fi
# The tests start their own servers on free ports: no package may start its
# service (Debian's prometheus would listen on :9090) while it is installed.
# policy-rc.d answering 101 tells invoke-rc.d and deb-systemd-invoke so.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod +x "$policy"
    trap 'rm -f "$policy"' EXIT
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The tests start nginx themselves, on free ports: the package's own service, which
# would take port 80, stays off.
if [[ " ${missing[*]} " == *" nginx "* ]] && command -v systemctl >/dev/null; then
    systemctl disable --now nginx >/dev/null 2>&1 || true
fi
echo "Installed: ${missing[*]}"
