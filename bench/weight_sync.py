"""Weight-sync seconds, end to end, for a Qwen3-0.6B-shaped version to N rollout servers, per transport.

    python bench/weight_sync.py [--shape 0.6b|demo] [--receivers 2] [--repeats 3] [--formats fp8]
        [--transports bytes-hashing-relay bytes shm ipc] [--out bench/results/weight_sync_cpu.json]

Processes, as in the mesh: a *sender* (the trainer: holds the model; `WeightPusher`'s work: pack
with the transport's exporter, push with a blocking stub), a *relay* (the coordinator's weight
handlers around the real `receive_push`/`WeightRelay`) and --receivers *receivers* (rollout
servers: `FetchWeights` -> `WeightStager` on the engine's device and dtype ->
`NativeEngine.load_weights`, every version checked end to end). Each receiver asks for the version
as the mesh's NewWeights notice lets it (from the manifest on: cut-through), so a row's **total**
is push start (before pack) -> the last receiver serving it, and GB/s is the version's bytes over
that. This orchestrating process only sends commands and collects timestamps (perf_counter:
CLOCK_MONOTONIC, one clock for every process of the host).

Transports:
  bytes-hashing-relay  the byte path as it was before issue 20: the relay re-hashed every chunk
                       (on its pool, 16 in flight) before releasing it to fetchers (a reference
                       kept in this file, like the ones before it)
  bytes                the byte path as it ships: hashed once by `pack` (all cores), checked once
                       by each receiver, relayed without hashing
  shm                  one /dev/shm file (`ShmExporter`), manifest + document through the relay,
                       each receiver maps it and checks every chunk
  broadcast            a gloo broadcast from the sender (rank 0, `BroadcastExporter`) to the
                       receivers (`BroadcastReceiver`, the group kept across versions), manifest +
                       document through the relay; each receiver checks every chunk
  ipc                  CUDA IPC handles (GPU only; every receiver on the sender's GPU)
Rows are the median and the range of --repeats after one warm-up. Models are bf16 (on the CPU too:
the stager dequantizes FP8 into the engine's dtype, so a bf16 receiver's stage is not an fp32 one's).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import grpc
import torch

from slipstream.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from slipstream.proto import coordinator_pb2, coordinator_pb2_grpc
from slipstream.rpc.channel import aio_channel, sync_channel
from slipstream.rpc.server import run_async, start_server
from slipstream.services.coordinator.weights_relay import PushError, WeightRelay, receive_push
from slipstream.services.rollout.engine import NativeEngine
from slipstream.weights import IpcExporter, ShmExporter, WeightStager, iter_messages, pack, weights_to_sync
from slipstream.weights.broadcast import BroadcastExporter, BroadcastReceiver
from slipstream.weights.packer import hash_pool

SHAPES = {
    "0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "demo": dict(vocab_size=20, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True),
}  # fmt: skip
TRANSPORTS = ("bytes-hashing-relay", "bytes", "shm", "broadcast", "ipc")


# ---- the relay process (the coordinator) --------------------------------------------------------


async def _hashing(messages):
    """The relay's check before issue 20 (reference): each chunk's sha256 on the pool, released in
    order once it matched, at most 16 in flight."""
    loop, pending, manifest = asyncio.get_running_loop(), deque(), None
    async for msg in messages:
        if msg.WhichOneof("kind") == "manifest":
            manifest = msg.manifest
            yield msg
            continue
        data = msg.chunk.data
        pending.append((msg, loop.run_in_executor(hash_pool(), lambda d=data: hashlib.sha256(d).hexdigest())))
        while pending and (len(pending) > 16 or pending[0][1].done()):
            head, digest = pending.popleft()
            if await digest != manifest.chunk_sha256[head.chunk.index]:
                raise PushError(f"chunk {head.chunk.index}: sha256 does not match the manifest")
            yield head
    while pending:
        head, digest = pending.popleft()
        if await digest != manifest.chunk_sha256[head.chunk.index]:
            raise PushError(f"chunk {head.chunk.index}: sha256 does not match the manifest")
        yield head


class Relay(coordinator_pb2_grpc.CoordinatorServicer):
    """The coordinator's PushWeights/FetchWeights (services/coordinator/server.py), less the notices."""

    def __init__(self) -> None:
        self.relay = WeightRelay()

    async def PushWeights(self, request_iterator, context):  # noqa: N802
        hashing = dict(context.invocation_metadata()).get("relay") == "hashing"
        messages = _hashing(request_iterator) if hashing else request_iterator
        try:
            stored = await receive_push(
                messages, self.relay.floor, on_manifest=self.relay.begin, byte_form_of=self.relay.byte_form_of
            )
            self.relay.commit(stored)
        except PushError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return coordinator_pb2.PushWeightsReply(version=stored.version)

    async def FetchWeights(self, request, context):  # noqa: N802
        stored = self.relay.lookup(request.version)
        if stored is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"version {request.version} not here yet")
        async for msg in stored.stream():
            yield msg


