"""Weight-sync seconds for a Qwen3-0.6B-shaped model: byte path (before/after cut-through) vs CUDA IPC.

    python bench/weight_sync.py [--shape 0.6b|demo] [--repeats 2] [--formats fp8 bf16 int4]
        [--out bench/results/weight_sync.json]

(`int4`: the --weight-sync-dtype int4 wire; this receiver's engine is a dense one, so the stager
dequantizes the int4 weights instead of handing them to W4A16 layers: the bytes and the transfer
are the int4 path's, the load step a dense engine's.)

Three processes, as in the mesh: a *sender* (the trainer: holds the model, packs each version and
pushes it with a blocking stub, as `WeightPusher` does), a *relay* (the coordinator's weight
handlers around the real `receive_push`/`WeightRelay`) and this process, the *receiver* (the
rollout server: `FetchWeights` -> `WeightStager` on the engine's device and dtype ->
`NativeEngine.load_weights`). Every version is fetched and checked end to end.

Relay modes, side by side in one run:
  before       the byte path as it was: every chunk hashed serially on the relay's event loop,
               the version fetchable once the whole push is in (push, then fetch), and the
               trainer building each chunk message by keyword (~20 ms per 8 MiB chunk in upb)
  pool         hashes on the sha256 thread pool, still push-then-fetch
  cut-through  the shipped relay: the receiver fetches once the manifest is announced (in the
               mesh: the NewWeights notice), chunks streaming through as the relay checks them

Colocated (`cuda-ipc` rows, GPU only): the sender packs with an `IpcExporter` and pushes one JSON
chunk with the CUDA IPC handle; the receiver opens it, copies and dequantizes on the GPU.
`--probe` first measures raw loopback gRPC (8 MiB messages, no protobuf) between two processes:
one stream vs several streams or channels, and the HTTP/2 window options.
Rows are the best of --repeats after a warm-up. Targets (issue 6): < 0.3 s bytes, < 50 ms IPC.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch

from slipstream.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from slipstream.proto import coordinator_pb2, coordinator_pb2_grpc, types_pb2
from slipstream.rpc.channel import CHANNEL_OPTIONS, aio_channel, sync_channel
from slipstream.rpc.server import SERVER_OPTIONS, run_async, start_server
from slipstream.services.coordinator.weights_relay import PushError, RelayedVersion, WeightRelay, receive_push
from slipstream.services.rollout.engine import NativeEngine
from slipstream.weights import IpcExporter, WeightStager, iter_messages, pack, weights_to_sync
from slipstream.weights.packer import fill, hash_pool, plan

SHAPES = {
    "0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "demo": dict(vocab_size=20, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True),
}  # fmt: skip
MODES = ("before", "pool", "cut-through")


# ---- the relay process --------------------------------------------------------------------------


async def _receive_push_before(messages, current_version: int) -> RelayedVersion:
    """The relay's check loop before this change (reference): sha256 of each chunk on the event loop."""
    kept: RelayedVersion | None = None
    received = 0
    async for msg in messages:
        if kept is None:
            if msg.WhichOneof("kind") != "manifest" or msg.manifest.version <= current_version:
                raise PushError("bad manifest")
            kept = RelayedVersion(msg)
            continue
        c = msg.chunk
        if c.version != kept.version or c.index != received:
            raise PushError(f"chunk {c.index} out of order")
        if hashlib.sha256(c.data).hexdigest() != kept.manifest.chunk_sha256[received]:
            raise PushError(f"chunk {c.index}: sha256 does not match the manifest")
        received += 1
        kept.append(msg)
    if (
        kept is None
        or received != len(kept.manifest.chunk_sha256)
        or kept.total_bytes != kept.manifest.total_bytes
    ):
        raise PushError("incomplete push")
    return kept


def _messages_before(manifest, chunks):
    """`iter_messages` before this change (reference): each chunk message built by keyword."""
    yield types_pb2.WeightMessage(manifest=manifest)
    for index, data in enumerate(chunks):
        yield types_pb2.WeightMessage(
            chunk=types_pb2.WeightChunk(version=manifest.version, index=index, data=data)
        )


class Relay(coordinator_pb2_grpc.CoordinatorServicer):
    """The coordinator's PushWeights/FetchWeights (services/coordinator/server.py), less the notices."""

    def __init__(self, mode: str) -> None:
        self.relay, self.mode = WeightRelay(), mode

    async def PushWeights(self, request_iterator, context):  # noqa: N802
        try:
            if self.mode == "before":
                stored = await _receive_push_before(request_iterator, self.relay.floor)
            else:
                begin = self.relay.begin if self.mode == "cut-through" else None
                stored = await receive_push(request_iterator, self.relay.floor, on_manifest=begin)
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


