"""One machine, one command: every service as its own process, supervised.

`slipstream train` (and `python train.py`) checks what would fail later (`preflight`), resolves
the config and where the processes land on this host's GPUs, writes the config into the run
directory and starts an embedded Redis/Valkey (unless `--redis-url`), then, all at once, the
reward service, the coordinator, `--rollout-num-servers` rollout servers and the trainer
(`start_mesh`): the reward service and the coordinator get loopback ports picked here (below the
kernel's ephemeral range, so no outgoing connection takes one before its service binds it), so
every address is known before anything is up, and each service waits for what it dials (the
coordinator for the reward service, rollout servers and the trainer for the coordinator). How
each process is started, supervised and stopped is `processes.py`.

The launcher then follows: a live progress line from `metrics.jsonl`; success when the trainer
exits 0, after which everything else stops at once (Redis last). On Ctrl-C/SIGTERM it stops in
order (`Mesh.stop_in_order`: the trainer saves and commits what it trained); a second Ctrl-C
kills everything. If a service dies it stops the others the same way (the trainer's save
bounded by the grace period) and exits non-zero naming the dead service and the tail of its log;
with `--max-restarts N` it restarts the service instead (`Mesh.supervise`).

`<run-dir>/timeline.json` records when the launch began, when each service was ready, the first
and last steps, and when everything had stopped; the run report is written after that, in a
child process with a time bound.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Collection
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
from slipstream.processes import (
    POLL_S,
    LaunchError,
    Mesh,
    Proc,
    Timeline,
    listen_port,
    process_start,
    read_metrics,
)
from slipstream.report import report_at_end
from slipstream.shm_files import sweep_orphans

SAVE_TIMEOUT_S = 600.0  # a stop asked for (Ctrl-C, SIGTERM): the trainer's last step and checkpoint
REPORT_TIMEOUT_S = 60.0  # the run report, written once every service is down
LAUNCHER_ATTACH_GRACE_S = 20.0  # --rollout-attach-grace when the launcher starts the servers
# While training, the launcher only follows: a metrics row a step, logs, deaths. Polling at 20 Hz
# burned ~0.015 cores (issue 14: 0.05 CPU s of a 2-core box's step); 4 Hz is soon enough for each.
FOLLOW_POLL_S = 0.25
EVAL_WAIT_S = 300.0  # after the last step, for the evaluation of the last version


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
    launched = process_start()
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
        if any(r.get("eval_version") == last for r in read_metrics(path, 0)[0]):
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
            rows, offset = read_metrics(run_dir / "metrics.jsonl", offset)
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
