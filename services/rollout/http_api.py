"""SGLang's HTTP API on a rollout server (`--http-port`), so slime-style functions that POST to
`http://{args.sglang_router_ip}:{args.sglang_router_port}/generate` run against Slipstream unchanged.

Routes (SGLang's names and shapes):
- `POST /generate`: `input_ids` (a list of token ids, or a list of such lists for a batch) or
  `text` (a string, or a list); `sampling_params` {temperature, top_p, top_k, max_new_tokens,
  stop_token_ids, sampling_seed/seed, and SGLang's other fields at their defaults};
  `return_logprob`; `rid`. The answer per prompt: `text`, `output_ids`, `meta_info` with `id`,
  `finish_reason` ({"type": "stop", "matched": id} / {"type": "length", "length": n} /
  {"type": "abort"}), `prompt_tokens`, `completion_tokens`, `cached_tokens` (0), `weight_version`
  (the version of the last token, a string as SGLang gives it), `e2e_latency`, and with
  `return_logprob` `output_token_logprobs` as [logprob, token_id, null] triples. One extension:
  `meta_info.output_token_versions`, the policy version of each token (a swap may fall mid-response).
  `stream: true` is refused (400): this surface does not stream.
- `GET /health`, `GET /health_generate`: 200 while the engine thread is alive, 503 after.
- `GET /model_info` (also `/get_model_info`): `model_path`, `tokenizer_path`, `is_generation`,
  `weight_version`, and Slipstream's `max_batch_size`, `num_running`.
- `POST /abort_request` {"rid": ...} or {"abort_all": true}: aborts requests made over HTTP
  (their answers come back with finish_reason "abort" and the tokens so far); work the
  coordinator sent is not this client's to abort.

Every request goes to the server's one `EngineWorker`, like `Rollout.Generate` and attached work,
so it sees the weights version they see and is batched with them. aiohttp serves on the rollout
server's own event loop. A request that cannot work gets a 400 whose body is one line naming the
problem: {"error": {"message": ..., "code": 400}} (and the same line as text in `message`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from slipstream.services.rollout.engine import Request, Result
from slipstream.services.rollout.worker import EngineWorker

log = logging.getLogger(__name__)

# SGLang sampling fields we accept only at the value that means "off" (the engine has no such knob).
_INERT = {
    "stop": (None, [], ""),
    "min_new_tokens": (None, 0),
    "repetition_penalty": (None, 1, 1.0),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "min_p": (None, 0, 0.0),
    "n": (None, 1),
    "json_schema": (None,),
    "regex": (None,),
    "ebnf": (None,),
    "logit_bias": (None, {}),
    "custom_params": (None,),
}
# SGLang sampling fields that change only how text is rendered or trimmed: accepted, noted.
_TEXT_ONLY = {"skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim", "ignore_eos"}
_TOP_LEVEL = {
    "input_ids",
    "text",
    "sampling_params",
    "return_logprob",
    "stream",
    "rid",
    "logprob_start_len",
    "top_logprobs_num",
    "return_text_in_logprobs",
    "return_routed_experts",
}


class BadRequest(ValueError):
    """A request that cannot work; its message is the 400's one line."""


@dataclass
class Parsed:
    requests: list[Request]
    batch: bool  # the caller sent a list: answer a list
    return_logprob: bool
    skip_special_tokens: bool


def _number(params: dict, name: str, kind: type, default: Any) -> Any:
    value = params.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and value != int(value)):
        raise BadRequest(f"sampling_params.{name} must be {'an integer' if kind is int else 'a number'}")
    return kind(value)


def _token_list(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not value:
        raise BadRequest(f"{what} must be a non-empty list of token ids")
    if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in value):
        raise BadRequest(f"{what} must hold non-negative integers")
    return list(value)


def _prompts(body: dict, tokenizer: Any, vocab_size: int) -> tuple[list[list[int]], bool]:
    """The prompts' token ids, from input_ids or text, and whether the body is a batch."""
    has_ids, has_text = body.get("input_ids") is not None, body.get("text") is not None
    if has_ids == has_text:
        raise BadRequest("give exactly one of input_ids and text")
    if has_ids:
        ids = body["input_ids"]
        batch = isinstance(ids, list) and bool(ids) and isinstance(ids[0], list)
        prompts = (
            [_token_list(p, f"input_ids[{i}]") for i, p in enumerate(ids)]
            if batch
            else [_token_list(ids, "input_ids")]
        )
    else:
        text = body["text"]
        batch = isinstance(text, list)
        texts = text if batch else [text]
        if not texts or any(not isinstance(t, str) or not t for t in texts):
            raise BadRequest("text must be a non-empty string or a list of them")
        prompts = [list(tokenizer(t)["input_ids"]) for t in texts]
    for i, p in enumerate(prompts):
        if max(p) >= vocab_size:
            raise BadRequest(
                f"input_ids{f'[{i}]' if batch else ''}: token id {max(p)} >= vocab size {vocab_size}"
            )
    return prompts, batch