def relay_main(mode: str, port_file: str) -> None:
    async def serve() -> None:
        service = await start_server(
            lambda s: coordinator_pb2_grpc.add_CoordinatorServicer_to_server(Relay(mode), s),
            ready_file=port_file,
        )
        await service.stopping.wait()

    run_async(serve())


# ---- the sender process (the trainer) -----------------------------------------------------------


def _device_dtype() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


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


def sender_main(shape: str) -> None:
    """Reads "bytes|bytes-before|ipc <port> <version> <fmt>" / "confirm <version>" lines; one JSON
    line each ("bytes-before" builds the chunk messages as before this change)."""
    model = _model(shape, seed=0)
    exporter = IpcExporter()
    stubs: dict[str, coordinator_pb2_grpc.CoordinatorStub] = {}
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd, *rest = line.split()
        if cmd == "confirm":
            exporter.confirm(int(rest[0]))
            print(json.dumps({"held": exporter.held_versions}), flush=True)
            continue
        port, version, fmt = rest[0], int(rest[1]), rest[2]
        if port not in stubs:
            stubs[port] = coordinator_pb2_grpc.CoordinatorStub(sync_channel(f"127.0.0.1:{port}"))
        t0 = time.perf_counter()
        state = _sync_state(model)
        manifest, chunks = exporter.pack(state, version, fmt) if cmd == "ipc" else pack(state, version, fmt)
        t1 = time.perf_counter()
        messages = _messages_before if cmd == "bytes-before" else iter_messages
        stubs[port].PushWeights(messages(manifest, chunks), timeout=120)
        t2 = time.perf_counter()
        print(json.dumps({"t0": t0, "pack_s": t1 - t0, "push_s": t2 - t1, "wire_bytes": manifest.total_bytes}),
              flush=True)  # fmt: skip


