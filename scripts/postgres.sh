#!/usr/bin/env bash
# A throwaway PostgreSQL from Debian's packages for the registry's tests.
#   scripts/postgres.sh start   → prints "DIR URL CA" of a fresh server on
#                                 127.0.0.1 that also takes TLS (sslmode=require),
#                                 its certificate signed by the test CA in CA
#   scripts/postgres.sh stop DIR
#   scripts/postgres.sh installed → whether Debian's postgresql is installed
set -euo pipefail
port="${SWITCHYARD_PG_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
# PostgreSQL refuses to run as root; run it as its own user then.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

case "${1:-}" in
installed)
  [ -n "$(pg_bin)" ]
  ;;
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
  # A throwaway CA and a server certificate for 127.0.0.1, for the TLS tests.
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=switchyard test CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" \
    -keyout "$dir/data/server.key" -out "$dir/server.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$dir/ext"
  openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 2 -extfile "$dir/ext" -out "$dir/data/server.crt" 2>/dev/null
  chmod 600 "$dir/data/server.key"
  [ "$(id -u)" = 0 ] && chown postgres "$dir/data/server.key" "$dir/data/server.crt"
  as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=300 -c ssl=on" start >&2
  echo "$dir postgres://postgres@127.0.0.1:$port/postgres $dir/ca.crt"
  ;;
stop)
  as_pg "$(pg_bin)/pg_ctl" -D "$2/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$2"
  ;;
*)
  echo "usage: $0 start | stop DIR | installed" >&2
  exit 2
  ;;
esac