def _check_sampling_fields(params: dict) -> None:
    """Every sampling_params field is one the engine honours, text-only, or at its inert value."""
    known = {"temperature", "top_p", "top_k", "max_new_tokens", "stop_token_ids", "sampling_seed", "seed"}
    for name, value in params.items():
        if name in known or name in _TEXT_ONLY:
            continue
        if name in _INERT:
            if value not in _INERT[name]:
                raise BadRequest(
                    f"sampling_params.{name}={json.dumps(value)} is not supported by this engine"
                )
            continue
        raise BadRequest(f"unsupported sampling_params field {name!r}")


def parse_generate(
    body: Any, tokenizer: Any, rids: itertools.count, default_max_new_tokens: int, vocab_size: int
) -> Parsed:
    """The engine requests a `/generate` body asks for; BadRequest (one line) if it cannot work."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = sorted(set(body) - _TOP_LEVEL)
    if unknown:
        raise BadRequest(f"unsupported field {unknown[0]!r}")
    if body.get("stream"):
        raise BadRequest("stream is not supported here; send stream: false")
    if body.get("top_logprobs_num"):
        raise BadRequest("top_logprobs_num is not supported (only the sampled token's log-prob)")
    prompts, batch = _prompts(body, tokenizer, vocab_size)
    params = body.get("sampling_params") or {}
    if not isinstance(params, dict):
        raise BadRequest("sampling_params must be an object")
    _check_sampling_fields(params)
    stop_ids = params.get("stop_token_ids") or []
    if stop_ids:
        stop_ids = _token_list(stop_ids, "sampling_params.stop_token_ids")
    seed = params.get("sampling_seed", params.get("seed"))
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest("sampling_params.sampling_seed must be an integer")
    max_new = _number(params, "max_new_tokens", int, default_max_new_tokens)
    if max_new < 1:
        raise BadRequest("sampling_params.max_new_tokens must be at least 1")
    top_k = _number(params, "top_k", int, -1)
    rid = body.get("rid")
    rid_list = rid if isinstance(rid, list) else [rid] * len(prompts) if rid is None else None
    if rid_list is None:
        if batch:
            raise BadRequest("rid must be a list, one per prompt, for a batch")
        rid_list = [rid]
    if len(rid_list) != len(prompts) or any(r is not None and not isinstance(r, str) for r in rid_list):
        raise BadRequest("rid must be a string (a list of strings for a batch)")
    requests = []
    try:
        for p, r in zip(prompts, rid_list, strict=True):
            requests.append(
                Request(
                    rid=r or f"http{next(rids)}",
                    tokens=p,
                    max_new_tokens=max_new,
                    temperature=_number(params, "temperature", float, 1.0),
                    top_p=_number(params, "top_p", float, 1.0),
                    top_k=top_k if top_k > 0 else -1,
                    stop_token_ids=stop_ids,
                    seed=seed,
                )
            )
    except ValueError as e:  # Request's own checks: "request http3: top_p must be in (0, 1], got 2"
        raise BadRequest("sampling_params." + re.sub(r"^request [^:]*: ", "", str(e))) from None
    skip = params.get("skip_special_tokens", True)
    return Parsed(requests, batch, bool(body.get("return_logprob")), skip is not False)


def answer(
    result: Result, request: Request, tokenizer: Any, parsed: Parsed, started: float, version_now: int = 0
) -> dict:
    """SGLang's response object for one finished request."""
    if result.finish_reason == "stop":
        finish: dict[str, Any] = {"type": "stop", "matched": result.tokens[-1] if result.tokens else None}
    elif result.finish_reason == "length":
        finish = {"type": "length", "length": len(result.tokens)}
    else:
        finish = {"type": "abort", "message": "aborted"}
    meta: dict[str, Any] = {
        "id": request.rid,
        "finish_reason": finish,
        "prompt_tokens": len(request.tokens),
        "completion_tokens": len(result.tokens),
        "cached_tokens": 0,
        # the last token's version; no token (aborted at once): the version served now
        "weight_version": str(result.versions[-1] if result.versions else version_now),
        "output_token_versions": list(result.versions),
        "e2e_latency": time.perf_counter() - started,
    }
    if parsed.return_logprob:
        meta["output_token_logprobs"] = [
            [lp, t, None] for lp, t in zip(result.log_probs, result.tokens, strict=True)
        ]
    return {
        "text": tokenizer.decode(result.tokens, skip_special_tokens=parsed.skip_special_tokens),
        "output_ids": list(result.tokens),
        "meta_info": meta,
    }


