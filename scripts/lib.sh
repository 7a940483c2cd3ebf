# Helpers for scripts/test. Sourced, not run.

timings=()
phase_started=$(date +%s)

phase() {
  echo
  echo "==> $1"
  phase_started=$(date +%s)
}

mark() {
  timings+=("  $1: $(( $(date +%s) - phase_started )) s")
}

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

# The Python venv with the pinned SDKs (tests/sdk/requirements.txt).
ensure_venv() {
  if [ ! -x .venv/bin/python ] || ! cmp -s tests/sdk/requirements.txt .venv/requirements.txt; then
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check -r tests/sdk/requirements.txt
    cp tests/sdk/requirements.txt .venv/requirements.txt
  fi
}
