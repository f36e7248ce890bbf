"""Start and stop the servers of the Celery cluster test, all on loopback and inside one work folder.

``Cluster`` starts its own PostgreSQL (metadata database) and Redis (Celery broker) on free
ports, then the Airflow components (api-server, scheduler, dag-processor, triggerer, Celery
workers) with a project-local ``AIRFLOW_HOME``. Every process is started in a session of its
own and remembered, with the processes it spawned, so ``stop`` leaves nothing behind, also when
the test failed half-way. Every process writes to its own log under ``<work>/logs``;
``log_tails`` gives their ends for a failure message.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
AIRFLOW = str(VENV_BIN / "airflow")
# PostgreSQL refuses to run as root: when the test runs as root, the servers run as this user.
PG_USER = "postgres"
ADMIN = "admin"
# Every process the test starts carries this variable (value: the work folder), so a leftover is found.
MARKER = "PROFILE_ENGINE_CLUSTER_TEST"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pg_binary(name: str) -> str:
    """Path of a PostgreSQL program: on PATH, else Debian's /usr/lib/postgresql/<major>/bin (newest major)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(Path(p).parts[-3]), reverse=True
    )
    if not candidates:
        raise RuntimeError(f"{name} not found: run scripts/ensure-cluster-packages.sh (installs postgresql)")
    return candidates[0]


def wait_for(what: str, check: Callable[[], bool], timeout: float, interval: float = 1.0) -> None:
    """Poll ``check`` until it returns True; TimeoutError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


@dataclass
class Service:
    """One started process (its session holds everything it spawns) and its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    known: set[int] = field(default_factory=set)

    def remember_children(self) -> None:
        """Record the process tree now, so children that leave the session are still stopped."""
        with contextlib.suppress(psutil.Error):
            parent = psutil.Process(self.process.pid)
            self.known |= {parent.pid, *(child.pid for child in parent.children(recursive=True))}


