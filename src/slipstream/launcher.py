"""One machine, one command: every service as its own process, supervised.

`slipstream train` (and `python train.py`) resolves the config, writes it into the run
directory and starts an embedded Redis/Valkey (unless `--redis-url`), then, all at once, the
reward service, the coordinator, `--rollout-num-servers` rollout servers and the trainer: the
reward service and the coordinator get loopback ports picked here (below the kernel's ephemeral
range, so no outgoing connection takes one before its service binds it), so every address is
known before anything is up, and each service waits for what it dials (the coordinator for the
reward service, rollout servers and the trainer for the coordinator). Each is a separate
`python -m slipstream.services.<name>` process logging to `logs/<name>.log`, in a session of its
own (a terminal's Ctrl-C reaches the launcher only, which stops them in order), reporting its
port through a ready file.

The launcher then watches: a live progress line from `metrics.jsonl`; success when the trainer
exits 0, after which everything else stops at once (Redis last). On Ctrl-C/SIGTERM it stops in
order: the rollout servers first (intake stops: nothing is left to dispatch to), then the trainer,
which finishes or abandons its step, writes its checkpoint and commits (`checkpointer.py`), then
the coordinator and the reward service, Redis last; a second Ctrl-C kills everything. If a
service dies it stops the others the same way (the trainer's save bounded by the grace period)
and exits non-zero naming the dead service and the tail of its log. Children are bound to the
launcher's life (PR_SET_PDEATHSIG), so even a killed launcher leaves no orphan.

`<run-dir>/timeline.json` records when the launch began, when each service was ready, the first
and last steps, and when everything had stopped; the run report is written after that, in a
child process with a time bound.

With `--max-restarts N` the launcher supervises instead, as Kubernetes would: a service that dies
is started again, up to N times each, on the port it had (Redis on its data directory, so its
AOF is replayed; the trainer with `--load` on its latest checkpoint). The services themselves
reconnect, resume and fence; the launcher only restarts.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slipstream import mps
from slipstream.config import Config
from slipstream.console import ConsoleRelay
from slipstream.log import rotate_logs, write_config_table
from slipstream.placement import (
    PlacementError,
    Resolved,
    cuda_visible,
    model_parameters,
    plan,
    resolve,
    visible_gpus,
)
from slipstream.report import report_at_end
from slipstream.shm_files import sweep_orphans

GRACE_S = 5.0  # SIGTERM to SIGKILL, for each stage of a stop
READY_TIMEOUT_S = 120.0  # from a service's start to its ready file
SAVE_TIMEOUT_S = 600.0  # a stop asked for (Ctrl-C, SIGTERM): the trainer's last step and checkpoint
REPORT_TIMEOUT_S = 60.0  # the run report, written once every service is down
LAUNCHER_ATTACH_GRACE_S = 20.0  # --rollout-attach-grace when the launcher starts the servers
POLL_S = 0.05
# While training, the launcher only follows: a metrics row a step, logs, deaths. Polling at 20 Hz
# burned ~0.015 cores (issue 14: 0.05 CPU s of a 2-core box's step); 4 Hz is soon enough for each.
FOLLOW_POLL_S = 0.25
EVAL_WAIT_S = 300.0  # after the last step, for the evaluation of the last version


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


def _process_start() -> float:
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
        self.launched = launched if launched is not None else _process_start()
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
        rows, _ = _read_metrics(self.run_dir / "metrics.jsonl", 0)
        return rows[-1]["step"] if rows else 0

    def saved_line(self, trainer: Proc) -> str:
        """What the trainer left on disk as it stopped, in a few words."""
        latest = self.cfg.save_dir / "latest"
        code = trainer.popen.returncode
        if latest.is_file() and latest.stat().st_mtime >= self.started_at:
            name = latest.read_text().strip()
            return f"trainer saved {self.cfg.save_dir / name}" + ("" if code == 0 else f" (exit code {code})")
        return f"trainer exited (code {code}) without a new checkpoint; see {trainer.log_path}"


def trainer_threads(cfg: Config, on_cpu: bool) -> int:
    """Torch threads of the trainer: --torch-threads, or when 0 every core this launcher may run on
    for a CPU trainer and 1 for a GPU one (every other service keeps 1). The CPU trainer is a
    step's critical path and the rollout servers sleep most of it: on the idle 2-core box the
    issue-14 run took 1.08 s a step with one thread, 0.82 s with two (docs/benchmarks.md)."""
    if cfg.infra.torch_threads:
        return cfg.infra.torch_threads
    return len(os.sched_getaffinity(0)) if on_cpu else 1


def thread_env(threads: int, on_cpu: bool) -> dict[str, str]:
    """OpenMP threads that sleep when idle (unless the user chose): spinning ones burn the cores
    the rollout servers share with a CPU trainer."""
    return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")} if on_cpu and threads > 1 else {}


def _router_flags(cfg: Config, taken: set[int]) -> list[str]:
    """A rollout server's SGLang-compatible HTTP API and the address its --custom-generate-function-path
    function posts to (args.sglang_router_ip/port): its own, unless the user named a router. Each
    server gets a port of its own (one --http-port in the shared config would collide)."""
    if not cfg.rollout.custom_generate_function_path:
        return []
    port = listen_port(frozenset(taken))
    taken.add(port)
    flags = ["--http-port", str(port)]
    if not cfg.infra.sglang_router_port:
        flags += ["--sglang-router-ip", "127.0.0.1", "--sglang-router-port", str(port)]
    return flags


def start_mesh(mesh: Mesh) -> Proc:
    """Redis, then every service at once; returns the trainer's process once all are ready."""
    cfg = mesh.cfg
    if not cfg.infra.redis_url:
        from slipstream.buffer.embedded import free_port, server_command, wait_for_redis

        port = free_port()
        data = mesh.run_dir / "redis"
        if not cfg.train.load:  # a fresh run starts from an empty buffer; a resumed one keeps it
            shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True, exist_ok=True)
        mesh.spawn("redis", server_command(data, port), ready=False)
        cfg.infra.redis_url = f"redis://127.0.0.1:{port}/0"
        wait_for_redis(cfg.infra.redis_url, timeout=30)
        cfg.save_json(mesh.config_path)  # every service reads the URL from the config
    elif not cfg.train.load:
        # An external Redis may hold an earlier run of this run id: the coordinator would resume
        # its journal and the trainer its consumer group. A fresh run starts from nothing.
        from slipstream.buffer.replay import ReplayBuffer

        with ReplayBuffer(cfg.infra.redis_connect_url, cfg.infra.effective_run_id) as buffer:
            cleared = buffer.clear_run()
        if cleared:
            print(f"slipstream: fresh run: cleared {cleared} Redis keys of run {cfg.infra.effective_run_id!r} "
                  "(--load resumes instead)", file=sys.stderr, flush=True)  # fmt: skip

    mesh.timeline.mark("redis ready")
    # Every service at once: the addresses are chosen here, and each service waits (with backoff)
    # for what it dials, so their imports, model loads and compiles overlap.
    reward_port = listen_port()
    coord_port = listen_port(frozenset({reward_port}))
    coord_addr = f"127.0.0.1:{coord_port}"
    place = plan(cfg)
    if cfg.cluster.cuda_mps:
        try:
            mesh.mps_env = mps.start(mesh.run_dir)
        except (mps.MpsError, OSError, subprocess.SubprocessError) as e:
            raise LaunchError(str(e)) from e
    procs = [
        mesh.service("reward", "reward", port=reward_port),
        mesh.service(
            "coordinator", "coordinator", "--reward-addr", f"127.0.0.1:{reward_port}", port=coord_port
        ),
    ]
    dial = ("--coordinator-addr", coord_addr)
    taken = {reward_port, coord_port}
    procs += [
        mesh.service(
            f"rollout-{i}", "rollout", *dial, "--server-id", f"rollout-{i}", *_router_flags(cfg, taken),
            env={**cuda_visible(gpus), **mesh.mps_env},
        )
        for i, gpus in enumerate(place.rollout_gpus)
    ]  # fmt: skip
    on_cpu = not place.trainer_gpus
    threads = trainer_threads(cfg, on_cpu)
    trainer = mesh.service(
        "trainer", "trainer", *dial, threads=threads,
        env={**cuda_visible(place.trainer_gpus), **thread_env(threads, on_cpu), **mesh.mps_env},
        ranks=place.trainer_procs,
    )  # fmt: skip
    mesh.timeline.mark("services started")
    mesh.wait_all_ready([*procs, trainer])
    return trainer


