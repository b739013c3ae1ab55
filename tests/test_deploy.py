"""deploy/: what can be checked without a cluster or a container runtime.

- The compose files: `docker-compose config` (Debian's docker-compose, when installed) accepts
  them, alone and with the GPU override and the monitoring profile; and they say what the design
  needs (Redis with AOF, a named volume and a password secret, health-gated depends_on, scaled
  rollout replicas, GPUs reserved for trainer and rollout).
- Kubernetes: every manifest and the rendered cpu/gpu overlays validate against the API schemas
  of a pinned Kubernetes version, offline (`kubernetes-validate`). The overlays are rendered by
  a small kustomize renderer here (resources, namespace, images, strategic-merge patches), and
  when `kubectl` is on PATH its `kubectl kustomize` output must equal ours.
- Every command in them is a real entry point (`--help` answers) whose flags all exist, and
  every SLIPSTREAM_* variable they set names a real config field.
- Config from the environment, the Redis password file, the remote reward auth header file,
  and the health probe's failure modes.
"""

from __future__ import annotations

import copy
import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from slipstream.config import FIELDS, build_parser, parse_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.32"  # the schemas every manifest is checked against (pinned)


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# ---- a small kustomize -----------------------------------------------------------------------

MERGE_BY_NAME = {"containers", "initContainers", "env", "volumes", "volumeMounts", "ports"}


def strategic_merge(base: dict, patch: dict) -> None:
    """Kubernetes' strategic merge for what our overlays patch: maps merge, named lists merge by name."""
    for key, value in patch.items():
        old = base.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            strategic_merge(old, value)
        elif key in MERGE_BY_NAME and isinstance(value, list) and isinstance(old, list):
            # The patch's items first (merged into their namesakes), then the base's others.
            merged = []
            for item in value:
                match = next((o for o in old if o.get("name") == item.get("name")), None)
                if match is not None:
                    strategic_merge(match, item)
                merged.append(match if match is not None else copy.deepcopy(item))
            base[key] = merged + [o for o in old if all(o is not m for m in merged)]
        else:
            base[key] = copy.deepcopy(value)


