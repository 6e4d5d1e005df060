#!/usr/bin/env bash
# A throwaway PostgreSQL server on loopback for the multi-worker tests (Debian's postgresql package).
#   .ci/postgres.sh start DIR   -> prints the URL (postgresql://autocomp:autocomp@127.0.0.1:PORT/autocomp)
#   .ci/postgres.sh stop DIR
set -euo pipefail
cmd=${1:?start|stop}; dir=${2:?data folder}; port=${PGPORT_TEST:-55432}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
case "$cmd" in
start)
  if [ -z "$bin" ]; then
    if [ "$(id -u)" = 0 ]; then apt-get install -y -q postgresql >/dev/null; else sudo apt-get install -y -q postgresql >/dev/null; fi
    bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  fi
  mkdir -p "$dir"; [ "$(id -u)" = 0 ] && chown postgres "$dir"
  if [ ! -f "$dir/PG_VERSION" ]; then
    as_pg "$bin/initdb" -D "$dir" -U postgres -A trust >/dev/null
  fi
  as_pg "$bin/pg_ctl" -D "$dir" -l "$dir/server.log" -w -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null
  as_pg "$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -qtc "CREATE USER autocomp PASSWORD 'autocomp'" postgres >/dev/null 2>&1 || true
  as_pg "$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -qtc "CREATE DATABASE autocomp OWNER autocomp" postgres >/dev/null 2>&1 || true
  echo "postgresql://autocomp:autocomp@127.0.0.1:$port/autocomp"
  ;;
stop)
  [ -f "$dir/postmaster.pid" ] && as_pg "$bin/pg_ctl" -D "$dir" -m fast stop >/dev/null || true
  ;;
esac