class Child:
    """A bench process speaking one JSON line per command."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

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
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _start_relay(mode: str, workdir: str) -> tuple[subprocess.Popen, int]:
    port_file = os.path.join(workdir, f"relay-{mode}.port")
    proc = subprocess.Popen([sys.executable, __file__, "--relay", mode, port_file])
    for _ in range(600):
        if os.path.exists(port_file):
            return proc, int(Path(port_file).read_text())
        if proc.poll() is not None:
            raise RuntimeError(f"the {mode} relay exited (code {proc.returncode})")
        time.sleep(0.05)
    raise RuntimeError(f"the {mode} relay did not start")


# ---- the receiver (this process: the rollout server) --------------------------------------------


async def _fetch(stub, engine, expected, version: int, device, dtype, wait_for_push: bool) -> dict:
    """FetchWeights -> WeightStager -> load_weights; with `wait_for_push`, ask until the relay has
    the version (the mesh's NewWeights notice says when). Returns perf_counter marks."""
    marks: dict[str, float] = {}
    while True:
        stager = WeightStager(expected, version - 1, device=device, dtype=dtype)
        marks["fetch0"] = time.perf_counter()
        try:
            async for msg in stub.FetchWeights(
                coordinator_pb2.FetchWeightsRequest(version=version), timeout=120
            ):
                stager.add(msg)
            break
        except grpc.aio.AioRpcError as e:
            if not (wait_for_push and e.code() == grpc.StatusCode.NOT_FOUND):
                raise
            await asyncio.sleep(0.001)
    marks["fetched"] = time.perf_counter()
    _, tensors = stager.finish()
    _sync()
    marks["staged"] = time.perf_counter()
    engine.load_weights(tensors, version)
    _sync()
    marks["loaded"] = time.perf_counter()
    return marks


async def byte_sync(sender: Child, port: int, mode: str, stub, engine, expected, version, fmt) -> dict:
    device, dtype = engine.device, engine.model.model.embed_tokens.weight.dtype
    sender.send(f"{'bytes-before' if mode == 'before' else 'bytes'} {port} {version} {fmt}")
    if mode == "cut-through":
        marks = await _fetch(stub, engine, expected, version, device, dtype, wait_for_push=True)
        s = await sender.reply()
    else:
        s = await sender.reply()
        marks = await _fetch(stub, engine, expected, version, device, dtype, wait_for_push=False)
    push0 = s["t0"] + s["pack_s"]
    t = {
        "pack_s": s["pack_s"],
        "push_s": s["push_s"],
        "fetch_s": marks["fetched"] - marks["fetch0"],
        # push start -> last chunk staged: push + fetch, or the overlap of the two
        "transfer_s": marks["fetched"] - push0,
        "stage_s": marks["staged"] - marks["fetched"],
        "load_s": marks["loaded"] - marks["staged"],
        "total_s": marks["loaded"] - s["t0"],
        "wire_mb": s["wire_bytes"] / 1e6,
    }
    return t


async def ipc_sync(sender: Child, port: int, stub, engine, expected, version, fmt) -> dict:
    sender.send(f"ipc {port} {version} {fmt}")
    s = await sender.reply()
    dtype = engine.model.model.embed_tokens.weight.dtype
    marks = await _fetch(stub, engine, expected, version, None, dtype, wait_for_push=False)
    sender.send(f"confirm {version}")
    await sender.reply()
    return {
        "pack_s": s["pack_s"], "push_s": s["push_s"], "fetch_s": marks["fetched"] - marks["fetch0"],
        "stage_s": marks["staged"] - marks["fetched"], "load_s": marks["loaded"] - marks["staged"],
        "total_s": s["pack_s"] + s["push_s"] + marks["loaded"] - marks["fetch0"], "wire_bytes": s["wire_bytes"],
    }  # fmt: skip


def pack_breakdown(model, fmt: str, chunk_bytes: int) -> dict[str, float]:
    """Where `pack`'s time goes: layout, fill the flat buffer (FP8: quantized there), the D2H copy,
    chunk+hash."""
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    _, pieces, total = plan(_sync_state(model), 1, fmt)
    _sync()
    t["plan_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    blob = fill(pieces, torch.empty(total, dtype=torch.uint8, device=pieces[0][1].device))
    _sync()
    t["fill_quantize_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    host = torch.empty(total, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    host.copy_(blob)
    t["d2h_s"] = time.perf_counter() - t0
    view = memoryview(host.numpy())
    t0 = time.perf_counter()
    list(hash_pool().map(lambda i: hashlib.sha256(view[i : i + chunk_bytes].tobytes()).digest(),
                         range(0, total, chunk_bytes)))  # fmt: skip
    t["chunk_hash_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(0, total, chunk_bytes):
        hashlib.sha256(view[i : i + chunk_bytes]).digest()
    t["hash_one_thread_s"] = time.perf_counter() - t0
    t["mb"] = total / 1e6
    return {k: round(v, 4) for k, v in t.items()}


# ---- raw loopback gRPC probe ---------------------------------------------------------------------

_MSG = 8 << 20


def _ident(x):
    return x


def probe_server_main(port_file: str, extra: str) -> None:
    options = SERVER_OPTIONS + json.loads(extra)

    async def serve() -> None:
        async def push(it, ctx):
            n = 0
            async for m in it:
                n += len(m)
            return str(n).encode()

        async def fetch(req, ctx):
            data = bytes(_MSG)
            for _ in range(int(req)):
                yield data

        handlers = grpc.method_handlers_generic_handler("probe.P", {
            "Push": grpc.stream_unary_rpc_method_handler(push, _ident, _ident),
            "Fetch": grpc.unary_stream_rpc_method_handler(fetch, _ident, _ident),
        })  # fmt: skip
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers((handlers,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        Path(port_file).write_text(str(port))
        await server.wait_for_termination()

    run_async(serve())


async def probe(total_mb: int, workdir: str) -> list[dict]:
    window = [("grpc.http2.lookahead_bytes", 64 << 20)]
    frames = [("grpc.http2.max_frame_size", (1 << 24) - 1), ("grpc.http2.write_buffer_size", 64 << 20)]
    rows = []
    n = total_mb * (1 << 20) // _MSG
    for name, extra in (("defaults", []), ("lookahead 64M", window), ("lookahead+frames", window + frames)):
        port_file = os.path.join(workdir, f"probe-{len(rows)}.port")
        proc = subprocess.Popen([sys.executable, __file__, "--probe-server", port_file, json.dumps(extra)])
        try:
            while not os.path.exists(port_file) or not Path(port_file).read_text():
                await asyncio.sleep(0.05)
            addr = f"127.0.0.1:{Path(port_file).read_text()}"
            channels = [grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS + extra) for _ in range(4)]

            async def gen(k, data=bytes(_MSG)):
                for _ in range(k):
                    yield data

            async def push(ch, k):
                await ch.stream_unary("/probe.P/Push", _ident, _ident)(gen(k))

            async def fetch(ch, k):
                async for _ in ch.unary_stream("/probe.P/Fetch", _ident, _ident)(str(k).encode()):
                    pass

            for what, fn in (("push", push), ("fetch", fetch)):
                for streams, nch in ((1, 1), (4, 1), (4, 4)):
                    await asyncio.gather(
                        *[fn(channels[i % nch], n // streams) for i in range(streams)]
                    )  # warm
                    best = float("inf")
                    for _ in range(3):
                        t0 = time.perf_counter()
                        await asyncio.gather(*[fn(channels[i % nch], n // streams) for i in range(streams)])
                        best = min(best, time.perf_counter() - t0)
                    rows.append({"options": name, "rpc": what, "streams": streams, "channels": nch,
                                 "mb_per_s": round(total_mb * 1.048576 / best)})  # fmt: skip
                    print("probe", rows[-1], flush=True)
            for ch in channels:
                await ch.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return rows


# ---- main ---------------------------------------------------------------------------------------


async def main_async(args) -> dict:
    workdir = tempfile.mkdtemp(prefix="weight_sync-")
    result: dict = {"bench": "weight_sync", "shape": args.shape, "cpu_count": os.cpu_count()}
    if args.probe:
        result["grpc_probe"] = await probe(256, workdir)
    serving = _model(args.shape, seed=1)
    engine = NativeEngine(serving, eos_token_ids=[], max_batch_size=8, preallocate=False, cuda_graphs=False)
    expected = {k: tuple(v.shape) for k, v in _sync_state(serving).items()}
    on_gpu = torch.cuda.is_available()
    sender = Child([sys.executable, __file__, "--shape", args.shape, "--sender"])
    assert (await sender.reply())["ready"]
    relays = {mode: _start_relay(mode, workdir) for mode in MODES}
    stubs = {
        m: coordinator_pb2_grpc.CoordinatorStub(aio_channel(f"127.0.0.1:{p}")) for m, (_, p) in relays.items()
    }
    rows, version = [], 0
    try:
        for fmt in args.formats:
            for mode in MODES:
                runs = []
                for _ in range(args.repeats + 1):  # the first one warms up
                    version += 1
                    _, port = relays[mode]
                    runs.append(
                        await byte_sync(sender, port, mode, stubs[mode], engine, expected, version, fmt)
                    )
                best = min(runs[1:], key=lambda r: r["total_s"])
                rows.append({"path": "bytes", "relay": mode, "format": fmt, "chunk_mib": 8,
                             **{k: round(v, 4) for k, v in best.items()}})  # fmt: skip
                print("bytes", rows[-1], flush=True)
        if on_gpu and not args.no_ipc:
            _, port = relays["cut-through"]
            for fmt in args.formats:
                runs = []
                for _ in range(args.repeats + 3):  # warm-up: handle open, allocator, kernels
                    version += 1
                    runs.append(
                        await ipc_sync(sender, port, stubs["cut-through"], engine, expected, version, fmt)
                    )
                best = min(runs[3:], key=lambda r: r["total_s"])
                rows.append({"path": "cuda-ipc", "format": fmt, **{k: round(v, 4) for k, v in best.items()}})
                print("ipc", rows[-1], flush=True)
    finally:
        sender.close()
        for proc, _ in relays.values():
            proc.terminate()
            proc.wait(timeout=30)
    trainer = _model(args.shape, seed=0)
    breakdown = {fmt: pack_breakdown(trainer, fmt, 8 << 20) for fmt in args.formats}
    print("pack breakdown", breakdown, flush=True)
    result.update({
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "params_synced": sum(v.numel() for v in _sync_state(trainer).values()),
        "rows": rows, "pack_breakdown": breakdown, "hash_threads": hash_pool()._max_workers,
    })  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.6b")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--formats", nargs="+", choices=("fp8", "bf16", "int4"), default=["fp8", "bf16"])
    parser.add_argument("--no-ipc", action="store_true", help="skip the colocated (CUDA IPC) rows")
    parser.add_argument("--probe", action="store_true", help="first measure raw loopback gRPC throughput")
    parser.add_argument("--sender", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--relay", nargs=2, metavar=("MODE", "PORT_FILE"), help=argparse.SUPPRESS)
    parser.add_argument("--probe-server", nargs=2, metavar=("PORT_FILE", "OPTIONS"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "weight_sync.json")
    args = parser.parse_args()
    if args.sender:
        return sender_main(args.shape)
    if args.relay:
        return relay_main(*args.relay)
    if args.probe_server:
        return probe_server_main(*args.probe_server)
    result = asyncio.run(main_async(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