def relay_main(port_file: str) -> None:
    async def serve() -> None:
        service = await start_server(
            lambda s: coordinator_pb2_grpc.add_CoordinatorServicer_to_server(Relay(), s), ready_file=port_file
        )
        await service.stopping.wait()

    run_async(serve())


# ---- the sender process (the trainer) -----------------------------------------------------------


def _device_dtype() -> tuple[torch.device, torch.dtype]:
    # bf16 on the CPU too: three 0.6B processes in fp32 (a receiver peaks at ~6 GB: its model, the
    # dequantized version, the blob) do not fit the 2-core box's 23 GB beside other work.
    return torch.device("cuda" if torch.cuda.is_available() else "cpu"), torch.bfloat16


def _model(shape: str, seed: int) -> Qwen3ForCausalLM:
    device, dtype = _device_dtype()
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(**SHAPES[shape])).to(device=device, dtype=dtype)


def _sync_state(model: Qwen3ForCausalLM) -> dict[str, torch.Tensor]:
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    return weights_to_sync(sd, model.config.tie_word_embeddings)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def sender_main(shape: str, port: str, receivers: int) -> None:
    """Reads "<transport> <version> <fmt>" / "confirm <version>" lines; one JSON line each."""
    model = _model(shape, seed=0)
    stub = coordinator_pb2_grpc.CoordinatorStub(sync_channel(f"127.0.0.1:{port}"))
    exporters = {"shm": ShmExporter(), "ipc": IpcExporter() if torch.cuda.is_available() else None}
    broadcast = BroadcastExporter("127.0.0.1")
    members = [f"r{i}" for i in range(receivers)]
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd, *rest = line.split()
        if cmd == "confirm":
            for exporter in exporters.values():
                if exporter is not None:
                    exporter.confirm(int(rest[0]))
            print(json.dumps({"confirmed": int(rest[0])}), flush=True)
            continue
        version, fmt = int(rest[0]), rest[1]
        t0 = time.perf_counter()
        state = _sync_state(model)
        exporter = exporters.get(cmd)
        if cmd == "broadcast":
            manifest, chunks = broadcast.pack(state, version, members, fmt)
        else:
            manifest, chunks = exporter.pack(state, version, fmt) if exporter else pack(state, version, fmt)
        t1 = time.perf_counter()
        metadata = (("relay", "hashing"),) if cmd == "bytes-hashing-relay" else ()
        stub.PushWeights(iter_messages(manifest, chunks), timeout=300, metadata=metadata)
        if cmd == "broadcast":
            broadcast.send(version)  # as `WeightPusher` does: the document is at the relay, then the blob
        t2 = time.perf_counter()
        blob = max((e.offset + e.nbytes for e in manifest.tensors), default=0)
        print(json.dumps({"t0": t0, "pack_s": t1 - t0, "push_s": t2 - t1, "blob_bytes": blob}), flush=True)
    for exporter in exporters.values():
        if isinstance(exporter, ShmExporter):
            exporter.close()


# ---- a receiver process (a rollout server) ------------------------------------------------------


def receiver_main(shape: str, port: str, index: int) -> None:
    """Reads "fetch <version>" lines; fetches it once the relay has its manifest, stages, loads."""
    serving = _model(shape, seed=1)
    engine = NativeEngine(serving, eos_token_ids=[], max_batch_size=8, preallocate=False, cuda_graphs=False)
    expected = {k: tuple(v.shape) for k, v in _sync_state(serving).items()}
    device, dtype = engine.device, serving.model.embed_tokens.weight.dtype
    receiver = BroadcastReceiver(f"r{index}")

    async def fetch(stub, version: int) -> dict:
        marks: dict = {}
        while True:  # NOT_FOUND until the manifest is at the relay (the mesh: the NewWeights notice)
            stager = WeightStager(expected, version - 1, device=device, dtype=dtype, receiver=receiver)
            marks["fetch0"] = time.perf_counter()
            try:
                async for msg in stub.FetchWeights(
                    coordinator_pb2.FetchWeightsRequest(version=version), timeout=300
                ):
                    stager.add(msg)
                break
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                await asyncio.sleep(0.001)
        marks["fetched"] = time.perf_counter()
        _, tensors = await asyncio.to_thread(stager.finish)
        _sync()
        marks["staged"] = time.perf_counter()
        engine.load_weights(tensors, version)
        _sync()
        marks["loaded"] = time.perf_counter()
        return {**marks, "format": stager.format}

    async def serve() -> None:
        stub = coordinator_pb2_grpc.CoordinatorStub(aio_channel(f"127.0.0.1:{port}"))
        print(json.dumps({"ready": True}), flush=True)
        while line := await asyncio.to_thread(sys.stdin.readline):
            print(json.dumps(await fetch(stub, int(line.split()[1]))), flush=True)

    asyncio.run(serve())


