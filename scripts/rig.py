"""What the rigs of scripts/faults and scripts/bench share: free loopback ports, a throwaway
PostgreSQL cluster run as user postgres, process trees from /proc, and an account opened through
the operator API. Standard library only; imported, not run.
"""

import shlex
import shutil
import socket
import subprocess
from pathlib import Path


class RigError(Exception):
    """A rig could not be set up or kept running; the message says what and where."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def postgres_bin() -> Path:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda path: int(path.parent.parent.name))
    if not candidates:
        raise RigError("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin (apt-get install postgresql)")
    return candidates[-1].parent


def as_postgres(command: str, timeout: float = 120) -> subprocess.CompletedProcess:
    # A session of its own: a Ctrl-C at the terminal reaches the rig, which stops PostgreSQL.
    return subprocess.run(["su", "postgres", "-s", "/bin/sh", "-c", command], capture_output=True, text=True, timeout=timeout, start_new_session=True)


def init_postgres(directory: Path) -> Path:
    """A fresh cluster in `directory` (created, owned by postgres; its parents must be readable
    by postgres); returns its data directory."""
    directory.mkdir()
    shutil.chown(directory, "postgres")
    data = directory / "data"
    result = as_postgres(f"{shlex.quote(str(postgres_bin() / 'initdb'))} -D {shlex.quote(str(data))} -A trust -U postgres --no-sync")
    if result.returncode != 0:
        raise RigError(f"initdb failed: {result.stderr}")
    return data


def pg_ctl_start(data: Path, port: int, socket_dir: Path, log: Path, max_connections: int, prefix: str = "") -> subprocess.CompletedProcess:
    """Starts the cluster on 127.0.0.1:`port` (fsync and synchronous_commit as PostgreSQL ships
    them); `prefix` goes before pg_ctl (`taskset -c 0`, say)."""
    options = f"-p {port} -k {socket_dir} -c listen_addresses=127.0.0.1 -c max_connections={max_connections}"
    return as_postgres(f"{prefix}{shlex.quote(str(postgres_bin() / 'pg_ctl'))} -D {shlex.quote(str(data))} -l {shlex.quote(str(log))}"
                       f" -w -t 60 -o {shlex.quote(options)} start")


def pg_ctl_stop(data: Path) -> subprocess.CompletedProcess:
    return as_postgres(f"{shlex.quote(str(postgres_bin() / 'pg_ctl'))} -D {shlex.quote(str(data))} -m immediate stop", timeout=60)


def postmaster_pid(data: Path):
    try:
        return int((data / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def _children_by_parent():
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return children


def children_of(pid: int):
    return _children_by_parent().get(pid, [])


def process_tree(pid: int):
    """The pid and all its descendants."""
    children = _children_by_parent()
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def open_account(admin, account_id: str, amount: str, customer_type: str, name: str) -> str:
    """Opens an account through the operator API, funds it with a confirmed top-up of `amount`
    and returns a new key. `admin(method, path, body)` returns the parsed answer of a 2xx."""
    admin("POST", "/internal/accounts", {"id": account_id, "kind": "user", "name": name, "customer_type": customer_type})
    topup = admin("POST", "/internal/topups", {"account_id": account_id, "amount": amount, "reference_id": f"{account_id}-initial"})
    admin("POST", f"/internal/topups/{topup['id']}/confirm", None)
    return admin("POST", f"/internal/accounts/{account_id}/keys", {"name": name})["key"]
