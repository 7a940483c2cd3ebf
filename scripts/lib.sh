# Helpers for scripts/test. Sourced, not run.
#
# Layout: phase bookkeeping (phase, end_phase, print_summary); small utilities (free_port,
# wait_http, ensure_package); one start_X/stop_X pair per service the tests need (PostgreSQL,
# Redis, the demo gateway); on_exit, the one EXIT trap, which stops whatever was started and
# prints the summary. A stop_X is a no-op when X was never started, so on_exit can call them all.

# --- phases and the summary -------------------------------------------------------------------

timings=()
current_phase=""
phase_started=$(date +%s)
script_started=$(date +%s)

phase() {
  current_phase=$1
  phase_started=$(date +%s)
  echo
  echo "==> $1"
}

end_phase() {
  timings+=("$(printf '  %-60s %5d s' "$current_phase" $(( $(date +%s) - phase_started )))")
  current_phase=""
}

print_summary() {
  local status=$1
  echo
  echo "==> summary"
  if [ ${#timings[@]} -gt 0 ]; then
    printf '%s\n' "${timings[@]}"
  fi
  if [ "$status" -eq 0 ]; then
    echo "all tests passed in $(( $(date +%s) - script_started )) s"
  else
    echo "FAILED (exit $status) in phase: ${current_phase:-after the last phase}, after $(( $(date +%s) - script_started )) s"
  fi
}

# The one EXIT trap: stop every service (each stop is a no-op if it was not started), then print
# the phase timings. Keeps the script's exit status.
on_exit() {
  local status=$?
  set +e
  if [ "$status" -ne 0 ]; then
    show_demo_gateway_log
  fi
  stop_demo_gateway
  stop_redis
  stop_postgres
  print_summary "$status"
  exit "$status"
}

# --- utilities --------------------------------------------------------------------------------

# A free loopback TCP port.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# Waits up to 30 s for a URL to answer 200.
wait_http() {
  for _ in $(seq 1 300); do
    if python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' "$1" 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  echo "no answer from $1" >&2
  return 1
}

# Installs a Debian package if the command it provides is missing.
ensure_package() {
  local command_name=$1 package=$2
  if ! command -v "$command_name" >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/"$command_name" >/dev/null 2>&1; then
    echo "installing $package"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "$package" >/dev/null
  fi
}

# A Python venv with pinned packages, rebuilt when the pins change: by default .venv with the
# SDKs (tests/sdk/requirements.txt). The browser test has its own, .venv/browser (inside .venv,
# so the one .gitignore line covers it), so that neither set of pins constrains the other.
ensure_venv() {
  local venv=${1:-.venv} requirements=${2:-tests/sdk/requirements.txt}
  if [ ! -x "$venv/bin/python" ] || ! cmp -s "$requirements" "$venv/requirements.txt"; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
    cp "$requirements" "$venv/requirements.txt"
  fi
}

# --- PostgreSQL -------------------------------------------------------------------------------

# The directory of PostgreSQL's server binaries (initdb, pg_ctl).
postgres_bin() {
  local initdb
  initdb=$(ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1)
  dirname "$initdb"
}

# Starts a throwaway PostgreSQL on a free loopback port, as user postgres, in a fresh directory
# of its own; exports TOLLGATE_TEST_POSTGRES_URL. Stop it with stop_postgres.
start_postgres() {
  local root port bin
  ensure_package initdb postgresql
  bin=$(postgres_bin)
  port=$(free_port)
  root=$(mktemp -d /tmp/tollgate-postgres.XXXXXX)
  chown postgres "$root"
  # Set before starting, so that a failed start is still cleaned up by stop_postgres.
  POSTGRES_ROOT=$root
  su postgres -s /bin/sh -c "'$bin/initdb' -D '$root/data' -A trust -U postgres --no-sync" >/dev/null
  su postgres -s /bin/sh -c "'$bin/pg_ctl' -D '$root/data' -l '$root/postgres.log' -w -o \"-p $port -k '$root' -c listen_addresses=127.0.0.1 -c max_connections=300\" start" >/dev/null
  export TOLLGATE_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$port/postgres"
  echo "PostgreSQL on 127.0.0.1:$port"
}

stop_postgres() {
  if [ -n "${POSTGRES_ROOT:-}" ]; then
    su postgres -s /bin/sh -c "'$(postgres_bin)/pg_ctl' -D '$POSTGRES_ROOT/data' -m fast stop" >/dev/null 2>&1 || true
    rm -rf "$POSTGRES_ROOT"
    POSTGRES_ROOT=""
  fi
}

# --- the demo gateway the SDK tests run against -----------------------------------------------

SDK_DEMO_KEY="tg_sdk_test_key_0123456789abcdef"
SDK_ADMIN_TOKEN="sdk-admin-token-0123456789abcdef0"

# Starts `target/release/tollgate serve --demo` on a free loopback port with a fresh SQLite
# ledger in its own directory; waits until it is up (/healthz) and can charge (/readyz);
# exports TOLLGATE_URL, TOLLGATE_KEY and TOLLGATE_ADMIN_TOKEN for the SDK tests.
start_demo_gateway() {
  local port
  port=$(free_port)
  DEMO_ROOT=$(mktemp -d /tmp/tollgate-sdk.XXXXXX)
  # Embedded by default; DEMO_DATABASE_URL and DEMO_REDIS_URL put the demo in services mode.
  TOLLGATE_DATABASE_URL="${DEMO_DATABASE_URL:-sqlite://$DEMO_ROOT/sdk.db}" \
  TOLLGATE_DEMO_KEY="$SDK_DEMO_KEY" \
  TOLLGATE_ADMIN_TOKEN="$SDK_ADMIN_TOKEN" \
  TOLLGATE_REDIS_URL="${DEMO_REDIS_URL:-}" \
  TOLLGATE_REDIS_PREFIX="sdk$$" \
  RUST_LOG="${RUST_LOG:-warn}" \
    target/release/tollgate serve --demo --listen "127.0.0.1:$port" > "$DEMO_ROOT/gateway.log" 2>&1 &
  DEMO_PID=$!
  wait_http "http://127.0.0.1:$port/healthz"
  wait_http "http://127.0.0.1:$port/readyz"
  export TOLLGATE_URL="http://127.0.0.1:$port"
  export TOLLGATE_KEY="$SDK_DEMO_KEY"
  export TOLLGATE_ADMIN_TOKEN="$SDK_ADMIN_TOKEN"
  echo "demo gateway (pid $DEMO_PID) on $TOLLGATE_URL"
}

# After traffic and one reconciliation run, every metric the dashboard and the alert rules name
# is in the demo gateway's /metrics (scripts/check-observability exported).
check_demo_metrics() {
  curl -fsS -X POST -H "Authorization: Bearer $TOLLGATE_ADMIN_TOKEN" -H 'Content-Type: application/json' \
    -d '{"fix": false}' "$TOLLGATE_URL/internal/reconcile" > /dev/null
  scripts/check-observability exported "$TOLLGATE_URL/metrics"
}

# The demo gateway serves the committed OpenAPI description (docs/openapi.json), byte for byte.
check_demo_openapi() {
  if ! curl -fsS "$TOLLGATE_URL/openapi.json" | cmp -s - docs/openapi.json; then
    echo "the served /openapi.json differs from docs/openapi.json: run 'target/release/tollgate openapi > docs/openapi.json'" >&2
    return 1
  fi
  echo "served /openapi.json = docs/openapi.json"
}

# The last lines of the demo gateway's log, if it ran (called on failure).
show_demo_gateway_log() {
  if [ -n "${DEMO_ROOT:-}" ] && [ -s "$DEMO_ROOT/gateway.log" ]; then
    echo
    echo "==> last lines of the demo gateway's log"
    tail -n 40 "$DEMO_ROOT/gateway.log"
  fi
}

# SIGTERM (the gateway drains and exits), then SIGKILL if it is still there after 10 s.
stop_demo_gateway() {
  if [ -n "${DEMO_PID:-}" ]; then
    kill "$DEMO_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do
      kill -0 "$DEMO_PID" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$DEMO_PID" 2>/dev/null || true
    wait "$DEMO_PID" 2>/dev/null || true
    DEMO_PID=""
  fi
  if [ -n "${DEMO_ROOT:-}" ]; then
    rm -rf "$DEMO_ROOT"
    DEMO_ROOT=""
  fi
}

# --- Redis (single node and Cluster) ----------------------------------------------------------

# Starts a throwaway Redis (AOF on, as in production) on a free loopback port; exports
# TOLLGATE_TEST_REDIS_URL. Stop it with stop_redis.
start_redis() {
  local port
  ensure_package redis-server redis-server
  port=$(free_port)
  REDIS_ROOT=$(mktemp -d /tmp/tollgate-redis.XXXXXX)
  redis-server --port "$port" --bind 127.0.0.1 --dir "$REDIS_ROOT" --appendonly yes --appendfsync everysec \
    --save '' --maxmemory-policy noeviction --daemonize yes --pidfile "$REDIS_ROOT/redis.pid" --logfile "$REDIS_ROOT/redis.log"
  wait_redis "$port"
  export TOLLGATE_TEST_REDIS_URL="redis://127.0.0.1:$port"
  echo "Redis on 127.0.0.1:$port"
}

# Starts a throwaway 3-master Redis Cluster on loopback; exports TOLLGATE_TEST_REDIS_CLUSTER_URL
# in the form Tollgate reads (redis+cluster://host:port,host:port,host:port).
start_redis_cluster() {
  local port ports=() nodes=() urls=()
  ensure_package redis-server redis-server
  REDIS_CLUSTER_ROOT=$(mktemp -d /tmp/tollgate-redis-cluster.XXXXXX)
  for index in 1 2 3; do
    port=$(free_cluster_port)
    mkdir -p "$REDIS_CLUSTER_ROOT/$port"
    redis-server --port "$port" --bind 127.0.0.1 --dir "$REDIS_CLUSTER_ROOT/$port" --cluster-enabled yes \
      --cluster-config-file nodes.conf --appendonly yes --save '' --maxmemory-policy noeviction --daemonize yes \
      --pidfile "$REDIS_CLUSTER_ROOT/$port/redis.pid" --logfile "$REDIS_CLUSTER_ROOT/$port/redis.log"
    wait_redis "$port"
    ports+=("$port")
    nodes+=("127.0.0.1:$port")
    urls+=("127.0.0.1:$port")
  done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >/dev/null
  for _ in $(seq 1 100); do
    if redis-cli -p "${ports[0]}" cluster info | grep -q 'cluster_state:ok'; then break; fi
    sleep 0.1
  done
  export TOLLGATE_TEST_REDIS_CLUSTER_URL="redis+cluster://$(IFS=,; echo "${urls[*]}")"
  echo "Redis Cluster on ${nodes[*]}"
}

# A free port at most 55535 whose cluster bus port (port + 10000) is free too.
free_cluster_port() {
  python3 -c '
import random, socket
def free(port):
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
while True:
    port = random.randint(20000, 45000)
    if free(port) and free(port + 10000):
        print(port)
        break'
}

wait_redis() {
  for _ in $(seq 1 100); do
    if redis-cli -p "$1" ping 2>/dev/null | grep -q PONG; then return 0; fi
    sleep 0.1
  done
  echo "Redis on port $1 did not start" >&2
  return 1
}

stop_redis() {
  local pidfile
  for pidfile in "${REDIS_ROOT:-/nonexistent}/redis.pid" "${REDIS_CLUSTER_ROOT:-/nonexistent}"/*/redis.pid; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  rm -rf "${REDIS_ROOT:-}" "${REDIS_CLUSTER_ROOT:-}"
}
