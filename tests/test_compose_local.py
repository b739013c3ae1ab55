"""deploy/docker-compose.yml, run as local processes: the same commands, environment and
mounted config file the containers get, on loopback, with a real (password-protected) Redis.

What a container would see is translated, nothing else: `slipstream ...` runs as
`python -m slipstream ...`; volume and secret mounts become temporary directories (the mounted
config file is the compose file's own, its container paths mapped to those directories); service
names and ports become 127.0.0.1 and free ports; the image's environment (SLIPSTREAM_HOST,
SLIPSTREAM_READY_FILE) and HEALTHCHECK come from deploy/docker/Dockerfile, and `depends_on:
condition: service_healthy` waits on that very healthcheck. The only additions are the tiny
model of tests/mesh_fixtures.py in the data directory and SLIPSTREAM_NUM_ROLLOUT.

While it trains, a third rollout server is started and one of the first two is killed: the new
one attaches and generates, the dead one's leases go to the others, and training goes on for
more steps before the trainer is stopped with SIGTERM (as `docker compose stop` would). Every
service's /metrics is scraped, and every series the Grafana dashboard plots is there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from machine_speed import scaled
from prometheus_client.parser import text_string_to_metric_families

from mesh_fixtures import build_prompts, build_tiny_model
from slipstream.buffer.embedded import EmbeddedRedis

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
pytestmark = pytest.mark.slow
NUM_STEPS = 1000  # longer than the test: it stops the run once scaling has been seen to work


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_env_and_healthcheck() -> tuple[dict[str, str], list[str]]:
    """The Dockerfile's runtime ENV (SLIPSTREAM_*) and HEALTHCHECK command."""
    text = (DEPLOY / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(dict(re.findall(r"(SLIPSTREAM_\w+)=(\S+)", line)))
    check = json.loads(re.search(r"HEALTHCHECK .*?CMD (\[.*\])", text).group(1))
    return env, check


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    env: dict[str, str]
    metrics_port: int

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


class LocalCompose:
    """Starts compose services as processes, translating what a container would see."""

    def __init__(self, compose: dict, tmp: Path, redis_url: str):
        self.compose = compose
        self.tmp = tmp
        self.image_env, self.healthcheck = image_env_and_healthcheck()
        self.procs: list[Proc] = []
        # Each service's gRPC port, as its command gives it, remapped to a free loopback port.
        self.ports = {
            name: (int(svc["command"][svc["command"].index("--port") + 1]), _free_port())
            for name, svc in compose["services"].items()
            if isinstance(svc.get("command"), list) and "--port" in svc["command"]
        }
        self.redis_url = redis_url
        self.mounts: dict[str, Path] = {}

    def mount(self, container_path: str, host_path: Path) -> None:
        self.mounts[container_path] = host_path

    def translate(self, value: str) -> str:
        for name, (port, local) in self.ports.items():
            value = value.replace(f"{name}:{port}", f"127.0.0.1:{local}")
        value = value.replace("redis://redis:6379/0", self.redis_url)
        for container_path, host_path in sorted(self.mounts.items(), key=lambda kv: -len(kv[0])):
            value = value.replace(container_path, str(host_path))
        return value

    def start(self, name: str, replica: int = 0, extra_env: dict[str, str] | None = None) -> Proc:
        svc = self.compose["services"][name]
        argv = [self.translate(a) for a in svc["command"]]
        assert argv[0] == "slipstream", argv
        argv = [sys.executable, "-m", "slipstream", *argv[1:]]
        tag = f"{name}-{replica}"
        env = {k: self.translate(str(v)) for k, v in (svc.get("environment") or {}).items()}
        env.update(self.image_env)
        metrics_port = _free_port()
        env.update(
            SLIPSTREAM_HOST="127.0.0.1",  # loopback only: no test traffic leaves the machine
            SLIPSTREAM_READY_FILE=str(self.tmp / "ready" / tag),
            SLIPSTREAM_METRICS_PORT=str(metrics_port),
            **(extra_env or {}),
        )
        if name in self.ports:  # replicas of one service each get their own loopback port
            argv[argv.index("--port") + 1] = str(self.ports[name][1] if replica == 0 else _free_port())
        log = self.tmp / "logs" / f"{tag}.log"
        log.parent.mkdir(exist_ok=True)
        (self.tmp / "ready").mkdir(exist_ok=True)
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        with log.open("wb") as f:
            popen = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=full_env, cwd=self.tmp)
        proc = Proc(tag, popen, log, full_env, metrics_port)
        self.procs.append(proc)
        return proc

    def wait_healthy(self, proc: Proc, timeout: float = 120) -> None:
        """Run the image's HEALTHCHECK command, in the service's environment, until it passes."""
        check = [sys.executable if a.startswith("python") else a for a in self.healthcheck]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert proc.popen.poll() is None, f"{proc.name} died:\n{proc.tail()}"
            if subprocess.run(check, env=proc.env, capture_output=True).returncode == 0:
                return
            time.sleep(0.5)
        raise AssertionError(f"{proc.name} not healthy after {timeout}s:\n{proc.tail()}")

    def stop_all(self) -> None:
        for p in self.procs:
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.popen.wait(timeout=scaled(15))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()


