#!/usr/bin/env bash
# Runs the demo site with daphne (or uvicorn: SERVER=uvicorn); `make demo` and `make demo-multi`
# call it after creating .venv.
#
#   bash demo_site/run.sh          one daphne process on http://127.0.0.1:$PORT (default 8000).
#                                  Embedded: SQLite + the in-memory channel layer, unless
#                                  DATABASE_URL / REDIS_URL are set.
#   bash demo_site/run.sh multi    two daphne processes, on $PORT and $PORT+1, sharing
#                                  PostgreSQL (DATABASE_URL) and Redis (REDIS_URL). Sign in as
#                                  alice on http://127.0.0.1:$PORT and as bob on
#                                  http://localhost:$((PORT+1)): browsers share cookies
#                                  between ports of one host, not between host names.
#
# Migrates, creates the demo users (idempotent) and prints their password first, and deletes
# stored messages older than DJANGO_INBOX_RETENTION_DAYS (30); a long-running demo should
# also run `manage.py purge_notifications` daily (cron).
set -euo pipefail
cd "$(dirname "$0")/.."

PORT=${PORT:-8000}
SERVER=${SERVER:-daphne}
BIN=.venv/bin
export DJANGO_SETTINGS_MODULE=demo_site.settings

fail() { echo "demo_site/run.sh: $*" >&2; exit 1; }

# No WebSocket message above 64 KiB is read whole (the registry refuses frames above 16 KiB
# anyway; the servers' own defaults are 1 MiB and 16 MiB): see the README's Security section.
case $SERVER in
  daphne) server=("$BIN/daphne" --bind 127.0.0.1 --websocket-max-message-size 65536
                  --websocket-max-frame-size 65536 demo_site.asgi:application --port) ;;
  # Channels' ProtocolTypeRouter has no lifespan handler; uvicorn would say so at every start.
  uvicorn) server=("$BIN/uvicorn" --host 127.0.0.1 --lifespan off --ws-max-size 65536
                   demo_site.asgi:application --port) ;;
  *) fail "unknown SERVER '$SERVER'; use daphne or uvicorn." ;;
esac
[ -x "${server[0]}" ] || fail "${server[0]} is missing; 'make demo' creates the virtualenv and installs it."
mode=${1:-single}
case $mode in
  single) ;;
  multi)
    [ -n "${REDIS_URL:-}" ] && [ -n "${DATABASE_URL:-}" ] || fail "multi needs REDIS_URL and DATABASE_URL: \
processes share nothing through SQLite's file and the in-memory layer. Example:
  REDIS_URL=redis://127.0.0.1:6379 DATABASE_URL=postgres://postgres@127.0.0.1:5432/demo make demo-multi"
    ;;
  *) fail "unknown mode '$mode'; use no argument or 'multi'." ;;
esac

"$BIN/python" demo_site/manage.py migrate --no-input --verbosity 0
"$BIN/python" demo_site/manage.py demo_users
"$BIN/python" demo_site/manage.py purge_notifications

announce() { echo "demo: $SERVER serving on http://127.0.0.1:$1/ (Ctrl-C stops)"; }

if [ "$mode" = single ]; then
  announce "$PORT"
  exec "${server[@]}" "$PORT"
fi

announce "$PORT"; "${server[@]}" "$PORT" & first=$!
announce "$((PORT + 1))"; "${server[@]}" "$((PORT + 1))" & second=$!
# Ctrl-C or either process ending stops both; each deletes its registry rows on exit.
trap 'kill "$first" "$second" 2>/dev/null; wait' EXIT INT TERM
wait -n