def _bad(message: str, status: int = 400) -> web.Response:
    message = message.replace("\n", " ")
    return web.json_response(
        {"error": {"message": message, "code": status}, "message": message}, status=status
    )


class HttpApi:
    """The routes above, on one EngineWorker."""

    def __init__(
        self,
        worker: EngineWorker,
        tokenizer: Any,
        *,
        model_path: str,
        default_max_new_tokens: int,
        vocab_size: int,
    ):
        self.worker = worker
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.default_max_new_tokens = default_max_new_tokens
        self.vocab_size = vocab_size
        self._rids = itertools.count(1)
        self._mine: set[str] = set()  # rids of HTTP requests in the engine now
        self.num_requests = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/generate", self.generate)
        app.router.add_get("/health", self.health)
        app.router.add_get("/health_generate", self.health)
        app.router.add_get("/model_info", self.model_info)
        app.router.add_get("/get_model_info", self.model_info)
        app.router.add_post("/abort_request", self.abort_request)
        return app

    async def generate(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _bad("the body is not JSON")
        try:
            parsed = parse_generate(
                body, self.tokenizer, self._rids, self.default_max_new_tokens, self.vocab_size
            )
        except BadRequest as e:
            return _bad(str(e))
        reqs = parsed.requests
        if any(r.rid in self._mine for r in reqs) or len({r.rid for r in reqs}) != len(reqs):
            return _bad("rid is already running")
        self.num_requests += len(reqs)
        try:
            futures = [self.worker.submit(r) for r in reqs]
        except RuntimeError as e:  # the engine thread is gone
            return _bad(str(e), 503)
        except ValueError as e:
            return _bad(str(e))
        self._mine.update(r.rid for r in reqs)
        try:
            results = await asyncio.gather(*futures)
        except ValueError as e:  # the engine refused a request (too long for it...)
            self.worker.abort([r.rid for r in reqs])
            return _bad(str(e))
        except asyncio.CancelledError:
            self.worker.abort([r.rid for r in reqs])
            raise
        except RuntimeError as e:
            return _bad(str(e), 503)
        finally:
            self._mine.difference_update(r.rid for r in reqs)
        out = [
            answer(res, req, self.tokenizer, parsed, started, self.worker.policy_version)
            for res, req in zip(results, reqs, strict=True)
        ]
        return web.json_response(out if parsed.batch else out[0])

    async def health(self, request: web.Request) -> web.Response:
        if self.worker.error is not None:
            return _bad(f"engine thread failed: {self.worker.error}", 503)
        return web.Response(text="")

    async def model_info(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "model_path": self.model_path,
                "tokenizer_path": self.model_path,
                "is_generation": True,
                "weight_version": str(self.worker.policy_version),
                "engine": self.worker.engine.name,
                "max_batch_size": self.worker.engine.max_batch_size,
                "num_running": self.worker.num_running,
            }
        )

    def abort_all(self) -> list[str]:
        """Abort every request made over HTTP; their answers come back with finish_reason "abort"."""
        rids = sorted(self._mine)
        if rids:
            self.worker.abort(rids)
        return rids

    async def abort_request(self, request: web.Request) -> web.Response:
        try:
            body = await request.json() if request.can_read_body else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _bad("the body is not JSON")
        if not isinstance(body, dict):
            return _bad("the body must be a JSON object")
        if body.get("abort_all"):
            return web.json_response({"aborted": self.abort_all()})
        if not isinstance(body.get("rid"), str) or not body["rid"]:
            return _bad("give rid or abort_all: true")
        rids = [body["rid"]] if body["rid"] in self._mine else []
        if rids:
            self.worker.abort(rids)
        return web.json_response({"aborted": rids})


async def start_http(api: HttpApi, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve `api` on host:port (0 = any free port) on the running loop; the runner and the port."""
    # handler_cancellation: a client that hangs up (a cancelled generate function) aborts its request.
    runner = web.AppRunner(api.app(), access_log=None, handle_signals=False, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    return runner, int(bound)