def scrape(proc: Proc) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def first(samples: dict, name: str) -> float | None:
    return next((v for (n, _), v in samples.items() if n == name), None)


def wait_for(what: str, predicate, procs: list[Proc], timeout: float = 120) -> None:
    """`predicate()` once true within `timeout` (an idle 2-core box's bound, scaled)."""
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        if predicate():
            return
        for p in procs:
            assert p.popen.poll() is None or p.popen.returncode == 0, f"{p.name} died:\n{p.tail()}"
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_compose_services_train_as_local_processes_and_rollout_scales(tmp_path):
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]

    # The mounts: config file, data, runs, the Redis password secret.
    data = tmp_path / "data"
    build_tiny_model(data / "model")
    build_prompts(data / "train.jsonl")
    runs = tmp_path / "runs"
    runs.mkdir()
    secret = tmp_path / "secrets" / "redis_password"
    secret.parent.mkdir()
    secret.write_text("s3cret-for-the-test\n")
    assert compose["secrets"]["redis_password"]["file"] == "./secrets/redis_password"

    with EmbeddedRedis(tmp_path / "redis", password="s3cret-for-the-test") as redis_server:
        # The services reach Redis by the compose URL (no password in it): the secret file fills it in.
        local = LocalCompose(compose, tmp_path, f"redis://127.0.0.1:{redis_server.port}/0")
        local.mount("/run/secrets/redis_password", secret)
        local.mount("/data", data)
        local.mount("/runs", runs)
        config_text = (DEPLOY / "config" / "config.yaml").read_text()
        mounted = tmp_path / "etc" / "config.yaml"
        mounted.parent.mkdir()
        mounted.write_text(local.translate(config_text))
        local.mount("/etc/slipstream/config.yaml", mounted)
        for name in ("reward", "coordinator", "rollout", "trainer"):
            vols = services[name].get("volumes", compose["x-slipstream"]["volumes"])
            assert "./config/config.yaml:/etc/slipstream/config.yaml:ro" in vols, name

        short = {"SLIPSTREAM_NUM_ROLLOUT": str(NUM_STEPS)}
        try:
            started: dict[str, list[Proc]] = {}
            # depends_on order, each dependency healthy first (redis is up already).
            for name in ("reward", "coordinator", "rollout", "trainer"):
                for dep, cond in (services[name].get("depends_on") or {}).items():
                    assert cond == {"condition": "service_healthy"}, (name, dep)
                    assert dep == "redis" or dep in started, (name, dep)
                replicas = services[name].get("deploy", {}).get("replicas", 1)
                started[name] = [local.start(name, i, short) for i in range(replicas)]
                if name != "trainer":
                    for p in started[name]:
                        local.wait_healthy(p)
            assert len(started["rollout"]) == 2
            coordinator, trainer = started["coordinator"][0], started["trainer"][0]
            everyone = local.procs

            def num_servers() -> float:
                return first(scrape(coordinator), "slipstream_coordinator_num_rollout_servers") or 0

            def trainer_step() -> float:
                try:
                    return first(scrape(trainer), "slipstream_trainer_step") or 0
                except OSError:  # its /metrics starts with the training loop
                    return 0

            wait_for("the first training step", lambda: trainer_step() >= 1, everyone, timeout=180)
            assert num_servers() == 2

            # Scale up: a third server attaches and gets work.
            third = local.start("rollout", 2, short)
            local.wait_healthy(third)
            wait_for("the third server to attach", lambda: num_servers() == 3, everyone)
            wait_for(
                "the third server to generate",
                lambda: (first(scrape(third), "slipstream_rollout_generated_tokens") or 0) > 0,
                everyone,
            )
            # Scale down: kill one of the first two while it holds leases; they go to the others.
            # (Frozen first: the tiny model finishes its work in milliseconds, a frozen server
            # keeps the leases the coordinator hands it until it dies.)
            metrics = {p.name: scrape(p) for p in everyone}
            victim = started["rollout"][0]
            victim.popen.send_signal(signal.SIGSTOP)
            time.sleep(scaled(3))  # a loaded box's coordinator takes longer to hand it leases
            victim.popen.kill()
            victim.popen.wait()
            wait_for("the coordinator to see it gone", lambda: num_servers() == 2, [coordinator, trainer])
            survivors = [p for p in everyone if p is not victim]
            step_at_kill = trainer_step()
            wait_for("3 more steps", lambda: trainer_step() >= step_at_kill + 3, survivors)
            trainer.popen.send_signal(signal.SIGTERM)  # stops between steps, checkpoints, exits 0
            assert trainer.popen.wait(timeout=scaled(120)) == 0, trainer.tail()
        finally:
            local.stop_all()

    run_dir = runs / "compose"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert len(rows) >= step_at_kill + 3
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] is False  # stopped early, on purpose
    # The servers at the end: the survivor and the newcomer, each on the last version or the one
    # before: a stopped trainer takes one look at the coordinator for its summary and does not wait
    # for its last push to land (loop.summarize); once a fresh clone's suite caught them at 51 of 52.
    assert len(summary["rollout_server_versions"]) == 2
    last = rows[-1]["policy_version"]
    assert set(summary["rollout_server_versions"].values()) <= {last - 1, last}, (summary, last)
    coordinator_log = coordinator.log.read_text()
    assert coordinator_log.count("attached (capacity") == 3
    released = re.search(rf":{victim.popen.pid} detached; (\d+) samples go to other servers", coordinator_log)
    assert released and int(released.group(1)) > 0, coordinator_log[-3000:]

    # Metrics, from every service, taken mid-run.
    c, r = metrics[coordinator.name], metrics["reward-0"]
    assert first(c, "slipstream_buffer_groups") >= 1
    assert first(c, "slipstream_buffer_pending") is not None
    assert {dict(labels)["server_id"] for (n, labels) in c if n == "slipstream_rollout_server_policy_version"}
    assert any(
        n == "slipstream_rpc_handled_total" and dict(labels).get("grpc_method") == "Score"
        for (n, labels) in r
    )
    assert first(metrics[third.name], "slipstream_rollout_generated_tokens") > 0
    assert first(metrics[trainer.name], "slipstream_trainer_tokens_per_s") > 0
    assert first(metrics[trainer.name], "slipstream_trainer_weight_push_seconds_count") >= 1

    # Every series the Grafana dashboard plots is exported by some service.
    exported = {n for samples in metrics.values() for (n, _) in samples}
    dashboard = json.loads((DEPLOY / "grafana" / "slipstream-dashboard.json").read_text())
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"slipstream_[a-z0-9_]+", target["expr"])
    }
    assert used - exported == set()


