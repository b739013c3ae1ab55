"""Services as separate processes, started one by one so a test can hurt exactly one of them.

The launcher stops the whole run when any service dies (its contract for one machine); the
chaos suite needs the opposite: kill or stop one process and watch the others cope. So this
starts each service itself, with the same command line the launcher uses, one shared config
file, real Redis (the session's `redis_url`), real gRPC on loopback, and, unless told
otherwise, token authentication on (`--auth-token-file`, `--trainer-token-file`), so every
chaos test also runs the mesh the way a secured deployment does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from machine_speed import scaled

from slipstream.config import config_from_values
from slipstream.rpc import security

MESH_TOKEN, TRAINER_TOKEN = "chaos-mesh-token-5f0c1e", "chaos-trainer-token-9a7b3d"


def tiny_values(model: Path, prompts: Path, run_dir: Path, redis_url: str, **over) -> dict:
    values = {
        "hf_checkpoint": str(model),
        "prompt_data": str(prompts),
        "run_dir": str(run_dir),
        "redis_url": redis_url,
        "rollout_batch_size": 4,
        "n_samples_per_prompt": 4,
        "num_rollout": 3,
        "rollout_max_response_len": 4,
        "global_batch_size": 8,
        "micro_batch_size": 8,
        "lr": 1e-3,
        "rpc_timeout": 10.0,
        "run_id": f"chaos-{uuid.uuid4().hex[:10]}",  # tests share one Redis: keys never meet
    }
    values.update(over)
    return values


@dataclass
class Service:
    name: str
    popen: subprocess.Popen
    log_path: Path
    port: int = 0

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class ChaosMesh:
    run_dir: Path
    values: dict
    auth: bool = True
    services: dict[str, Service] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.auth:
            secrets = self.run_dir / "secrets"
            secrets.mkdir(exist_ok=True)
            (secrets / "token").write_text(MESH_TOKEN + "\n")
            (secrets / "trainer-token").write_text(TRAINER_TOKEN + "\n")
            self.values.setdefault("auth_token_file", str(secrets / "token"))
            self.values.setdefault("trainer_token_file", str(secrets / "trainer-token"))
        self.cfg = config_from_values(self.values)
        self.config_path = self.run_dir / "config.json"
        self.cfg.save_json(self.config_path)

    def start(self, name: str, module: str, *extra: str, wait: bool = True) -> Service:
        logs = self.run_dir / "logs"
        ports = self.run_dir / "ports"
        logs.mkdir(exist_ok=True)
        ports.mkdir(exist_ok=True)
        ready = ports / f"{name}.port"
        ready.unlink(missing_ok=True)
        argv = [
            sys.executable, "-m", f"slipstream.services.{module}", "--config", str(self.config_path),
            "--host", "127.0.0.1", "--port", "0", "--torch-threads", "1", "--ready-file", str(ready),
            *extra,
        ]  # fmt: skip
        log_path = logs / f"{name}.log"
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        service = Service(name, popen, log_path)
        self.services[name] = service
        if wait:
            deadline = time.monotonic() + scaled(90)
            while not (ready.exists() and ready.read_text().strip()):
                if not service.alive():
                    raise RuntimeError(f"{name} died at start:\n{service.log()[-3000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} not ready:\n{service.log()[-3000:]}")
                time.sleep(0.05)
            service.port = int(ready.read_text())
        return service

    def start_reward(self) -> Service:
        return self.start("reward", "reward")

    def start_coordinator(self) -> Service:
        return self.start("coordinator", "coordinator", "--reward-addr", self.services["reward"].addr)

    def start_rollout(self, i: int, wait: bool = True) -> Service:
        """Rollout server `rollout-{i}`; wait=False returns at once (start several together, so all
        are attached before the work runs out)."""
        coord = self.services["coordinator"].addr
        return self.start(
            f"rollout-{i}", "rollout", "--coordinator-addr", coord, "--server-id", f"rollout-{i}", wait=wait
        )

    def start_trainer(self) -> Service:
        return self.start("trainer", "trainer", "--coordinator-addr", self.services["coordinator"].addr)

    def client_settings(self, role: str = "client") -> security.Settings:
        """Security settings of a client of this mesh (the trainer's when role='trainer')."""
        return security.settings_from_config(self.cfg, role) if self.auth else security.Settings()

    def stop(self) -> None:
        for s in reversed(list(self.services.values())):
            if s.alive():
                s.popen.send_signal(signal.SIGTERM)
        for s in self.services.values():
            try:
                s.popen.wait(timeout=scaled(10))
            except subprocess.TimeoutExpired:
                s.popen.kill()
                s.popen.wait()

    def metrics(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def health_status(addr: str, timeout: float = 2.0) -> str:
    """SERVING / NOT_SERVING, or the gRPC code name when the service does not answer."""
    with grpc.insecure_channel(addr) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.RpcError as e:
            return e.code().name  # type: ignore[attr-defined]
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    """`predicate()` once truthy; TimeoutError past `timeout` (an idle 2-core box's bound, scaled)."""
    timeout = scaled(timeout)
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout:.0f}s")
        time.sleep(interval)
