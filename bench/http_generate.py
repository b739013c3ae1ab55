"""SGLang's HTTP `/generate` against `Rollout.Generate` (gRPC) on one rollout server process.

    .venv/bin/python bench/http_generate.py [--requests 200] [--seconds 10] [--clients 8 64]
    sh scripts/gpu_env.sh run python3 bench/http_generate.py --shape qwen3-0.6b --device cuda --out $OUT/http_generate_gpu.json

One rollout server (demo model shape, random weights, --torch-threads 1; or `--shape qwen3-0.6b`:
the Qwen3-0.6B shape with a word-level tokenizer over its 151,936 ids, random bf16 weights, on
`--device`) serves both paths from the same engine thread. Latency: one client, one prompt, greedy, 8 new tokens, the same tokens on both
paths; median and p90 of `--requests` calls each, alternated. Throughput: N concurrent clients, each
sending one prompt at a time (an agent's turn) at temperature 1 with its own seeds, for `--seconds`
per path; generated tokens/s. The clients run on the same box as the server (say its load:
`uptime`). Writes bench/results/http_generate.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, tmp: Path, http_port: int, device: str) -> tuple[subprocess.Popen, int]:
    ready = tmp / "port"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "slipstream.services.rollout",
            "--hf-checkpoint",
            str(model),
            "--port",
            "0",
            "--ready-file",
            str(ready),
            "--http-port",
            str(http_port),
            "--rollout-max-batch-size",
            "64",
            "--rollout-max-prompt-len",
            "32",
            "--rollout-max-response-len",
            "64",
            "--torch-threads",
            "1",
            "--device",
            device,
        ],
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300  # a GPU server captures its CUDA graphs first
    while not (ready.exists() and ready.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("rollout server did not start")
        time.sleep(0.05)
    return proc, int(ready.read_text())


async def latency(url: str, grpc_addr: str, ids: list[int], n: int) -> dict:
    import aiohttp

    from slipstream.proto import rollout_pb2, rollout_pb2_grpc, types_pb2
    from slipstream.rpc.channel import aio_channel

    stub = rollout_pb2_grpc.RolloutStub(aio_channel(grpc_addr))
    req = rollout_pb2.GenerateRequest(
        samples=[types_pb2.Sample(uid="b", tokens=ids)],
        sampling=types_pb2.SamplingParams(temperature=0.0, max_new_tokens=8),
    )
    body = {
        "input_ids": ids,
        "sampling_params": {"temperature": 0.0, "max_new_tokens": 8},
        "return_logprob": True,
    }
    times: dict[str, list[float]] = {"http": [], "grpc": []}
    async with aiohttp.ClientSession() as s:
        for i in range(n + 10):  # the first 10 of each warm up
            t0 = time.perf_counter()
            async with s.post(f"{url}/generate", json=body) as r:
                out = await r.json()
            t1 = time.perf_counter()
            reply = await stub.Generate(req, timeout=30)
            t2 = time.perf_counter()
            assert list(reply.samples[0].tokens[len(ids) :]) == out["output_ids"]
            if i >= 10:
                times["http"].append(t1 - t0)
                times["grpc"].append(t2 - t1)
    res = {}
    for k, v in times.items():
        v.sort()
        res[k] = {"median_ms": 1e3 * statistics.median(v), "p90_ms": 1e3 * v[int(0.9 * len(v))]}
    res["added_median_ms"] = res["http"]["median_ms"] - res["grpc"]["median_ms"]
    res["new_tokens"] = len(out["output_ids"])
    return res


async def throughput(
    url: str, grpc_addr: str, ids: list[int], clients: int, seconds: float, path: str
) -> dict:
    import aiohttp

    from slipstream.proto import rollout_pb2, rollout_pb2_grpc, types_pb2
    from slipstream.rpc.channel import aio_channel

    tokens, calls = 0, 0
    stop = time.perf_counter() + seconds
    stub = rollout_pb2_grpc.RolloutStub(aio_channel(grpc_addr))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as s:

        async def agent(c: int) -> None:
            nonlocal tokens, calls
            i = 0
            while time.perf_counter() < stop:
                seed = 1 + c * 100_000 + i
                i += 1
                if path == "http":
                    sp = {"temperature": 1.0, "max_new_tokens": 32, "sampling_seed": seed}
                    body = {"input_ids": ids, "sampling_params": sp, "return_logprob": True}
                    async with s.post(f"{url}/generate", json=body) as r:
                        n = len((await r.json())["output_ids"])
                else:
                    sp = types_pb2.SamplingParams(temperature=1.0, max_new_tokens=32, seed=seed)
                    req = rollout_pb2.GenerateRequest(
                        samples=[types_pb2.Sample(uid="b", tokens=ids)], sampling=sp
                    )
                    n = (await stub.Generate(req, timeout=60)).samples[0].response_length
                tokens += n
                calls += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(agent(c) for c in range(clients)))
        dt = time.perf_counter() - t0
    return {"tokens_per_s": tokens / dt, "requests_per_s": calls / dt, "tokens": tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--clients", type=int, nargs="+", default=[8, 64])
    p.add_argument(
        "--shape", choices=["demo", "qwen3-0.6b"], default="demo", help="The served model's shape."
    )
    p.add_argument("--device", default="cpu", help="The rollout server's --device (cpu or cuda).")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "http_generate.json"))
    args = p.parse_args()
    from engine_cpu import build_model

    from slipstream.models.hf import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        if args.shape == "demo":
            model = build_model(Path(tmp) / "model")
            ids = load_tokenizer(model)("12+34=", add_special_tokens=False)["input_ids"]
        else:  # the GPU benches' 0.6B checkpoint; a 16-token prompt of its word-level ids
            from mesh_gpu import build_checkpoint

            model = Path(tmp) / "model"
            build_checkpoint(model, 0)
            ids = list(range(1000, 1016))
        http_port = _free_port()
        proc, grpc_port = start_server(model, Path(tmp), http_port, args.device)
        url, grpc_addr = f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
        try:
            result = {
                "shape": args.shape,
                "device": args.device,
                "load_before": os.getloadavg(),
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "latency": asyncio.run(latency(url, grpc_addr, ids, args.requests)),
                "throughput": {},
            }
            for c in args.clients:
                row = {}
                for path in ("grpc", "http"):
                    row[path] = asyncio.run(throughput(url, grpc_addr, ids, c, args.seconds, path))
                row["http_over_grpc"] = row["http"]["tokens_per_s"] / row["grpc"]["tokens_per_s"]
                result["throughput"][str(c)] = row
            result["load_after"] = os.getloadavg()
        finally:
            proc.terminate()
            proc.wait(15)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