@dataclass
class Cluster:
    """The servers of one test run under ``work``; use ``with Cluster(work) as cluster``."""

    work: Path
    services: dict[str, Service] = field(default_factory=dict)
    pg_root: Path | None = None
    pg_data: Path | None = None
    pg_port: int = 0
    redis_port: int = 0
    api_port: int = 0
    password: str = field(default_factory=lambda: secrets.token_urlsafe(16))

    def __enter__(self) -> Cluster:
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- processes ---------------------------------------------------------------------------------------------
    def start(self, name: str, args: list[str], env: dict[str, str]) -> Service:
        """Start ``args`` in a new session, output to ``logs/<name>.log``."""
        log = self.work / "logs" / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                args,
                env={**env, MARKER: str(self.work)},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.work,
            )
        service = Service(name, process, log)
        self.services[name] = service
        return service

    def stop_service(self, *names: str, timeout: float = 30.0) -> None:
        """SIGTERM the services' sessions together (warm shutdown), SIGKILL whatever is left after ``timeout``."""
        services = [self.services.pop(name) for name in names if name in self.services]
        for service in services:
            service.remember_children()
            _signal_group(service.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for service in services:
            try:
                service.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                _signal_group(service.process.pid, signal.SIGKILL)
                service.process.wait(timeout=10)
        # Children (task processes) may outlive their leader for a moment.
        survivors = [p for s in services for p in _alive(s.known) if p.pid != s.process.pid]
        _, still = psutil.wait_procs(survivors, timeout=10)
        for process in still:
            with contextlib.suppress(psutil.Error):
                process.kill()
        for service in services:
            _signal_group(service.process.pid, signal.SIGKILL)

    def stop(self) -> None:
        """Stop the Airflow components, then Redis and PostgreSQL; kill any marked process still left."""
        self.stop_service(*[name for name in self.services if name != "redis"])
        self.stop_service("redis")
        self.stop_postgres()
        for process in self.leftovers():
            with contextlib.suppress(psutil.Error):
                process.kill()

    def leftovers(self) -> list[psutil.Process]:
        """Processes still running that this cluster started (found by the marker in their environment)."""
        found = []
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if process.environ().get(MARKER) == str(self.work):
                    found.append(process)
        return found

    def log_tails(self, lines: int = 40) -> str:
        """The last ``lines`` lines of every service log, for a failure message."""
        parts = []
        logs = sorted((self.work / "logs").glob("*.log"))
        if self.pg_root is not None:
            logs.append(self.pg_root / "postgres.log")
        for log in logs:
            text = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"----- {log.name} (last {len(text)} lines) -----\n" + "\n".join(text))
        return "\n".join(parts)

    # ---- PostgreSQL and Redis ----------------------------------------------------------------------------------
    def start_postgres(self) -> str:
        """initdb + pg_ctl start on a free port (as ``postgres`` when root); the SQLAlchemy URL of database ``airflow``.

        The server's folder is a temp dir of its own, not under pytest's, whose parent pytest keeps at
        mode 0700 (the ``postgres`` user could not reach its data there).
        """
        as_user = _run_as_prefix()
        self.pg_root = Path(tempfile.mkdtemp(prefix="profile-engine-pg-"))
        self.pg_root.chmod(0o711)
        self.pg_data = self.pg_root / "data"
        log = self.pg_root / "postgres.log"
        log.touch()
        if as_user:
            account = pwd.getpwnam(PG_USER)
            for path in (self.pg_root, log):
                os.chown(path, account.pw_uid, account.pw_gid)
        self.pg_port = free_port()
        env = {"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8", MARKER: str(self.work)}
        _run(
            [*as_user, pg_binary("initdb"), "-D", str(self.pg_data), "-U", "airflow", "--auth=trust", "-E", "UTF8"],
            env,
        )
        options = f"-p {self.pg_port} -k {self.pg_root} -c listen_addresses=127.0.0.1 -c fsync=off"
        _run(
            [*as_user, pg_binary("pg_ctl"), "start", "-w", "-t", "60", "-D", str(self.pg_data), "-l", str(log)]
            + ["-o", options],
            env,
        )
        create = ["-h", "127.0.0.1", "-p", str(self.pg_port), "-U", "airflow", "-d", "postgres"]
        _run([*as_user, pg_binary("psql"), *create, "-c", "CREATE DATABASE airflow"], env)
        return f"postgresql+psycopg2://airflow@127.0.0.1:{self.pg_port}/airflow"

    def stop_postgres(self) -> None:
        """pg_ctl stop -m fast (the postmaster is killed if that fails); removes the server's folder."""
        if self.pg_root is None:
            return
        assert self.pg_data is not None
        pid_file = self.pg_data / "postmaster.pid"
        if pid_file.is_file():
            env = {"PATH": os.environ.get("PATH", ""), MARKER: str(self.work)}
            stop = [pg_binary("pg_ctl"), "stop", "-w", "-t", "30", "-m", "fast", "-D", str(self.pg_data)]
            with contextlib.suppress(Exception):
                _run([*_run_as_prefix(), *stop], env)
        if pid_file.is_file():
            with contextlib.suppress(Exception):
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
        log = self.pg_root / "postgres.log"
        if log.is_file():
            shutil.copy(log, self.work / "logs" / "postgres.log")  # kept with the other logs
        shutil.rmtree(self.pg_root, ignore_errors=True)
        self.pg_root = None

    def start_redis(self) -> str:
        """redis-server on a free loopback port, no persistence; the broker URL."""
        self.redis_port = free_port()
        folder = self.work / "redis"
        folder.mkdir()
        redis = shutil.which("redis-server")
        if not redis:
            raise RuntimeError("redis-server not found: run scripts/ensure-cluster-packages.sh")
        args = [
            redis,
            "--port",
            str(self.redis_port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(folder),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
        ]
        self.start("redis", args, {"PATH": os.environ.get("PATH", "")})
        wait_for("redis", lambda: _redis_ping(self.redis_port), timeout=30, interval=0.2)
        return f"redis://127.0.0.1:{self.redis_port}/0"

    # ---- Airflow -----------------------------------------------------------------------------------------------
    def airflow_env(self, home: Path, database: str, broker: str, extra: dict[str, str]) -> dict[str, str]:
        """The environment every Airflow component shares: CeleryExecutor, this cluster's servers, the project's DAGs."""
        self.api_port = self.api_port or free_port()
        passwords = home / "simple_auth_manager_passwords.json.generated"
        home.mkdir(parents=True, exist_ok=True)
        passwords.write_text(json.dumps({ADMIN: self.password}) + "\n")
        from cryptography.fernet import Fernet

        secret = secrets.token_urlsafe(32)
        env = {key: value for key, value in os.environ.items() if not key.startswith(("AIRFLOW", "PROFILE_ENGINE_"))}
        env.update(
            {
                "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                "PYTHONPATH": str(ROOT),  # tests.cluster.worker_identity (the workers' hostname_callable)
                "AIRFLOW_HOME": str(home),
                "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
                "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
                "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{self.api_port}/execution/",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN}:admin",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": database,
                "AIRFLOW__CELERY__BROKER_URL": broker,
                "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + database,
                "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__PORT": str(self.api_port),
                "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{self.api_port}",
                "AIRFLOW__API__WORKERS": "1",
                "AIRFLOW__API__SECRET_KEY": secret,
                "AIRFLOW__API_AUTH__JWT_SECRET": secret,
                "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
                # One parsing process, and no re-parse every 30 s: two cores are shared by everything here.
                "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
                "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "120",
                "GX_ANALYTICS_ENABLED": "false",
            }
        )
        env.update(extra)
        return env

    def airflow(self, args: list[str], env: dict[str, str], timeout: float = 300) -> str:
        """Run an ``airflow`` command to its end; its output (RuntimeError with the output when it fails)."""
        return _run([AIRFLOW, *args], {**env, MARKER: str(self.work)}, timeout=timeout)

    def start_worker(self, name: str, env: dict[str, str]) -> Service:
        """A Celery worker whose task instances report ``name`` as their hostname, with its own log-server port."""
        worker_env = {
            **env,
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tests.cluster.worker_identity.hostname",
            "PROFILE_ENGINE_CLUSTER_WORKER": name,
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        }
        args = [
            AIRFLOW,
            "celery",
            "worker",
            "--celery-hostname",
            f"{name}@%h",
            "--concurrency",
            "1",
            "--without-mingle",
            "--without-gossip",
        ]
        return self.start(name, args, worker_env)

    def api(self) -> ApiClient:
        """A REST client of this cluster's api-server, logged in as the admin."""
        return ApiClient(f"http://127.0.0.1:{self.api_port}", ADMIN, self.password)


