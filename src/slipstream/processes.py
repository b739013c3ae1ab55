"""The launcher's processes: each service a child it starts, watches, restarts and stops.

`Mesh` starts a service as `python -m slipstream.services.<name>` in a session of its own (a
terminal's Ctrl-C reaches the launcher only, which stops them in order), bound to the launcher's
life (PR_SET_PDEATHSIG: even a killed launcher leaves no orphan), logging to `logs/<name>.log`
and reporting its port through a ready file; `pids.json` lists every process of the run.

It stops them as a run that keeps its work must stop (`stop_in_order`): the rollout servers
first (intake stops: nothing is left to dispatch to), then the trainer, which finishes or
abandons its step, writes its checkpoint and commits, then the coordinator and the reward
service, Redis last. Under `--max-restarts N` it supervises as Kubernetes would (`supervise`): a
service that dies is started again, up to N times each, on the port it had (Redis on its data
directory, so its AOF is replayed; the trainer with `--load` on its latest checkpoint). The
services themselves reconnect, resume and fence; this only restarts.

`Timeline` is `<run-dir>/timeline.json`: when the launch began, when each service was ready, the
first and last steps, and when everything had stopped.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from slipstream.config import Config

GRACE_S = 5.0  # SIGTERM to SIGKILL, for each stage of a stop
READY_TIMEOUT_S = 120.0  # from a service's start to its ready file
POLL_S = 0.05


class LaunchError(RuntimeError):
    """A service failed to start or died; the message is the one line the user sees last."""

    def __init__(self, message: str, tail: str = ""):
        super().__init__(message)
        self.tail = tail  # the end of the dead service's log, shown above the message


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def process_start() -> float:
    """Wall time this process started (the launch), from /proc; now where that is unreadable."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


class Timeline:
    """`<run-dir>/timeline.json`: what happened when, in seconds since the launch (rewritten at
    each event, so a run that dies leaves what it got to)."""

    def __init__(self, path: Path | None, launched: float | None = None):
        self.path = path
        self.launched = launched if launched is not None else process_start()
        self.events: list[dict] = []
        self.mark("launch", at=self.launched)

    def mark(self, event: str, at: float | None = None, **extra) -> None:
        at = time.time() if at is None else at
        self.events.append({"event": event, "s": round(at - self.launched, 3), **extra})
        self._write()

    def seconds(self, event: str) -> float | None:
        return next((e["s"] for e in self.events if e["event"] == event), None)

    def _write(self) -> None:
        if self.path is None:
            return
        first, last, stopped = (self.seconds(e) for e in ("first step", "last step", "all stopped"))
        doc = {
            "launched_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.launched)),
            "launched_at_epoch": round(self.launched, 3),
            "first_step_s": first,
            "last_step_to_all_stopped_s": _between(last, stopped),
            "events": self.events,
        }
        try:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(doc, indent=1) + "\n")
            os.replace(tmp, self.path)
        except OSError:
            pass  # the timeline is a record, never a reason to fail the run