def pod_containers(resource: dict) -> list[dict]:
    spec = resource.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def kustomize(directory: Path) -> list[dict]:
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    allowed = {"apiVersion", "kind", "namespace", "resources", "images", "patches"}
    assert set(k) <= allowed, f"{directory}: the test's renderer does not know {set(k) - allowed}"
    resources: list[dict] = []
    for entry in k.get("resources", []):
        path = directory / entry
        resources += kustomize(path) if path.is_dir() else load_all(path)
    for patch in k.get("patches", []):
        assert set(patch) == {"path"}, patch
        for p in load_all(directory / patch["path"]):
            (target,) = [
                r
                for r in resources
                if r["kind"] == p["kind"] and r["metadata"]["name"] == p["metadata"]["name"]
            ]
            strategic_merge(target, p)
    for image in k.get("images", []):
        for r in resources:
            for c in pod_containers(r):
                if re.split(r"[:@]", c["image"])[0] == image["name"]:
                    c["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    if "namespace" in k:
        for r in resources:
            r["metadata"]["namespace"] = k["namespace"]
    return resources


def by_key(resources: list[dict]) -> dict[tuple[str, str], dict]:
    return {(r["kind"], r["metadata"]["name"]): r for r in resources}


OVERLAYS = ["cpu", "gpu"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_our_renderer_matches_kubectl_kustomize(overlay):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed; the Python renderer alone renders the overlays")
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    theirs = by_key([d for d in yaml.safe_load_all(out.stdout) if d])
    ours = by_key(kustomize(K8S / "overlays" / overlay))
    assert sorted(theirs) == sorted(ours)
    for key in ours:
        assert ours[key] == theirs[key], key


# ---- Kubernetes schemas ----------------------------------------------------------------------


def validate(resource: dict) -> None:
    import kubernetes_validate

    if resource["apiVersion"].startswith("monitoring.coreos.com/"):
        # A CRD: no upstream schema; check the fields Prometheus Operator needs.
        assert resource["kind"] == "ServiceMonitor"
        assert resource["spec"]["selector"]["matchLabels"]
        assert all(e["port"] for e in resource["spec"]["endpoints"])
        return
    kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def manifest_files() -> list[Path]:
    files = sorted((K8S / "base").glob("*.yaml"))
    return [f for f in files if f.name != "kustomization.yaml"]


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_every_manifest_validates(path):
    for resource in load_all(path):
        validate(resource)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_overlays_validate_and_hold_together(overlay):
    resources = kustomize(K8S / "overlays" / overlay)
    for r in resources:
        validate(r)
    index = by_key(resources)
    kinds = {k for k, _ in index}
    assert {"StatefulSet", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds
    assert {"ConfigMap", "PersistentVolumeClaim", "ServiceMonitor"} <= kinds
    assert index[("StatefulSet", "redis")]["spec"]["volumeClaimTemplates"]
    assert (
        index[("StatefulSet", "trainer")]["spec"]["template"]["spec"]["containers"][0]["command"][0]
        == "torchrun"
    )
    assert index[("HorizontalPodAutoscaler", "rollout")]["spec"]["scaleTargetRef"]["name"] == "rollout"
    # Every PDB and Service selects pods that exist; every gRPC container has probes and resources.
    pod_labels = [
        r["spec"]["template"]["metadata"]["labels"]
        for r in resources
        if r["kind"] in ("Deployment", "StatefulSet")
    ]
    for r in resources:
        if r["kind"] in ("PodDisruptionBudget", "Service"):
            selector = r["spec"]["selector"].get("matchLabels", r["spec"]["selector"])
            assert any(selector.items() <= labels.items() for labels in pod_labels), r["metadata"]["name"]
        for c in pod_containers(r):
            assert c["resources"]["requests"] and c["resources"]["limits"], c["name"]
            assert "readinessProbe" in c and "livenessProbe" in c, c["name"]
            if c["name"] != "redis":
                assert c["readinessProbe"]["grpc"]["port"] == c["ports"][0]["containerPort"], c["name"]
                assert c["image"].startswith("registry.example.com/slipstream:"), c["name"]
    # Secrets are referenced, never shipped.
    assert "Secret" not in kinds
    secret_names = {s["metadata"]["name"] for s in load_all(K8S / "base" / "secrets.example.yaml")}
    for r in resources:
        for v in r.get("spec", {}).get("template", {}).get("spec", {}).get("volumes", []):
            if "secret" in v:
                assert v["secret"]["secretName"] in secret_names
    if overlay == "gpu":
        trainer = index[("StatefulSet", "trainer")]["spec"]["template"]["spec"]["containers"][0]
        assert trainer["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert "--nproc-per-node=8" in trainer["command"]
        reward_env = {
            e["name"]
            for e in index[("Deployment", "reward")]["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        assert {"SLIPSTREAM_RM_URL", "SLIPSTREAM_RM_AUTH_HEADER_FILE", "SLIPSTREAM_RM_TIMEOUT"} <= reward_env


# ---- compose ---------------------------------------------------------------------------------


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


@pytest.mark.parametrize(
    "files", [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]], ids=["cpu", "gpu"]
)
def test_docker_compose_config_accepts_the_files(files, tmp_path):
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose not installed (Debian: apt-get install docker-compose)")
    argv = [binary, "--project-directory", str(DEPLOY)]
    for f in files:
        argv += ["-f", str(DEPLOY / f)]
    out = subprocess.run(
        [*argv, "--profile", "monitoring", "config"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    assert {"redis", "reward", "coordinator", "rollout", "trainer", "prometheus", "grafana"} <= set(
        resolved["services"]
    )


def test_compose_file_says_what_the_design_needs():
    c = compose()
    s = c["services"]
    redis_cmd = " ".join(s["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "requirepass" in redis_cmd
    assert "redis-data:/data" in s["redis"]["volumes"] and "redis-data" in c["volumes"]
    assert "redis_password" in s["redis"]["secrets"] and "redis_password" in c["secrets"]
    assert s["coordinator"]["depends_on"] == {
        "redis": {"condition": "service_healthy"},
        "reward": {"condition": "service_healthy"},
    }
    assert s["rollout"]["deploy"]["replicas"] >= 2
    for name in ("reward", "coordinator", "rollout", "trainer"):
        assert s[name]["environment"]["SLIPSTREAM_REDIS_PASSWORD_FILE"] == "/run/secrets/redis_password"
        assert "redis_password" in s[name]["secrets"]
    gpu = yaml.safe_load((DEPLOY / "docker-compose.gpu.yml").read_text())["services"]
    for name in ("trainer", "rollout"):
        (device,) = gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"


def test_dockerfiles_are_multi_stage_non_root_and_health_checked():
    for name in ("Dockerfile", "Dockerfile.gpu"):
        text = (DEPLOY / "docker" / name).read_text()
        stages = re.split(r"^FROM ", text, flags=re.M)[1:]
        assert len(stages) == 2, name
        final = stages[-1]
        assert "COPY --from=build /opt/slipstream" in final
        assert re.search(r"^USER slipstream$", final, re.M)
        assert "build-essential" not in final and "pip install" not in final
        assert '"-m", "slipstream.rpc.health_probe"' in final
    assert (ROOT / ".dockerignore").read_text().startswith("#")


# ---- every command is a real entry point -----------------------------------------------------


def commands() -> list[list[str]]:
    """Every command line in the compose files and the rendered Kubernetes overlays."""
    found = []
    for f in ("docker-compose.yml", "docker-compose.gpu.yml"):
        for svc in yaml.safe_load((DEPLOY / f).read_text())["services"].values():
            if isinstance(svc.get("command"), list) and svc["command"][0] != "sh":
                found.append(svc["command"])
    for overlay in OVERLAYS:
        for r in kustomize(K8S / "overlays" / overlay):
            for c in pod_containers(r):
                if c["command"][0] != "sh":
                    found.append(c["command"])
    return found


def entry(command: list[str]) -> tuple[list[str], list[str]]:
    """(the argv that runs the entry point with this interpreter, the flags after it)."""
    if command[0] == "slipstream":
        return [sys.executable, "-m", "slipstream", command[1]], command[2:]
    assert command[0] == "torchrun", command
    module = command.index("-m") + 1
    return [sys.executable, "-m", command[module]], command[module + 1 :]


def test_every_command_is_a_real_entry_point_with_real_flags():
    cmds = commands()
    assert len(cmds) >= 8
    entries = {tuple(entry(c)[0]) for c in cmds}
    assert len(entries) >= 4
    for argv in sorted(entries):
        out = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "--config" in out.stdout, (argv, out.stderr[-500:])
    parser = build_parser()
    for c in cmds:
        _, flags = entry(c)
        _, unknown = parser.parse_known_args(flags)
        assert unknown == [], (c, unknown)
    image_cmd = subprocess.run(
        [sys.executable, "-m", "slipstream.rpc.health_probe", "--help"], capture_output=True, timeout=30
    )
    assert image_cmd.returncode == 0


def test_every_slipstream_variable_is_a_config_field():
    names: set[str] = set()
    for path in [
        DEPLOY / "docker-compose.yml",
        DEPLOY / "docker-compose.gpu.yml",
        *sorted(K8S.rglob("*.yaml")),
    ]:
        names |= set(re.findall(r"\bSLIPSTREAM_[A-Z0-9_]+", path.read_text()))
    for path in (DEPLOY / "docker").glob("Dockerfile*"):
        names |= set(re.findall(r"\bSLIPSTREAM_[A-Z0-9_]+", path.read_text()))
    names -= {
        "SLIPSTREAM_LOG_LEVEL",
        "SLIPSTREAM_IMAGE",
        "SLIPSTREAM_GPU_IMAGE",
    }  # logging; compose's image choice
    assert names
    unknown = {n for n in names if n[len("SLIPSTREAM_") :].lower() not in FIELDS}
    assert unknown == set()


def test_config_files_parse(tmp_path):
    cfg = parse_config(["--config", str(DEPLOY / "config" / "config.yaml")])
    assert cfg.infra.run_id == "compose" and cfg.model.hf_checkpoint == "/data/model"
    (cm,) = [
        d for d in load_all(K8S / "base" / "config.yaml") if d["metadata"]["name"] == "slipstream-config"
    ]
    k8s_file = tmp_path / "config.yaml"
    k8s_file.write_text(cm["data"]["config.yaml"])
    assert parse_config(["--config", str(k8s_file)]).infra.run_id == "slipstream"


def test_grafana_dashboard_is_valid_json_with_queries():
    dashboard = json.loads((DEPLOY / "grafana" / "slipstream-dashboard.json").read_text())
    assert dashboard["uid"] == "slipstream"
    assert all(p["targets"] and all(t["expr"] for t in p["targets"]) for p in dashboard["panels"])


# ---- config from the environment, secrets from files -------------------------------------------


def test_environment_sits_between_the_config_file_and_flags(tmp_path, monkeypatch):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("rollout_batch_size: 4\nport: 1\nuse_tis: false\n")
    monkeypatch.setenv("SLIPSTREAM_PORT", "2")
    monkeypatch.setenv("SLIPSTREAM_USE_TIS", "true")
    monkeypatch.setenv("SLIPSTREAM_ROLLOUT_STOP_TOKEN_IDS", "5, 6")
    monkeypatch.setenv("SLIPSTREAM_LOG_LEVEL", "DEBUG")  # not a field: left alone
    cfg = parse_config(["--config", str(cfg_file), "--rollout-batch-size", "8"])
    assert cfg.infra.port == 2 and cfg.algo.use_tis is True
    assert cfg.rollout.rollout_stop_token_ids == [5, 6]
    assert cfg.rollout.rollout_batch_size == 8  # the flag wins over the file
    assert parse_config(["--config", str(cfg_file), "--port", "3"]).infra.port == 3  # and over the env


@pytest.mark.parametrize(
    "name, value, needle",
    [
        ("SLIPSTREAM_PORT", "eighty", "SLIPSTREAM_PORT='eighty': invalid int value"),
        ("SLIPSTREAM_USE_TIS", "maybe", "SLIPSTREAM_USE_TIS='maybe': expected true or false"),
        ("SLIPSTREAM_ROLLOUT_ENGINE", "vllm", "SLIPSTREAM_ROLLOUT_ENGINE='vllm': invalid choice"),
        ("SLIPSTREAM_REDIS_PASSWORD_FILE", "/nope", "--redis-password-file needs --redis-url"),
    ],
)
def test_bad_environment_is_one_line(name, value, needle):
    out = subprocess.run(
        [sys.executable, "-m", "slipstream", "coordinator"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", name: value},
        timeout=60,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slipstream coordinator: error: "), out.stderr
    assert needle in lines[0]


def test_redis_password_file_fills_the_url(tmp_path, monkeypatch):
    secret = tmp_path / "pw"
    secret.write_text("p@ss/word\n")
    monkeypatch.setenv("SLIPSTREAM_REDIS_URL", "redis://redis:6379/0")
    monkeypatch.setenv("SLIPSTREAM_REDIS_PASSWORD_FILE", str(secret))
    cfg = parse_config([])
    assert cfg.infra.redis_connect_url == "redis://:p%40ss%2Fword@redis:6379/0"
    assert "p@ss" not in json.dumps(cfg.to_dict())  # the secret is never part of the config
    import redis

    assert (
        redis.Redis.from_url(cfg.infra.redis_connect_url).connection_pool.connection_kwargs["password"]
        == "p@ss/word"
    )


def test_remote_reward_sends_the_auth_header_from_its_file(tmp_path):
    from slipstream.services.reward import RewardConfigError
    from slipstream.services.reward.remote import RemoteReward, read_header_file

    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(self.headers.get("Authorization"))
            ok = self.headers.get("Authorization") == "Bearer t0ken"
            self.send_response(200 if ok else 401)
            self.end_headers()
            self.wfile.write(b"1.0" if ok else b"no")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        header = tmp_path / "header"
        header.write_text("Authorization: Bearer t0ken\n")
        url = f"http://127.0.0.1:{server.server_port}/score"
        rm = RemoteReward(url, timeout=5, max_retries=0, headers=read_header_file(str(header)))
        assert rm.score_payload({"prompt": "1+1=", "response": "2", "label": "2"}) == 1.0
        bare = RemoteReward(url, timeout=5, max_retries=0)
        with pytest.raises(RuntimeError, match="HTTP 401"):
            bare.score_payload({"prompt": "1+1=", "response": "2", "label": "2"})
        assert seen == ["Bearer t0ken", None]
    finally:
        server.shutdown()
    bad = tmp_path / "bad"
    bad.write_text("no colon here\n")
    with pytest.raises(RewardConfigError, match="expected one line `Name: value`"):
        read_header_file(str(bad))


def test_health_probe_fails_with_one_line(tmp_path):
    probe = [sys.executable, "-m", "slipstream.rpc.health_probe"]
    out = subprocess.run(probe, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, timeout=30)
    assert out.returncode == 1 and "SLIPSTREAM_READY_FILE is not set" in out.stderr
    env = {"PATH": "/usr/bin:/bin", "SLIPSTREAM_READY_FILE": str(tmp_path / "none")}
    out = subprocess.run(probe, capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 1 and "not serving yet" in out.stderr
    out = subprocess.run(
        [*probe, "127.0.0.1:9", "--timeout", "1"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.startswith("unhealthy: 127.0.0.1:9: ")
