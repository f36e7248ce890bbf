#!/usr/bin/env bash
# Installs the servers `make test-cluster` needs from Debian packages, only when they are missing:
# Redis (the Celery broker) and PostgreSQL (Airflow's metadata database). Needs root (CI runs as root);
# does nothing when both are already there. The test starts its own instances, never the system services.
set -euo pipefail

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
# initdb is not on PATH in Debian's layout (it lives in /usr/lib/postgresql/<major>/bin).
if ! command -v initdb >/dev/null 2>&1 && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    missing+=(postgresql)
fi
if ((${#missing[@]} == 0)); then
    echo "cluster packages: redis-server and postgresql already installed"
    exit 0
fi
if ((EUID != 0)); then
    echo "cluster packages: ${missing[*]} missing; run as root or install them yourself (apt-get install ${missing[*]})" >&2
    exit 1
fi
echo "cluster packages: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# policy-rc.d keeps the packages from starting the system-wide services: the test runs its own.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    created_policy=1
fi
trap 'if ((created_policy)); then rm -f "$policy"; fi' EXIT
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "cluster packages: installed ${missing[*]}"
