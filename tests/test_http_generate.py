"""SGLang's HTTP API on a real rollout server process (`--http-port`), posted to over real HTTP.

One server process for the module (a tiny random model with room for long responses): the
answers have SGLang's shape, greedy log-probs equal the `Rollout.Generate` (gRPC) path's, bad
input is a 400 with one line, /model_info and /health answer, an abort stops a running request,
and 64 concurrent requests all come back.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import aiohttp
import pytest
from machine_speed import scaled

from mesh_fixtures import build_tiny_model
from slipstream.models.hf import load_tokenizer
from slipstream.proto import rollout_pb2, rollout_pb2_grpc, types_pb2
from slipstream.rpc.channel import sync_channel
from slipstream.services.rollout.http_api import BadRequest, parse_generate

pytestmark = pytest.mark.timeout(120)
MAX_NEW = 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("http")
    model_dir = build_tiny_model(tmp / "model", max_position_embeddings=256)
    ready, http_port = tmp / "port", _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "slipstream.services.rollout",
            "--hf-checkpoint",
            str(model_dir),
            "--port",
            "0",
            "--ready-file",
            str(ready),
            "--http-port",
            str(http_port),
            "--rollout-max-batch-size",
            "64",
            "--rollout-max-prompt-len",
            "16",
            "--rollout-max-response-len",
            str(MAX_NEW),
            "--torch-threads",
            "1",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + scaled(30)
    while not (ready.exists() and ready.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"rollout server did not start: {proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    try:
        yield {
            "url": f"http://127.0.0.1:{http_port}",
            "grpc": f"127.0.0.1:{int(ready.read_text())}",
            "tok": load_tokenizer(model_dir),
            "model_dir": str(model_dir),
        }
    finally:
        proc.terminate()
        try:
            assert proc.wait(15) == 0
        except subprocess.TimeoutExpired:
            proc.kill()


def _post(url: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read()


def test_generate_matches_the_grpc_path(server):
    tok = server["tok"]
    ids = tok("12+34=", add_special_tokens=False)["input_ids"]
    sampling = {"temperature": 0.0, "max_new_tokens": 8}
    status, out = _post(
        f"{server['url']}/generate", {"input_ids": ids, "sampling_params": sampling, "return_logprob": True}
    )
    assert status == 200, out
    meta = out["meta_info"]
    n = len(out["output_ids"])
    assert 1 <= n <= 8 and meta["completion_tokens"] == n and meta["prompt_tokens"] == len(ids)
    assert meta["finish_reason"]["type"] in ("stop", "length") and meta["weight_version"] == "0"
    assert [t for _, t, _ in meta["output_token_logprobs"]] == out["output_ids"]
    assert out["text"] == tok.decode(out["output_ids"], skip_special_tokens=True)
    stub = rollout_pb2_grpc.RolloutStub(sync_channel(server["grpc"]))
    reply = stub.Generate(
        rollout_pb2.GenerateRequest(
            samples=[types_pb2.Sample(uid="g", tokens=ids)],
            sampling=types_pb2.SamplingParams(temperature=0.0, max_new_tokens=8),
        ),
        timeout=30,
    )
    g = reply.samples[0]
    assert list(g.tokens[len(ids) :]) == out["output_ids"]
    assert [lp for lp, _, _ in meta["output_token_logprobs"]] == pytest.approx(
        list(g.rollout_log_probs), abs=1e-6
    )
    # text in, a seeded sample: the same seed gives the same tokens; a batch answers a list
    body = {
        "text": ["7*8=", "7*8="],
        "sampling_params": {"temperature": 1.0, "sampling_seed": 3, "max_new_tokens": 6},
    }
    status, both = _post(f"{server['url']}/generate", body)
    assert status == 200 and isinstance(both, list) and both[0]["output_ids"] == both[1]["output_ids"]
    assert "output_token_logprobs" not in both[0]["meta_info"]


@pytest.mark.parametrize(
    "body, words",
    [
        ({"sampling_params": {}}, "exactly one of input_ids and text"),
        ({"input_ids": [1, 2], "stream": True}, "stream"),
        ({"input_ids": []}, "non-empty"),
        ({"input_ids": [1, "a"]}, "integers"),
        ({"input_ids": [1, 10**6]}, "vocab size"),
        ({"input_ids": [1], "sampling_params": {"top_p": 2}}, "top_p"),
        ({"input_ids": [1], "sampling_params": {"repetition_penalty": 1.3}}, "repetition_penalty"),
        ({"input_ids": [1], "sampling_params": {"bogus": 1}}, "bogus"),
        ({"input_ids": [1], "wat": 1}, "wat"),
        (b"{not json", "not JSON"),
    ],
)
def test_bad_input_is_a_400_with_one_line(server, body, words):
    status, out = _post(f"{server['url']}/generate", body)
    assert status == 400 and words in out["error"]["message"] and "\n" not in out["error"]["message"]


def test_health_and_model_info(server):
    assert _get(f"{server['url']}/health")[0] == 200
    status, raw = _get(f"{server['url']}/model_info")
    info = json.loads(raw)
    assert status == 200 and info["model_path"] == server["model_dir"] and info["weight_version"] == "0"
    assert info["is_generation"] is True


async def _abort_running(url: str, ids_list: list[list[int]]) -> list[dict]:
    async with aiohttp.ClientSession() as s:
        sp = {"temperature": 0.0, "max_new_tokens": MAX_NEW}
        # Greedy on a random model loops without EOS for most prompts: find one that runs to the limit.
        firsts = await asyncio.gather(
            *(s.post(f"{url}/generate", json={"input_ids": ids, "sampling_params": sp}) for ids in ids_list)
        )
        outs = [await r.json() for r in firsts]
        long = [
            ids
            for ids, o in zip(ids_list, outs, strict=True)
            if o["meta_info"]["finish_reason"]["type"] == "length"
        ]
        assert long, "no prompt ran to the length limit"
        task = asyncio.ensure_future(
            s.post(f"{url}/generate", json={"input_ids": long[0], "sampling_params": sp, "rid": "victim"})
        )
        while True:
            info = await (await s.get(f"{url}/model_info")).json()
            if info["num_running"]:
                break
            await asyncio.sleep(0.005)
        aborted = await (await s.post(f"{url}/abort_request", json={"rid": "victim"})).json()
        out = await (await task).json()
        bad = await s.post(f"{url}/abort_request", json={})
        return [aborted, out, {"status": bad.status}]


def test_abort_request_stops_a_running_request(server):
    tok = server["tok"]
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in ("1+1=", "9-3=", "abc", "5*5=", "x")]
    aborted, out, bad = asyncio.run(_abort_running(server["url"], prompts))
    assert aborted == {"aborted": ["victim"]}
    assert out["meta_info"]["finish_reason"]["type"] == "abort" and out["meta_info"]["id"] == "victim"
    assert len(out["output_ids"]) < MAX_NEW
    assert bad["status"] == 400


async def _many(url: str, ids: list[int], n: int) -> list[tuple[int, dict]]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=n)) as s:

        async def one(i: int):
            body = {
                "input_ids": ids,
                "sampling_params": {"temperature": 1.0, "sampling_seed": i, "max_new_tokens": 8},
                "return_logprob": True,
            }
            async with s.post(f"{url}/generate", json=body) as r:
                return r.status, await r.json()

        return await asyncio.gather(*(one(i) for i in range(n)))


def test_64_concurrent_requests(server):
    ids = server["tok"]("3+4=", add_special_tokens=False)["input_ids"]
    answers = asyncio.run(_many(server["url"], ids, 64))
    assert all(status == 200 for status, _ in answers)
    assert len({a["meta_info"]["id"] for _, a in answers}) == 64
    for _, a in answers:
        assert 1 <= len(a["output_ids"]) <= 8 and len(a["meta_info"]["output_token_logprobs"]) == len(
            a["output_ids"]
        )


def test_parse_generate_defaults():
    import itertools

    parsed = parse_generate({"input_ids": [1, 2]}, None, itertools.count(1), 7, 100)
    r = parsed.requests[0]
    assert (r.max_new_tokens, r.temperature, r.top_p, r.top_k, r.seed) == (7, 1.0, 1.0, -1, None)
    with pytest.raises(BadRequest, match="rid must be a list"):
        parse_generate({"input_ids": [[1], [2]], "rid": "x"}, None, itertools.count(1), 7, 100)
    with pytest.raises(BadRequest, match="max_new_tokens"):
        parse_generate(
            {"input_ids": [1], "sampling_params": {"max_new_tokens": 0}}, None, itertools.count(1), 7, 100
        )