def _read_metrics(path: Path, offset: int) -> tuple[list[dict], int]:
    try:
        with path.open() as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return [], offset
    complete = data[: data.rfind("\n") + 1]
    rows = [json.loads(line) for line in complete.splitlines() if line.strip()]
    return rows, offset + len(complete)


def _shown(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"  # None: no scored sample (or not finite)


def _error(e: Exception) -> None:
    # Plain print: one line, never re-wrapped to the terminal width, always the last one.
    tail = getattr(e, "tail", "")
    if tail:
        print("\n".join("  | " + line for line in tail.splitlines()), file=sys.stderr)
    print(f"slipstream: error: {e}", file=sys.stderr, flush=True)


def preflight(cfg: Config) -> None:
    """Fail fast, with one line, on what would otherwise fail inside a service minutes later."""
    from slipstream.data import DataError, load_prompts

    ckpt = Path(cfg.model.hf_checkpoint) if cfg.model.hf_checkpoint else None
    if ckpt is None:
        raise LaunchError("--hf-checkpoint is required")
    if not (ckpt / "config.json").is_file():
        raise LaunchError(f"--hf-checkpoint {ckpt}: not a Hugging Face model directory (no config.json)")
    if not any(ckpt.glob("*.safetensors")):
        raise LaunchError(f"--hf-checkpoint {ckpt}: no *.safetensors weights")
    rule = _label_rule(cfg)
    d = cfg.data
    try:
        records = load_prompts(
            d.prompt_data, d.input_key, d.label_key, d.metadata_key, require_label=rule is not None
        )
    except DataError as e:
        raise LaunchError(str(e)) from None
    if rule == "math":
        _warn_on_labels_without_answer(records)


LABEL_SAMPLE = 64  # labels the math rule is tried on before the run


def _label_rule(cfg: Config) -> str | None:
    """The built-in rule that grades against labels; None when the reward may need none (a remote
    endpoint or a --custom-rm-path function decide for themselves)."""
    r = cfg.reward
    return None if r.custom_rm_path or r.rm_url or r.rm_type == "remote_rm" else r.rm_type


def _warn_on_labels_without_answer(records: list) -> None:
    """A label the math rule finds no answer in is compared whole: nearly every response scores 0."""
    # What the reward service's math rule reads a label as, so preflight and grading agree.
    from slipstream.answers import label_answer

    picked = sorted(random.Random(0).sample(range(len(records)), min(LABEL_SAMPLE, len(records))))
    bad = [records[i] for i in picked if label_answer(records[i].label) is None]
    if bad:
        print(f"slipstream: warning: --rm-type math finds no answer in {len(bad)} of {len(picked)} sampled "
              f"labels (e.g. {bad[0].where}: {bad[0].label[:60]!r}); such a label is compared whole and "
              "responses rarely match it. Write the answer ('19', '\\boxed{19}', 'The answer is 19.') "
              "or grade with --custom-rm-path", file=sys.stderr, flush=True)  # fmt: skip


def keep_password_out_of_config(cfg: Config, run_dir: Path) -> None:
    """A password inside --redis-url moves to `<run-dir>/secrets/redis-password` (mode 0600) and
    --redis-password-file points there: config.json, which every service reads and people copy
    around, holds paths to secrets, never their values."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(cfg.infra.redis_url)
    if parts.password is None or cfg.infra.redis_password_file:
        return
    secret = run_dir / "secrets" / "redis-password"
    secret.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(unquote(parts.password))
    host = parts.netloc.rsplit("@", 1)[-1]
    user = f"{parts.username}@" if parts.username else ""
    cfg.infra.redis_url = urlunsplit(parts._replace(netloc=user + host))
    cfg.infra.redis_password_file = str(secret.resolve())


def place_on_host(cfg: Config, given: Collection[str]) -> Resolved:
    """Where the run's processes land on this host's GPUs; --colocate turned on when the launcher
    chooses it (the trainer reads it from config.json and sends CUDA IPC handles)."""
    try:
        placed = resolve(cfg, visible_gpus(), given, model_parameters(cfg.model.hf_checkpoint))
    except PlacementError as e:
        raise LaunchError(str(e)) from None
    if cfg.cluster.cuda_mps and not placed.gpus:
        raise LaunchError("--cuda-mps: this run has no GPU (MPS shares one GPU between processes)")
    if cfg.cluster.cuda_mps and shutil.which(mps.CONTROL) is None:
        raise LaunchError(f"--cuda-mps: {mps.CONTROL} is not on PATH (it comes with the NVIDIA driver)")
    cfg.cluster.colocate = placed.colocate
    cfg.rollout.rollout_num_servers = placed.placement.num_rollout_servers
    # Every service starts at once: the coordinator waits for the servers started here (streams.py).
    cfg.rollout.rollout_attach_grace = cfg.rollout.rollout_attach_grace or LAUNCHER_ATTACH_GRACE_S
    return placed


def write_report(run_dir: Path, timeline: Timeline) -> None:
    """`report_at_end` in a child process, bounded by REPORT_TIMEOUT_S (matplotlib's import and
    rendering take seconds, more on a loaded machine); one line either way, never an exception."""
    if not (run_dir / "metrics.jsonl").is_file():
        return  # nothing was trained: nothing to plot
    print(f"report: writing {run_dir / 'report'} ...", flush=True)
    fn = report_at_end
    code = f"import sys; from {fn.__module__} import {fn.__name__}; {fn.__name__}(sys.argv[1])"
    try:
        subprocess.run([sys.executable, "-c", code, str(run_dir)], timeout=REPORT_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        print(f"report: not written within {REPORT_TIMEOUT_S:.0f}s (`slipstream report {run_dir}` writes it)")
    except (KeyboardInterrupt, OSError) as e:
        print(f"report: not written ({type(e).__name__}: {e}; `slipstream report {run_dir}` writes it)")
    timeline.mark("report written")


def run(cfg: Config, given: Collection[str] = ()) -> int:
    """Run the whole mesh until the trainer finishes. Returns the process exit code.

    `given`: the fields the user set (`placement.given_fields`), which the launcher never chooses.
    """
    from rich.console import Console

    console = Console(stderr=True)
    launched = _process_start()
    try:
        preflight(cfg)
        placed = place_on_host(cfg, given)
    except LaunchError as e:
        _error(e)
        return 2
    run_dir = Path(cfg.infra.run_dir)
    config_path = _prepare_run_dir(cfg, run_dir, placed.line())
    stop_signal: list[int] = []
    mesh = Mesh(
        cfg, config_path, timeline=Timeline(run_dir / "timeline.json", launched),
        interrupted=lambda: bool(stop_signal),
    )  # fmt: skip

    def on_signal(signum, frame):  # noqa: ARG001
        stop_signal.append(signum)
        if len(stop_signal) == 1:
            mesh.timeline.mark("stop requested", signal=signal.Signals(signum).name)

    def say(line: str) -> None:
        print(f"slipstream: {line}", file=sys.stderr, flush=True)

    relay = ConsoleRelay(run_dir / "logs")  # the lines services log for the console (console.py)
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        console.print(f"[bold]slipstream[/] run directory {run_dir} (logs in {run_dir / 'logs'})")
        start_mesh(mesh)
        _follow(cfg, mesh, relay, console, stop_signal)
        relay.echo(console)  # the last step's
        mesh.timeline.mark("trainer exited")
        _wait_for_last_eval(cfg, mesh, console, stop_signal)
        mesh.stop_all(forced=lambda: len(stop_signal) > 1)  # the run is done: everything at once
        mesh.timeline.mark("all stopped")
        summary = run_dir / "summary.json"
        if summary.exists():
            console.print(f"summary: {summary.read_text().strip()}")
        return 0
    except LaunchError as e:
        # The trainer still saves what it trained, within the grace period; the error is the last line.
        mesh.timeline.mark("service died", error=str(e))
        mesh.stop_in_order(forced=lambda: bool(stop_signal))
        mesh.timeline.mark("all stopped")
        relay.echo(console)  # what the services said before; the error stays the last line
        _error(e)
        return 1
    except KeyboardInterrupt:
        mesh.stop_in_order(say, SAVE_TIMEOUT_S, forced=lambda: len(stop_signal) > 1)
        mesh.timeline.mark("all stopped")
        took = (mesh.timeline.seconds("all stopped") or 0) - (mesh.timeline.seconds("stop requested") or 0)
        say(f"stopped in {took:.1f}s")
        return 128 + (stop_signal[0] if stop_signal else signal.SIGINT)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if mesh.mps_env:  # every client is down
            mps.stop(mesh.mps_env)
        sweep_orphans()  # /dev/shm weights files of a trainer killed before it could unlink them
        # Finished, failed or stopped, once every service is down: the report of what was trained
        # (stdout, so the error stays the last line on stderr).
        write_report(run_dir, mesh.timeline)


def _prepare_run_dir(cfg: Config, run_dir: Path, placement: str) -> Path:
    """The run directory, with the resolved config every service reads; returns its path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.train.load:  # a fresh run's records start empty; a resumed one appends
        for record in ("metrics.jsonl", "trained.jsonl", "dispatch.jsonl"):
            (run_dir / record).unlink(missing_ok=True)
    config_path = run_dir / "config.json"
    keep_password_out_of_config(cfg, run_dir)
    cfg.save_json(config_path)
    # The whole table goes to the run directory; the console gets one line of it and the placement.
    print(write_config_table(cfg, run_dir / "config.txt"), file=sys.stderr)
    print(placement, file=sys.stderr, flush=True)
    rotate_logs(run_dir / "logs")  # this run's logs hold this run only
    return config_path


def _wait_for_last_eval(cfg: Config, mesh: Mesh, console: Any, stop_signal: list[int]) -> None:
    """With --eval-prompt-data the coordinator evaluates the last version after the last step:
    the fleet stays up until its row is in eval.jsonl (at most EVAL_WAIT_S)."""
    if not cfg.data.eval_sets:
        return
    last = cfg.rollout.num_rollout // cfg.train.update_weights_interval
    path, deadline = Path(cfg.infra.run_dir) / "eval.jsonl", time.monotonic() + EVAL_WAIT_S
    while time.monotonic() < deadline and not stop_signal:
        if any(r.get("eval_version") == last for r in _read_metrics(path, 0)[0]):
            return
        mesh.check_others(skip=mesh.get("trainer"))
        time.sleep(POLL_S)
    console.print(f"eval: no evaluation of the last version ({last}) in {path}; stopping without it")


def _follow(cfg: Config, mesh: Mesh, relay: ConsoleRelay, console: Any, stop_signal: list[int]) -> None:
    """The progress bar, one update per metrics row, until the trainer exits cleanly; a dead
    service raises LaunchError (`mesh.supervise`), a stop signal KeyboardInterrupt."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    run_dir, offset = Path(cfg.infra.run_dir), 0
    with Progress(
        TextColumn("[bold]GRPO"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        refresh_per_second=2,  # the elapsed time; each metrics row refreshes it anyway
    ) as progress:
        task = progress.add_task("train", total=cfg.rollout.num_rollout, info="waiting for the first batch")
        while True:
            if stop_signal:
                raise KeyboardInterrupt
            relay.echo(progress.console)
            rows, offset = _read_metrics(run_dir / "metrics.jsonl", offset)
            for r in (r for r in rows if "eval_version" not in r):  # eval rows: the coordinator's
                if mesh.timeline.seconds("first step") is None:
                    mesh.timeline.mark("first step", step=r["step"])
                if r["step"] >= cfg.rollout.num_rollout:
                    mesh.timeline.mark("last step", step=r["step"])
                progress.update(
                    task,
                    completed=r["step"],
                    info=(
                        f"reward {_shown(r['reward_mean'])}  acc {_shown(r['accuracy'])}  "
                        f"{r['tokens_per_s']:.0f} tok/s  v{r['policy_version']}"
                    ),
                )
            if mesh.get("trainer").popen.poll() == 0:
                return
            mesh.supervise()
            time.sleep(FOLLOW_POLL_S)