def test_redis_command_of_the_compose_file_runs_with_the_secret(tmp_path):
    """The compose file's redis command itself (sh -c ...), with a Redis-compatible server binary."""
    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    if binary is None:
        from slipstream.buffer.embedded import find_server_binary

        binary = find_server_binary()
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    script = compose["services"]["redis"]["command"][2]
    port = _free_port()
    secret = tmp_path / "redis_password"
    secret.write_text("pw-from-secret\n")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "redis-server").symlink_to(binary)
    script = (
        script.replace("$$", "$")  # compose's escape for a literal $
        .replace("/run/secrets/redis_password", str(secret))
        .replace("/tmp/auth.conf", str(tmp_path / "auth.conf"))
        .replace("--port 6379", f"--port {port} --bind 127.0.0.1")
        .replace("--dir /data", f"--dir {tmp_path}")
    )
    server = subprocess.Popen(
        ["sh", "-c", script],
        env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import redis

        deadline = time.monotonic() + scaled(20)
        while True:
            try:
                client = redis.Redis(port=port, password="pw-from-secret")
                assert client.ping()
                break
            except redis.exceptions.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=port, password="wrong").ping()
        config = client.config_get("appendonly")
        assert config["appendonly"] == "yes"
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        assert "pw-from-secret" not in " ".join(Path(f"/proc/{server.pid}/cmdline").read_text().split("\0"))
    finally:
        server.terminate()
        server.wait(timeout=scaled(10))
