"""The tool demo's generate function and reward, written as a slime user writes them.

`--custom-generate-function-path slipstream.demo.tool_generate:generate` (slime's dotted
`slipstream.demo.tool_generate.generate` too) and `--custom-rm-path slipstream.demo.tool_generate:reward`.
`generate` talks to the engine only through SGLang's `POST /generate` at
`http://{args.sglang_router_ip}:{args.sglang_router_port}`, token ids in and out with log-probs,
so the same file runs against SGLang under slime (it imports slime's `Sample` when slime is there).

Each model turn is generated with `]` as a stop token. A turn that ends in `[expr]` is a
calculator call: the result (`tool_task.calculate`) is appended as tool tokens, `loss_mask` 0 and
log-prob 0, and the next turn goes on from the whole trajectory; any other ending is the answer.
A turn that comes back aborted (a weight swap under --partial-rollout) returns the sample ABORTED
with what it has: it is called again later with that partial sample (its tokens hold the response
so far) and simply goes on. Per-token policy versions are kept when the server reports them
(Slipstream's `meta_info.output_token_versions`; SGLang does not, and then they are left unset).
"""

from __future__ import annotations

import functools
from typing import Any

import aiohttp

try:  # the same file under slime
    from slime.utils.types import Sample
except ImportError:
    from slipstream.types import Sample

from slipstream.demo.tool_task import CALL_CLOSE, CALL_OPEN, tool_result_text

MAX_TOOL_CALLS = 4
_SESSIONS: dict[int, aiohttp.ClientSession] = {}  # one HTTP session per event loop


@functools.cache
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


async def _post(url: str, payload: dict) -> dict:
    import asyncio

    loop = id(asyncio.get_running_loop())
    session = _SESSIONS.get(loop)
    if session is None or session.closed:
        connector = aiohttp.TCPConnector(limit=0)
        session = _SESSIONS[loop] = aiohttp.ClientSession(connector=connector)
    async with session.post(url, json=payload) as response:
        if response.status != 200:
            raise RuntimeError(f"POST {url}: {response.status} {await response.text()}")
        return await response.json()


def _append(
    sample: Sample, tokens: list[int], log_probs: list[float], versions: list[int] | None, trained: bool
):
    sample.tokens = list(sample.tokens) + tokens
    sample.response_length += len(tokens)
    sample.loss_mask = (sample.loss_mask or []) + [int(trained)] * len(tokens)
    sample.rollout_log_probs = (sample.rollout_log_probs or []) + log_probs
    if sample.policy_versions is not None and versions is not None:
        sample.policy_versions = sample.policy_versions + versions
    else:
        sample.policy_versions = None


async def generate(args: Any, sample: Sample, sampling_params: dict) -> Sample:
    url = f"http://{args.sglang_router_ip}:{args.sglang_router_port}/generate"
    tok = _tokenizer(args.hf_checkpoint)
    close_id = tok.convert_tokens_to_ids(CALL_CLOSE)
    if sample.response_length == 0:  # a fresh sample (a continued one keeps what it has)
        sample.tokens = list(tok(sample.prompt, add_special_tokens=False)["input_ids"])
        sample.loss_mask, sample.rollout_log_probs, sample.policy_versions = [], [], []
    budget = sampling_params["max_new_tokens"]  # what is left of the trajectory's response budget
    start = sample.response_length
    stops = [*sampling_params.get("stop_token_ids", []), close_id]
    for _ in range(MAX_TOOL_CALLS + 1):
        left = budget - (sample.response_length - start)
        if left <= 0:
            sample.status = Sample.Status.TRUNCATED
            break
        params = {**sampling_params, "max_new_tokens": left, "stop_token_ids": stops}
        out = await _post(
            url, {"input_ids": sample.tokens, "sampling_params": params, "return_logprob": True}
        )
        meta = out["meta_info"]
        ids = list(out["output_ids"])
        log_probs = [float(lp) for lp, _tok, _ in meta["output_token_logprobs"]]
        _append(sample, ids, log_probs, meta.get("output_token_versions"), trained=True)
        finish = meta["finish_reason"]["type"]
        if finish == "abort":
            sample.status = Sample.Status.ABORTED
            break
        if finish == "length":
            sample.status = Sample.Status.TRUNCATED
            break
        text = tok.decode(ids)
        if not (ids and ids[-1] == close_id and CALL_OPEN in text):
            sample.status = Sample.Status.COMPLETED  # the answer (ended by EOS)
            break
        result = tok(tool_result_text(text.rsplit(CALL_OPEN, 1)[1][:-1]), add_special_tokens=False)[
            "input_ids"
        ]
        last = sample.policy_versions[-1:] if sample.policy_versions else None
        _append(
            sample, list(result), [0.0] * len(result), last * len(result) if last else None, trained=False
        )
    else:
        sample.status = Sample.Status.TRUNCATED  # a call after the last allowed one
    sample.response = tok.decode(
        sample.tokens[len(sample.tokens) - sample.response_length :], skip_special_tokens=True
    )
    return sample


def final_answer(response: str) -> str:
    """What the model answered: the text after its last calculator result."""
    return response.rsplit(" ", 1)[-1] if "]" in response else response


async def reward(args: Any, sample: Sample) -> float:
    """1 for the right final answer (after the tool's last result), else 0."""
    return float(
        sample.status is not Sample.Status.TRUNCATED and final_answer(sample.response) == sample.label
    )