# ---- the orchestrator ---------------------------------------------------------------------------


class Child:
    """A bench process speaking one JSON line per command."""

    def __init__(self, *argv: str) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, *argv], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)  # fmt: skip

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    async def reply(self) -> dict:
        line = await asyncio.to_thread(self.proc.stdout.readline)
        if not line:
            raise RuntimeError(f"a bench process exited (code {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def one_sync(sender: Child, receivers: list[Child], transport: str, version: int, fmt: str) -> dict:
    for r in receivers:
        r.send(f"fetch {version}")
    sender.send(f"{transport} {version} {fmt}")
    s, *got = await asyncio.gather(sender.reply(), *(r.reply() for r in receivers))
    sender.send(f"confirm {version}")  # every receiver serves it: the mesh's heartbeats say so
    await sender.reply()
    last = max(got, key=lambda g: g["loaded"])
    return {
        "pack_s": s["pack_s"], "push_s": s["push_s"],
        "fetch_s": max(g["fetched"] - g["fetch0"] for g in got),
        "stage_s": max(g["staged"] - g["fetched"] for g in got),
        "load_s": max(g["loaded"] - g["staged"] for g in got),
        "total_s": last["loaded"] - s["t0"], "blob_bytes": s["blob_bytes"], "format": last["format"],
    }  # fmt: skip


async def main_async(args) -> dict:
    workdir = tempfile.mkdtemp(prefix="weight_sync-")
    port_file = os.path.join(workdir, "relay.port")
    relay = subprocess.Popen([sys.executable, __file__, "--relay", port_file])
    while not (os.path.exists(port_file) and Path(port_file).read_text()):
        if relay.poll() is not None:
            raise RuntimeError(f"the relay exited (code {relay.returncode})")
        await asyncio.sleep(0.05)
    port = Path(port_file).read_text()
    sender = Child("--shape", args.shape, "--receivers", str(args.receivers), "--sender", port)
    receivers = [Child("--shape", args.shape, "--receiver", port, str(i)) for i in range(args.receivers)]
    for child in (sender, *receivers):
        assert (await child.reply())["ready"]
    transports = [t for t in args.transports if t != "ipc" or torch.cuda.is_available()]
    rows, version = [], 0
    try:
        for fmt in args.formats:
            for transport in transports:
                runs = []
                for _ in range(args.repeats + 1):  # the first one warms up
                    version += 1
                    runs.append(await one_sync(sender, receivers, transport, version, fmt))
                timed = runs[1:]
                totals = sorted(r["total_s"] for r in timed)
                median = {k: statistics.median(r[k] for r in timed) for k in timed[0] if k.endswith("_s")}
                gb = timed[0]["blob_bytes"] / 1e9
                rows.append({
                    "transport": transport, "format": fmt, "wire_format": timed[0]["format"],
                    "receivers": args.receivers, "version_gb": round(gb, 4),
                    **{k: round(v, 4) for k, v in median.items()},
                    "total_s_range": [round(totals[0], 4), round(totals[-1], 4)],
                    "gb_per_s": round(gb / median["total_s"], 3),
                })  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    finally:
        for child in (sender, *receivers):
            child.close()
        relay.terminate()
        relay.wait(timeout=30)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"bench": "weight_sync", "shape": args.shape, "cpu_count": os.cpu_count(), "device": device,
            "hash_threads": hash_pool()._max_workers, "repeats": args.repeats, "rows": rows}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.6b")
    parser.add_argument("--receivers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--formats", nargs="+", choices=("fp8", "bf16", "int4"), default=["fp8"])
    parser.add_argument("--transports", nargs="+", choices=TRANSPORTS, default=list(TRANSPORTS))
    parser.add_argument("--sender", metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--receiver", nargs=2, metavar=("PORT", "INDEX"), help=argparse.SUPPRESS)
    parser.add_argument("--relay", metavar="PORT_FILE", help=argparse.SUPPRESS)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "weight_sync_cpu.json"
    )
    args = parser.parse_args()
    if args.sender:
        return sender_main(args.shape, args.sender, args.receivers)
    if args.receiver:
        return receiver_main(args.shape, args.receiver[0], int(args.receiver[1]))
    if args.relay:
        return relay_main(args.relay)
    result = asyncio.run(main_async(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
