#!/usr/bin/env bash
# Makes sure the test suite's services are reachable: Redis and PostgreSQL on loopback
# (REDIS_URL / PGHOST / PGPORT override), redis-server and initdb binaries for the fault
# tests' private instances, and Debian's chromium for the browser tests.
# Starts what is installed but stopped; installs what is missing when run as root on
# Debian; otherwise stops with the command that fixes it.
set -uo pipefail

REDIS_HOST=127.0.0.1
REDIS_PORT=6379
PGHOST=${PGHOST:-127.0.0.1}
PGPORT=${PGPORT:-5432}
PGUSER=${PGUSER:-postgres}

fail() { echo "ensure_services: $*" >&2; exit 1; }

can_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; }

need_package() {  # binary, debian package
  command -v "$1" >/dev/null && return 0
  if can_apt; then
    echo "ensure_services: installing $2 (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2" >/dev/null || fail "apt-get install -y $2 failed"
  else
    fail "'$1' is missing. Install it: sudo apt-get install -y $2"
  fi
}

redis_up() { redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; }
pg_up() { pg_isready -q -h "$PGHOST" -p "$PGPORT" -U "$PGUSER"; }

need_package redis-server redis-server
need_package redis-cli redis-tools
need_package pg_isready postgresql-client
need_package chromium chromium

if [ -n "${REDIS_URL:-}" ]; then
  hostport=${REDIS_URL#*://}; hostport=${hostport%%/*}; hostport=${hostport##*@}
  REDIS_HOST=${hostport%%:*}; REDIS_PORT=${hostport##*:}
  [ "$REDIS_PORT" = "$hostport" ] && REDIS_PORT=6379
fi
if ! redis_up; then
  echo "ensure_services: starting redis-server on $REDIS_HOST:$REDIS_PORT"
  mkdir -p /tmp/channel_registry-redis
  redis-server --daemonize yes --bind "$REDIS_HOST" --port "$REDIS_PORT" --save "" --appendonly no \
    --dir /tmp/channel_registry-redis --logfile /tmp/channel_registry-redis/redis.log >/dev/null
  for _ in $(seq 50); do redis_up && break; sleep 0.1; done
  redis_up || fail "Redis is not reachable on $REDIS_HOST:$REDIS_PORT and could not be started (see /tmp/channel_registry-redis/redis.log)."
fi

if ! pg_up; then
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    can_apt || fail "PostgreSQL is not reachable on $PGHOST:$PGPORT. Install it: sudo apt-get install -y postgresql, and allow trust auth for user $PGUSER on 127.0.0.1 (or set PGHOST/PGPORT/PGUSER)."
    echo "ensure_services: installing postgresql (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null || fail "apt-get install -y postgresql failed"
  fi
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  echo "ensure_services: starting PostgreSQL $version"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null || true
  for _ in $(seq 100); do pg_up && break; sleep 0.1; done
  pg_up || fail "PostgreSQL is not reachable on $PGHOST:$PGPORT; start it: pg_ctlcluster $version main start"
fi
psql -h "$PGHOST" -p "$PGPORT" -U "$PGUSER" -d postgres -Atc 'select 1' >/dev/null 2>&1 \
  || fail "PostgreSQL on $PGHOST:$PGPORT refuses user '$PGUSER' without a password: set PGUSER/PGPASSWORD, or add 'host all all 127.0.0.1/32 trust' to pg_hba.conf."

# The fault tests start private PostgreSQL clusters with initdb/pg_ctl.
if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  fail "initdb is missing (needed for private PostgreSQL instances in the fault tests): sudo apt-get install -y postgresql"
fi
echo "ensure_services: Redis $REDIS_HOST:$REDIS_PORT and PostgreSQL $PGHOST:$PGPORT are up; chromium at $(command -v chromium)"
