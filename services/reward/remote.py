"""Remote reward-model endpoints, slime's protocol.

The request is one HTTP POST per sample to `--rm-url` with the JSON body
`{"prompt": ..., "response": ..., "label": ...}`; the reply body is the reward, either a JSON
number or an object whose `"reward"` is one (slime's `remote_rm` does exactly this, so a
reward server written for slime works here unchanged).

Transient trouble is retried with exponential backoff, up to `--rm-max-retries` times: a
refused or dropped connection, a timeout (`--rm-timeout` per attempt), an HTTP 5xx or 429.
Anything else (4xx, a body that is not a reward) is the endpoint's final word and fails the
sample at once with a one-line reason. The standard library's `urllib` does the HTTP, in a
worker thread, so the service needs no HTTP client dependency.

An endpoint that does not answer at all (refused, reset, timed out, a gateway's 502/503/504) trips
its circuit breaker after a few attempts in a row (breaker.py): the console says so, scoring fails
at once with `EndpointDown` until a probe gets an answer, and the samples are not failed.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from slipstream.services.reward import RewardConfigError
from slipstream.services.reward.breaker import STALL_WARN_S, Breaker, StallWatch
from slipstream.types import Sample

BACKOFF_S = 0.2
BACKOFF_MAX_S = 5.0
GATEWAY_DOWN = (502, 503, 504)  # a proxy's answer when the model behind it is gone


class RemoteRewardError(RuntimeError):
    """The endpoint did not produce a reward for this sample."""


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RewardConfigError(f"--rm-url {url}: not an http(s) URL")
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def check_reachable(url: str, timeout: float = 5.0) -> None:
    """Raise RewardConfigError (one line) unless something accepts TCP connections at `url`."""
    host, port = _host_port(url)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except ConnectionRefusedError:
        reason = "connection refused"
    except TimeoutError:
        reason = f"no answer after {timeout:g}s"
    except socket.gaierror as e:
        reason = f"unknown host ({e.strerror})"
    except OSError as e:
        reason = e.strerror or type(e).__name__
    raise RewardConfigError(f"--rm-url {url}: unreachable ({reason})")


def parse_reward(body: bytes, key: str = "reward") -> float:
    """The reward in a reply body: a JSON number, or an object with a numeric `key` (--reward-key)."""
    try:
        value: Any = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RemoteRewardError(f"reply is not JSON: {body[:100]!r}") from None
    if isinstance(value, dict):
        if key not in value:
            raise RemoteRewardError(f"reply object has no {key!r}: {sorted(value)[:10]}")
        value = value[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RemoteRewardError(f"reply reward is not a finite number: {str(value)[:100]}")
    return float(value)


class RemoteReward:
    """Scores a sample by POSTing it to a reward endpoint."""

    def __init__(
        self,
        url: str,
        timeout: float = 30.0,
        max_retries: int = 3,
        headers: dict[str, str] | None = None,
        reward_key: str = "reward",
    ):
        _host_port(url)
        self.url = url
        self.timeout = timeout
        self.max_retries = max_retries
        self.headers = {"Content-Type": "application/json", **(headers or {})}  # auth: never logged
        self.reward_key = reward_key or "reward"  # --reward-key: the entry of an object reply
        self.breaker = Breaker(url, self._probe)
        self.stalls = StallWatch(url, min(STALL_WARN_S, timeout / 2), timeout)
        self._last_failed = b"{}"  # what the probe sends: the last request that got no answer

    async def __call__(self, sample: Sample) -> float:
        """The reward; RemoteRewardError (the sample's failure), or EndpointDown (the endpoint's)."""
        # A chat prompt travels as its list of messages, as slime sends it.
        payload = {"prompt": sample.prompt, "response": sample.response, "label": sample.label}
        body = json.dumps(payload).encode()
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            self.breaker.check()
            token = self.stalls.sent()
            try:
                reply = await asyncio.to_thread(self._post, body)
            except _Transient as e:
                self.stalls.done(token, answered=not e.outage)
                if e.outage:
                    self._last_failed = body
                    self.breaker.outage(str(e))
                else:
                    self.breaker.answered()
                if attempt + 1 == attempts:
                    self.breaker.check()  # down: not this sample's failure
                    raise RemoteRewardError(f"{self.url}: {e} (after {attempts} attempts)") from None
                await asyncio.sleep(min(BACKOFF_S * 2**attempt, BACKOFF_MAX_S))
                continue
            except RemoteRewardError:
                self.stalls.done(token, answered=True)
                self.breaker.answered()
                raise
            self.stalls.done(token, answered=True)
            self.breaker.answered()
            return parse_reward(reply, self.reward_key)
        raise AssertionError("unreachable")

    async def _probe(self) -> bool:
        """One request to a down endpoint: True when it answered anything."""
        try:
            await asyncio.to_thread(self._post, self._last_failed)
        except _Transient as e:
            if e.outage:
                self.breaker.last_error = str(e)
                return False
        except RemoteRewardError:
            pass  # an answer, if not a reward
        return True

    def close(self) -> None:
        self.breaker.close()
        self.stalls.close()

    def score_payload(self, payload: dict[str, Any]) -> float:
        """POST `payload`, retrying transient failures; the reward, or RemoteRewardError. Blocking,
        and without the breaker (a one-off call: a check, a tool)."""
        body = json.dumps(payload).encode()
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            try:
                return parse_reward(self._post(body), self.reward_key)
            except _Transient as e:
                if attempt + 1 == attempts:
                    raise RemoteRewardError(f"{self.url}: {e} (after {attempts} attempts)") from None
                time.sleep(min(BACKOFF_S * 2**attempt, BACKOFF_MAX_S))
        raise AssertionError("unreachable")

    def _post(self, body: bytes) -> bytes:
        request = urllib.request.Request(self.url, data=body, method="POST", headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                return reply.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:200].decode(errors="replace").strip()
            message = f"HTTP {e.code}" + (f": {detail}" if detail else "")
            if e.code >= 500 or e.code == 429:
                raise _Transient(message, outage=e.code in GATEWAY_DOWN) from None
            raise RemoteRewardError(f"{self.url}: {message}") from None
        except urllib.error.URLError as e:
            raise _Transient(_reason(e.reason), outage=True) from None
        except (TimeoutError, ConnectionError) as e:  # timeouts and resets while reading the body
            raise _Transient(_reason(e), outage=True) from None


def read_header_file(path: str) -> dict[str, str]:
    """The one `Name: value` header line in `path` (a mounted secret), for every request."""
    try:
        line = Path(path).read_text().strip()
    except OSError as e:
        raise RewardConfigError(f"--rm-auth-header-file {path}: {e.strerror}") from None
    name, sep, value = line.partition(":")
    if not sep or not name.strip() or "\n" in line or " " in name.strip():
        raise RewardConfigError(f"--rm-auth-header-file {path}: expected one line `Name: value`")
    return {name.strip(): value.strip()}


class _Transient(Exception):
    """A failure worth another attempt; `outage`: the endpoint gave no answer of its own."""

    def __init__(self, message: str, outage: bool = False):
        super().__init__(message)
        self.outage = outage


def _reason(e: object) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    return str(e) or type(e).__name__