def _between(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round(end - start, 3)


def listen_port(taken: frozenset[int] = frozenset()) -> int:
    """A free loopback port for a service that binds it seconds from now, below the kernel's
    ephemeral range: an outgoing connection never picks one there meanwhile."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    pick = random.SystemRandom()
    for _ in range(200):
        port = pick.randrange(max(1024, low - 10000), low)
        if port in taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    from slipstream.buffer.embedded import free_port

    return free_port()


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path
    ready_file: Path | None = None
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None
    port: int = 0  # once ready (a restart binds the same one)
    restarts: int = 0

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").rstrip().splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def last_error_line(self) -> str:
        for line in reversed(self.tail(40).splitlines()):
            if "error" in line.lower():
                return line.strip()
        return ""


@dataclass
class Mesh:
    cfg: Config
    config_path: Path
    procs: list[Proc] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    timeline: Timeline = field(default_factory=lambda: Timeline(None))
    interrupted: Callable[[], bool] = lambda: False  # a stop was asked for (Ctrl-C, SIGTERM)
    mps_env: dict[str, str] = field(default_factory=dict)  # --cuda-mps: its daemon's directories

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.infra.run_dir)

    def spawn(
        self, name: str, argv: list[str], ready: bool = True, env: dict[str, str] | None = None
    ) -> Proc:
        logs = self.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        ready_file = self.run_dir / "ports" / f"{name}.port" if ready else None
        command = argv
        if ready_file is not None:
            ready_file.parent.mkdir(parents=True, exist_ok=True)
            ready_file.unlink(missing_ok=True)
            command = [*argv, "--ready-file", str(ready_file)]
        log_path = logs / f"{name}.log"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=full_env,
                preexec_fn=_die_with_parent,
                start_new_session=True,  # a terminal's Ctrl-C reaches the launcher, which stops in order
            )
        proc = Proc(name, popen, log_path, ready_file, argv=argv, env=env)
        self.procs.append(proc)
        # Operators (and the tests) find every process of the run here.
        pids = {p.name: p.popen.pid for p in self.procs}
        (self.run_dir / "pids.json").write_text(json.dumps(pids, indent=2) + "\n")
        return proc

    def service(
        self,
        name: str,
        module: str,
        *extra: str,
        threads: int = 1,
        env: dict[str, str] | None = None,
        ranks: int = 1,
        port: int = 0,
    ) -> Proc:
        # Several ranks (the FSDP2 trainer): torchrun starts them and waits for all.
        runner = (
            ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
            if ranks > 1
            else []
        )
        argv = [
            sys.executable,
            *runner,
            "-m",
            f"slipstream.services.{module}",
            "--config",
            str(self.config_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--torch-threads",
            str(threads),
            *extra,
        ]
        return self.spawn(name, argv, env=env)

    def wait_ready(self, proc: Proc, timeout: float = READY_TIMEOUT_S, others: bool = True) -> int:
        """The port `proc` reports once serving; its death (or, with `others`, any other's) raises."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.ready_file and proc.ready_file.exists():
                text = proc.ready_file.read_text().strip()
                if text:
                    proc.port = int(text)
                    return proc.port
            if proc.popen.poll() is not None:
                raise self.death(proc)
            if others:
                self.check_others(proc)
            time.sleep(0.05)
        raise LaunchError(f"{proc.name} did not become ready within {timeout:.0f}s; see {proc.log_path}")

    def wait_all_ready(self, procs: list[Proc]) -> None:
        """Until every one of `procs` reports its port (each marked on the timeline); the death of
        any process raises, a stop asked for raises KeyboardInterrupt."""
        started = time.monotonic()
        waiting = list(procs)
        while waiting:
            for proc in list(waiting):
                text = proc.ready_file.read_text().strip() if proc.ready_file.exists() else ""
                if text:
                    proc.port = int(text)
                    waiting.remove(proc)
                    self.timeline.mark(f"{proc.name} ready")
            if self.get("trainer").popen.poll() == 0:
                return  # a short (resumed) run can end before a slow rollout server is up
            self.check_others()
            if self.interrupted():
                raise KeyboardInterrupt
            if waiting and time.monotonic() - started > READY_TIMEOUT_S:
                late = waiting[0]
                raise LaunchError(
                    f"{late.name} did not become ready within {READY_TIMEOUT_S:.0f}s; see {late.log_path}"
                )
            time.sleep(POLL_S)

    def check_others(self, skip: Proc | None = None) -> None:
        for p in self.procs:
            if p is not skip and p.popen.poll() is not None and p is self.get(p.name):
                raise self.death(p)

    def get(self, name: str) -> Proc:
        """The live incarnation of service `name`."""
        return next(p for p in reversed(self.procs) if p.name == name)

    def supervise(self) -> None:
        """Restart dead services within --max-restarts; raise the death of one past it.

        The trainer's exit is the run's outcome and is judged by the caller, except a crash,
        which is restarted like any other service while restarts are left.
        """
        for p in list(self.procs):
            code = p.popen.poll()
            if code is None or p is not self.get(p.name) or (p.name == "trainer" and code == 0):
                continue
            if p.restarts >= self.cfg.infra.max_restarts:
                raise self.death(p)
            self.restart(p)

    def restart(self, proc: Proc) -> Proc:
        death = self.death(proc)
        argv = list(proc.argv)
        if proc.port and "--port" in argv:  # bind the port the others dial
            argv[argv.index("--port") + 1] = str(proc.port)
        if proc.name == "trainer":
            # Its own latest checkpoint: one written by this launch, never an earlier run's.
            latest = self.cfg.save_dir / "latest"
            if latest.is_file() and latest.stat().st_mtime >= self.started_at:
                argv += ["--load", str(self.cfg.save_dir)]
        print(f"slipstream: {death}; restarting it ({proc.restarts + 1}/{self.cfg.infra.max_restarts})",
              file=sys.stderr, flush=True)  # fmt: skip
        new = self.spawn(proc.name, argv, ready=proc.ready_file is not None, env=proc.env)
        new.restarts = proc.restarts + 1
        new.port = proc.port
        if proc.name == "redis":
            from slipstream.buffer.embedded import wait_for_redis

            wait_for_redis(self.cfg.infra.redis_url, timeout=30)
        elif new.ready_file is not None:
            self.wait_ready(new, others=False)  # another dead service is restarted next
        return new

    def death(self, proc: Proc) -> LaunchError:
        code = proc.popen.returncode
        how = (
            f"killed by {signal.Signals(-code).name}"
            if code is not None and code < 0
            else f"exit code {code}"
        )
        reason = proc.last_error_line()
        message = f"{proc.name} died ({how})" + (f": {reason}" if reason else f"; see {proc.log_path}")
        return LaunchError(message, tail=proc.tail())

    def alive(self, which: Callable[[Proc], bool] = lambda p: True) -> list[Proc]:
        return [p for p in self.procs if p.popen.poll() is None and which(p)]

    def stop(
        self, procs: list[Proc], grace: float = GRACE_S, forced: Callable[[], bool] = lambda: False
    ) -> None:
        """SIGTERM `procs` at once; SIGKILL what is left after `grace` seconds, or at once when `forced()`."""
        for p in procs:
            try:
                p.popen.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        running = list(procs)
        while running and time.monotonic() <= deadline and not forced():
            time.sleep(POLL_S)
            for p in [p for p in running if p.popen.poll() is not None]:
                running.remove(p)
                self.timeline.mark(f"{p.name} stopped", exit_code=p.popen.returncode)
        for p in running:
            if p.popen.poll() is None:
                p.popen.kill()
                self.timeline.mark(f"{p.name} killed")
            p.popen.wait()

    def stop_all(self, grace: float = GRACE_S, forced: Callable[[], bool] = lambda: False) -> None:
        """Every service at once, then Redis (the coordinator flushes its journal into it at exit)."""
        self.stop(self.alive(lambda p: p.name != "redis"), grace, forced)
        self.stop(self.alive(), grace, forced)

    def stop_in_order(
        self,
        say: Callable[[str], None] = lambda line: None,
        save_timeout: float = GRACE_S,
        forced: Callable[[], bool] = lambda: False,
    ) -> None:
        """A stop that keeps the run's work: intake first (the rollout servers: the coordinator then
        has no one to dispatch to), then the trainer (it finishes or abandons its step, saves and
        commits while the coordinator and Redis still answer it), then the rest (`stop_all`)."""
        self.stop(self.alive(lambda p: p.name.startswith("rollout-")), GRACE_S, forced)
        trainer = self.alive(lambda p: p.name == "trainer")
        if trainer and not forced():
            step = self.last_step()
            doing = f"trainer saving step {step}" if step else "trainer stopping (no step trained yet)"
            say(f"stopping: intake stopped; {doing}... (Ctrl-C again to force)")
            self.stop(trainer, save_timeout, forced)
            if not forced():
                say(f"stopping: {self.saved_line(trainer[0])}; stopping the other services")
        if forced():
            say("stopping: forced: killing every service")
        self.stop_all(GRACE_S, forced)

    def last_step(self) -> int:
        rows, _ = read_metrics(self.run_dir / "metrics.jsonl", 0)
        return rows[-1]["step"] if rows else 0

    def saved_line(self, trainer: Proc) -> str:
        """What the trainer left on disk as it stopped, in a few words."""
        latest = self.cfg.save_dir / "latest"
        code = trainer.popen.returncode
        if latest.is_file() and latest.stat().st_mtime >= self.started_at:
            name = latest.read_text().strip()
            return f"trainer saved {self.cfg.save_dir / name}" + ("" if code == 0 else f" (exit code {code})")
        return f"trainer exited (code {code}) without a new checkpoint; see {trainer.log_path}"


def read_metrics(path: Path, offset: int) -> tuple[list[dict], int]:
    """The complete JSON lines of `path` from byte `offset` on, and the offset after them."""
    try:
        with path.open() as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return [], offset
    complete = data[: data.rfind("\n") + 1]
    rows = [json.loads(line) for line in complete.splitlines() if line.strip()]
    return rows, offset + len(complete)
