#!/usr/bin/env bash
# Runs the notify-outbox example: a throwaway PostgreSQL (initdb into a temporary directory, on a
# free port), holdfast on :8000 reading its outbox table, and the FastAPI backend on :8080.
# Send alice something, then open http://127.0.0.1:8080/?user=alice:
#   curl -X POST localhost:8080/api/notify/alice -H 'content-type: application/json' -d '{"text":"hi"}'
#   curl -X POST localhost:8080/api/notify/alice -H 'content-type: application/json' -d '{"text":"no","fail":true}'
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
pg="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"   # Debian's postgresql package
tmp="$(mktemp -d)"
# PostgreSQL refuses to run as root: then it runs as the postgres user.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" != 0 ] || chown postgres "$tmp"
trap 'as_pg "$pg/pg_ctl" -D "$tmp/pg" -m fast -w stop >/dev/null; rm -rf "$tmp"' EXIT
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
as_pg "$pg/initdb" -D "$tmp/pg" -U postgres --auth=trust -E UTF8 >/dev/null
as_pg "$pg/pg_ctl" -D "$tmp/pg" -l "$tmp/pg.log" -o "-p $port -k $tmp -c listen_addresses=127.0.0.1" -w start >/dev/null
export DATABASE_URL="postgresql://postgres@127.0.0.1:$port/postgres"
# The outbox table before holdfast starts (the backend creates it too, with its own table).
"$pg/psql" -q -d "$DATABASE_URL" -c 'SET client_min_messages = warning' -f "$here/../../deploy/postgresql/outbox.sql"
# Holdfast reads that database; its history goes to a fresh directory, as the database is new.
sed "s|^dsn = .*|dsn = \"$DATABASE_URL\"|" "$here/config.toml" >"$tmp/config.toml"
EXAMPLE_CONFIG="$tmp/config.toml" HOLDFAST_ENGINE_DISK_PATH="$tmp/holdfast-data" "$here/../serve.sh" notify-outbox
