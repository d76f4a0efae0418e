#!/bin/bash
# Entrypoint of the replica services in docker-compose.yml (postgres image, started as root).
#
# First start (empty $PGDATA): clone the primary with pg_basebackup, retrying until it answers,
# and let -R (--write-recovery-conf) write standby.signal and primary_conninfo. Every start:
# run the server command given as arguments ("postgres -c ...") as the postgres user, so the
# node comes up as a hot standby streaming from the primary.
set -euo pipefail

: "${PGDATA:=/var/lib/postgresql/data}"
: "${PRIMARY_HOST:=primary}"
: "${PRIMARY_PORT:=5432}"
: "${REPLICA_NAME:=$(hostname)}"
# libpq reads the password from here, for pg_basebackup and later for the WAL receiver.
export PGPASSWORD="${REPLICATION_PASSWORD:?REPLICATION_PASSWORD must be set}"

as_postgres() {
    if [ "$(id -u)" = 0 ]; then gosu postgres "$@"; else "$@"; fi
}

if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA"
    chown postgres:postgres "$PGDATA"
    chmod 0700 "$PGDATA"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    echo "${REPLICA_NAME}: cloning ${PRIMARY_HOST}:${PRIMARY_PORT} into ${PGDATA}"
    until as_postgres pg_basebackup \
        --dbname="host=${PRIMARY_HOST} port=${PRIMARY_PORT} user=${REPLICATION_USER:?} application_name=${REPLICA_NAME}" \
        --pgdata="$PGDATA" --write-recovery-conf --wal-method=stream --checkpoint=fast; do
        echo "${REPLICA_NAME}: pg_basebackup failed, retrying in 2s" >&2
        find "$PGDATA" -mindepth 1 -delete
        sleep 2
    done
fi

if [ "$(id -u)" = 0 ]; then
    exec gosu postgres "$@"
fi
exec "$@"