class ApiClient:
    """Airflow 3's REST API (/api/v2) with a JWT from /auth/token (simple auth manager)."""

    def __init__(self, base: str, username: str, password: str) -> None:
        self.base = base
        self.session = requests.Session()
        response = requests.post(f"{base}/auth/token", json={"username": username, "password": password}, timeout=30)
        response.raise_for_status()
        self.session.headers["Authorization"] = f"Bearer {response.json()['access_token']}"

    def get(self, path: str, **params: Any) -> Any:
        """GET /api/v2/<path> as JSON."""
        response = self.session.get(f"{self.base}/api/v2/{path}", params=params, timeout=30)
        response.raise_for_status()
        return response.json()

    def send(self, method: str, path: str, body: dict[str, Any]) -> Any:
        """POST or PATCH /api/v2/<path> with a JSON body; the JSON answer."""
        response = self.session.request(method, f"{self.base}/api/v2/{path}", json=body, timeout=30)
        if response.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text}")
        return response.json()

    def paged(self, path: str, key: str, **params: Any) -> Iterator[dict[str, Any]]:
        """Every item of a paginated list endpoint."""
        offset = 0
        while True:
            page = self.get(path, limit=100, offset=offset, **params)
            items = page[key]
            yield from items
            offset += len(items)
            if not items or offset >= page["total_entries"]:
                return


def api_up(base: str) -> bool:
    """Whether the api-server answers its health endpoint with a healthy metadata database."""
    response = requests.get(f"{base}/api/v2/monitor/health", timeout=5)
    return response.status_code == 200 and response.json()["metadatabase"]["status"] == "healthy"


def _run_as_prefix() -> list[str]:
    """``runuser -u postgres --`` when root (PostgreSQL refuses root), nothing otherwise; creates the user if missing."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER], check=True)
    return ["runuser", "-u", PG_USER, "--"]


def _run(args: list[str], env: dict[str, str], timeout: float = 300) -> str:
    """Run a command to its end; its output, or RuntimeError with the output."""
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def _redis_ping(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(16).startswith(b"+PONG")


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _alive(pids: set[int]) -> list[psutil.Process]:
    alive = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
    return alive
