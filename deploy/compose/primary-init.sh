#!/bin/bash
# Runs once in the `primary` service, when the postgres image creates its data directory
# (mounted into /docker-entrypoint-initdb.d by docker-compose.yml). Creates:
#   - $REPLICATION_USER, a REPLICATION role the replicas clone and stream with, and the
#     pg_hba.conf line letting it connect over the compose network;
#   - $APP_USER and $APP_DB (owned by it): the user and database pgrouter serves.
# Values come from the service's environment; psql variables keep them properly quoted.
set -euo pipefail

psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname "${POSTGRES_DB:-postgres}" \
    -v repl_user="$REPLICATION_USER" -v repl_password="$REPLICATION_PASSWORD" \
    -v app_user="$APP_USER" -v app_password="$APP_PASSWORD" -v app_db="$APP_DB" <<'SQL'
CREATE ROLE :"repl_user" WITH LOGIN REPLICATION PASSWORD :'repl_password';
CREATE ROLE :"app_user" WITH LOGIN PASSWORD :'app_password';
CREATE DATABASE :"app_db" OWNER :"app_user";
SQL

# The image's pg_hba.conf lets every user reach every database over the network, but a
# replication connection matches only lines whose database field is `replication`.
echo "host replication ${REPLICATION_USER} all scram-sha-256" >>"$PGDATA/pg_hba.conf"
