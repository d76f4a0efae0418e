#!/usr/bin/env bash
# Make sure this machine can run pgrouter's demo, tests and benchmark: they start throwaway
# PostgreSQL servers, so they need the server binaries (initdb, pg_ctl, pg_basebackup,
# postgres), psql and pgbench. Installs them with apt when root on Debian/Ubuntu; otherwise
# prints what to install and exits 1. Run by `make install`; safe to run again.
set -euo pipefail

NEED=(initdb pg_ctl pg_basebackup postgres psql pgbench)

# Same search order as router.cluster.find_pg_bindir().
find_bindir() {
    local dir candidates=()
    if [[ -n "${PG_BINDIR:-}" ]]; then
        candidates+=("$PG_BINDIR")
    fi
    if command -v pg_config >/dev/null 2>&1; then
        candidates+=("$(pg_config --bindir 2>/dev/null || true)")
    fi
    while IFS= read -r dir; do
        candidates+=("$dir")
    done < <(printf '%s\n' /usr/lib/postgresql/*/bin | grep -v '\*' | sort -t/ -k5,5 -V -r)
    candidates+=(/usr/local/bin /usr/local/pgsql/bin)
    for dir in "${candidates[@]}"; do
        if [[ -n "$dir" && -x "$dir/initdb" ]]; then
            echo "$dir"
            return 0
        fi
    done
    return 1
}

# Prints the missing programs (nothing when all are there).
missing() {
    local bindir prog
    bindir="$(find_bindir || true)"
    for prog in "${NEED[@]}"; do
        if [[ -n "$bindir" && -x "$bindir/$prog" ]] || command -v "$prog" >/dev/null 2>&1; then
            continue
        fi
        # The PATH only counts for the client tools; the server ones must sit with initdb.
        echo "$prog"
    done
}

explain() {
    cat >&2 <<'MSG'
pgrouter's demo, tests and benchmark need the PostgreSQL server binaries (initdb, pg_ctl,
pg_basebackup, postgres), psql and pgbench. Install them:
    Debian/Ubuntu:  sudo apt-get install postgresql postgresql-contrib
    Fedora/RHEL:    sudo dnf install postgresql-server postgresql-contrib
    macOS:          brew install postgresql@16
or set PG_BINDIR to the directory that holds initdb. Then run `make install` again.
MSG
}

todo="$(missing)"
if [[ -n "$todo" ]]; then
    echo "bootstrap: missing: $(echo "$todo" | tr '\n' ' ')" >&2
    if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "bootstrap: installing PostgreSQL with apt-get" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update
        apt-get install -y --no-install-recommends postgresql postgresql-contrib
        todo="$(missing)"
        if [[ -n "$todo" ]]; then
            echo "bootstrap: still missing after apt-get: $(echo "$todo" | tr '\n' ' ')" >&2
            explain
            exit 1
        fi
    else
        explain
        exit 1
    fi
fi

# As root the servers run as `postgres` (PostgreSQL refuses to run as root). The Debian
# package creates that user; a source build may not have.
if [[ "$(id -u)" -eq 0 ]] && ! id postgres >/dev/null 2>&1; then
    if command -v useradd >/dev/null 2>&1; then
        echo "bootstrap: creating the system user postgres" >&2
        useradd --system --user-group --home-dir /var/lib/postgresql --create-home \
            --shell /bin/bash postgres
    else
        echo "bootstrap: running as root needs an OS user 'postgres'; create it" >&2
        exit 1
    fi
fi

# Prometheus and pgbouncer_exporter: tests/integration/test_dashboard.py runs the machine's
# prometheus binary against a live pgrouter, tests/integration/test_exporter.py the machine's
# prometheus-pgbouncer-exporter against its admin console. Patroni and etcd:
# tests/integration/test_patroni.py starts a three-member Patroni cluster with etcd. Only the
# binaries are needed: Debian's services are not started (a temporary policy-rc.d stops apt
# from starting them). Without root: prometheus, Patroni and etcd are optional (their tests are
# skipped); without the exporter its test fails and says what to install.
have_prometheus() {
    [[ -x /usr/bin/prometheus ]] || command -v prometheus >/dev/null 2>&1
}

have_pgbouncer_exporter() {
    [[ -x /usr/bin/prometheus-pgbouncer-exporter ]] ||
        command -v prometheus-pgbouncer-exporter >/dev/null 2>&1
}

have_command() {
    command -v "$1" >/dev/null 2>&1
}

# The package lists may predate a package (or be empty): update once and retry.
apt_updated=""
apt_install() {
    apt-get install -y --no-install-recommends "$1" && return 0
    [[ -z "$apt_updated" ]] || return 1
    apt_updated=1
    apt-get update && apt-get install -y --no-install-recommends "$1"
}

packages=()
have_prometheus || packages+=(prometheus)
have_pgbouncer_exporter || packages+=(prometheus-pgbouncer-exporter)
have_command patroni || packages+=(patroni)
have_command etcd || packages+=(etcd-server)
if ((${#packages[@]})); then
    if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        if [[ ! -e /usr/sbin/policy-rc.d ]]; then
            printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
            chmod 755 /usr/sbin/policy-rc.d
            trap 'rm -f /usr/sbin/policy-rc.d' EXIT
        fi
        # Not fatal: only the test that needs a package reports the problem.
        for package in "${packages[@]}"; do
            echo "bootstrap: installing $package with apt-get" >&2
            apt_install "$package" ||
                echo "bootstrap: apt-get could not install $package; the test that runs it" \
                    "will fail" >&2
        done
    else
        if ! have_prometheus; then
            echo "bootstrap: prometheus not found; the Grafana dashboard test will be skipped" \
                "(Debian/Ubuntu: sudo apt-get install prometheus)" >&2
        fi
        if ! have_command patroni || ! have_command etcd; then
            echo "bootstrap: patroni or etcd not found; the Patroni HA tests will be skipped" \
                "(Debian/Ubuntu: sudo apt-get install patroni etcd-server)" >&2
        fi
        if ! have_pgbouncer_exporter; then
            echo "bootstrap: prometheus-pgbouncer-exporter not found;" \
                "tests/integration/test_exporter.py will fail" \
                "(Debian/Ubuntu: sudo apt-get install prometheus-pgbouncer-exporter)" >&2
        fi
    fi
fi

bindir="$(find_bindir)"
echo "bootstrap: PostgreSQL $("$bindir/postgres" --version | awk '{print $3}') in $bindir;" \
    "pgbench: $(command -v "$bindir/pgbench" || command -v pgbench)"
