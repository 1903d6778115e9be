#!/usr/bin/env bash
# A throwaway PostgreSQL from Debian's packages for the registry's tests.
#   scripts/postgres.sh start   → prints "DIR URL" of a fresh server on 127.0.0.1
#   scripts/postgres.sh stop DIR
set -euo pipefail
port="${SWITCHYARD_PG_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
# PostgreSQL refuses to run as root; run it as its own user then.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

case "${1:-}" in
start)
  if [ -z "$(pg_bin)" ]; then
    echo "installing postgresql (Debian package)" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
  fi
  bin="$(pg_bin)"
  dir="$(mktemp -d /tmp/switchyard-pg.XXXXXX)"
  [ "$(id -u)" = 0 ] && chown postgres "$dir"
  as_pg "$bin/initdb" -D "$dir/data" -A trust -U postgres >"$dir/initdb.log"
  as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=300" start >&2
  echo "$dir postgres://postgres@127.0.0.1:$port/postgres"
  ;;
stop)
  as_pg "$(pg_bin)/pg_ctl" -D "$2/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$2"
  ;;
*)
  echo "usage: $0 start | stop DIR" >&2
  exit 2
  ;;
esac
