"""The reward service: rule rewards by hand, then the real gRPC service with each reward source.

The remote endpoint is a real HTTP server on 127.0.0.1 (port 0) in a thread; the gRPC service
runs in the test's event loop on port 0; nothing of ours is mocked.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from slipstream.config import config_from_values
from slipstream.proto import reward_pb2, reward_pb2_grpc, types_pb2
from slipstream.rpc.channel import aio_channel
from slipstream.services.reward import RewardConfigError
from slipstream.services.reward.custom import load_function
from slipstream.services.reward.remote import check_reachable
from slipstream.services.reward.rules import exact_match, extract_answer, label_answer, math_reward
from slipstream.services.reward.server import build_scorer, start_reward_server

# ---- rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, label, want",
    [
        ("2 + 2 = 4, so the answer is \\boxed{4}.", "4", 1.0),
        ("\\boxed{5}", "4", 0.0),
        ("First 3, then 7. Finally \\boxed{12}", "12", 1.0),
        ("The answer is 42.", "42", 1.0),
        ("The answer is 42 apples.", "42", 1.0),
        ("The answer is 41 apples.", "42", 0.0),
        ("Answer: 7.0", "7", 1.0),
        ("so she pays #### 1,000", "1000", 1.0),
        ("It costs 1,234,567 dollars", "1234567", 1.0),
        ("We get 3/4", "0.75", 1.0),
        ("$\\boxed{\\frac{3}{4}}$", "0.75", 1.0),
        ("\\boxed{\\dfrac{-1}{2}}", "-0.5", 1.0),
        ("the result is -5", "-5", 1.0),
        ("the result is -5", "5", 0.0),
        ("x is 2.50", "2.5", 1.0),
        ("the number is 10", "#### 10", 1.0),  # GSM8K-style label
        ("\\boxed{50\\%}", "50", 1.0),
        ("\\boxed{\\text{Paris}}", "paris", 1.0),
        ("Paris", "Paris", 1.0),
        ("The answer is (B).", "B", 1.0),
        ("\\boxed{\\sqrt{4}}", "2", 1.0),  # math_verify: symbolic
        ("\\boxed{x+1}", "1+x", 1.0),  # math_verify: symbolic
        ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\sqrt{2}/2", 1.0),
        ("no idea", "3", 0.0),
        ("", "3", 0.0),
        ("\\boxed{}", "3", 0.0),
    ],
)
def test_math_reward(response: str, label: str, want: float):
    assert math_reward(response, label) == want


def test_extract_answer_prefers_boxed_then_markers_then_last_number():
    assert extract_answer("1 and 2, \\boxed{\\frac{1}{2}} and 9") == "\\frac{1}{2}"
    assert extract_answer("3 then #### 8\nlater 9") == "8"
    assert extract_answer("so the final answer is: 11. Also 12") == "11. Also 12"
    assert extract_answer("values 3, 5 and 8") == "8"
    assert extract_answer("nothing") is None


def test_missing_label_raises_rather_than_scoring_zero():
    with pytest.raises(ValueError, match="no label"):
        math_reward("\\boxed{1}", "")


@pytest.mark.parametrize(
    "response, label",
    [
        ("19", "The answer is 19."),
        ("19", "The sum is 19"),  # issue 13: was 0 while "The answer is 19." was 1
        ("\\boxed{19}", "The sum is 19"),
        ("The sum is 19", "The sum is 19"),
        ("so 19", "The answer is 19 apples."),
        ("\\boxed{1000}", "The total is 1,000 dollars."),
        ("\\boxed{New York}", "The answer is New York"),
    ],
)
def test_prose_labels_go_through_the_responses_extraction(response: str, label: str):
    assert math_reward(response, label) == 1.0
    assert (
        math_reward(response.replace("19", "18").replace("1000", "999").replace("York", "Jersey"), label)
        == 0.0
    )


@pytest.mark.parametrize(
    "label, want",
    [
        ("The answer is 19.", "19"),
        ("The sum is 19", "19"),
        ("19 apples", "19"),
        ("... #### 72", "72"),
        ("\\boxed{x+1}", "x+1"),
        # answers already: kept whole (no "last number" of "x+1")
        ("x+1", "x+1"),
        ("\\frac{3}{4}", "\\frac{3}{4}"),
        ("(B)", "(B)"),
        ("New York", "New York"),
        # a sentence with no answer in it: None (preflight warns about these)
        ("The capital is Paris", None),
    ],
)
def test_label_answer(label: str, want: str | None):
    assert label_answer(label) == want


def test_exact_match():
    assert exact_match("  yes\n", "yes") == 1.0
    assert exact_match("Yes", "yes") == 0.0


# ---- HTTP endpoint for remote rewards ------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    calls: dict[str, int] = {}

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _reply(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (the /slow case): expected

    def do_POST(self) -> None:
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        n = self.calls[self.path] = self.calls.get(self.path, 0) + 1
        if self.path == "/number":  # slime-style: reward = response equals label
            self._reply(200, json.dumps(float(payload["response"] == payload["label"])).encode())
        elif self.path == "/object":
            self._reply(200, json.dumps({"reward": 0.25, "prompt_seen": payload["prompt"]}).encode())
        elif self.path == "/flaky":  # fails twice, then works: retries must get through
            self._reply(503, b"busy") if n <= 2 else self._reply(200, b"1.5")
        elif self.path == "/error500":
            self._reply(500, b"model crashed")
        elif self.path == "/bad-request":
            self._reply(400, b"missing field")
        elif self.path == "/not-json":
            self._reply(200, b"<html>")
        elif self.path == "/slow":
            time.sleep(1.0)
            self._reply(200, b"1.0")


@pytest.fixture(scope="module")
def http_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nobody listens


# ---- the service over real gRPC ------------------------------------------------------------


def sample(i: int, response: str, label: str | None = "4", prompt: str = "2+2?") -> types_pb2.Sample:
    return types_pb2.Sample(uid=f"p/{i}", index=i, prompt=prompt, response=response, label=label or "")


def score(values: dict, samples: list[types_pb2.Sample]) -> list[reward_pb2.ScoreResult]:
    """Start the service for `values`, send one Score request, stop; the results."""
    cfg = config_from_values({"port": 0, **values})

    async def go() -> list[reward_pb2.ScoreResult]:
        service, _ = await start_reward_server(cfg)
        try:
            async with aio_channel(f"127.0.0.1:{service.port}") as channel:
                reply = await reward_pb2_grpc.RewardStub(channel).Score(
                    reward_pb2.ScoreRequest(samples=samples), timeout=20
                )
        finally:
            await service.stop(grace=0.5)
        return list(reply.results)

    return asyncio.run(go())


def test_service_scores_a_batch_in_order_with_failures_marked():
    results = score(
        {"rm_type": "math"},
        [
            sample(0, "so \\boxed{4}"),
            sample(1, "I think 5"),
            sample(2, "\\boxed{4}", label=None),  # no label: cannot be graded
            sample(3, "the answer is 4"),
        ],
    )
    assert [r.reward for r in results] == [1.0, 0.0, 0.0, 1.0]
    assert [r.failed for r in results] == [False, False, True, False]
    assert "no label" in results[2].error and "\n" not in results[2].error
    assert results[1].error == ""  # a wrong answer is a zero, not a failure


def test_service_empty_request():
    assert score({"rm_type": "exact"}, []) == []


def test_custom_reward_from_file(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(
        "import asyncio\n"
        "def length_reward(args, sample):\n"
        "    if sample.response == 'boom':\n"
        "        raise RuntimeError('cannot score boom')\n"
        "    assert args.n_samples_per_prompt == 3  # the flat slime namespace\n"
        "    return len(sample.response) / 10\n"
        "async def dict_reward(args, sample):\n"
        "    await asyncio.sleep(0)\n"
        "    return {'reward': 2.0 if sample.label == '4' else -1.0, 'acc': 1}\n"
        "def nan_reward(args, sample):\n"
        "    return float('nan')\n"
    )
    results = score(
        {"custom_rm_path": f"{path}:length_reward", "n_samples_per_prompt": 3},
        [sample(0, "abcde"), sample(1, "boom"), sample(2, "")],
    )
    assert [(r.reward, r.failed) for r in results] == [(0.5, False), (0.0, True), (0.0, False)]
    assert results[1].error == "RuntimeError: cannot score boom"

    results = score({"custom_rm_path": f"{path}:dict_reward"}, [sample(0, "x"), sample(1, "y", label="5")])
    assert [r.reward for r in results] == [2.0, -1.0]

    (nan,) = score({"custom_rm_path": f"{path}:nan_reward"}, [sample(0, "x")])
    assert nan.failed and "nan" in nan.error  # never a silent NaN reward


def test_custom_reward_by_module_path():
    # Any importable module works: a stdlib function with two arguments stands in for a user's.
    fn = load_function("operator:add")
    assert fn(1, 2) == 3


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_colon_here", "expected module:function"),
        ("/nonexistent/reward.py:f", "no such file"),
        ("surely_not_a_module_xyz:f", "cannot import: ModuleNotFoundError"),
        ("operator:no_such_function", "has no attribute 'no_such_function'"),
        ("math:pi", "'pi' is not callable"),
    ],
)
def test_custom_reward_path_errors_are_one_line(spec: str, message: str):
    with pytest.raises(RewardConfigError, match=message) as info:
        build_scorer(config_from_values({"custom_rm_path": spec}))
    assert "\n" not in str(info.value) and str(info.value).startswith(
        f"--custom-rm-path {spec.split(':')[0]}"
    )


def test_custom_reward_file_that_raises_on_import(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("raise ImportError('needs a GPU')\n")
    with pytest.raises(RewardConfigError, match="cannot import: ImportError: needs a GPU"):
        build_scorer(config_from_values({"custom_rm_path": f"{path}:f"}))


def test_unknown_rm_type_lists_the_choices():
    with pytest.raises(
        RewardConfigError,
        match=r"--rm-type bleu: unknown \(choices: math, exact, deepscaler, dapo, f1, remote_rm",
    ):
        build_scorer(config_from_values({"rm_type": "bleu"}))


def test_custom_path_wins_over_rm_url(tmp_path):
    path = tmp_path / "r.py"
    path.write_text("def f(args, sample):\n    return 7\n")
    scorer = build_scorer(
        config_from_values({"custom_rm_path": f"{path}:f", "rm_url": "http://127.0.0.1:1/"})
    )
    assert type(scorer).__name__ == "CustomReward"


def test_remote_reward_number_and_object_replies(http_url: str):
    (right, wrong) = score({"rm_url": f"{http_url}/number"}, [sample(0, "4"), sample(1, "5")])
    assert (right.reward, right.failed, wrong.reward, wrong.failed) == (1.0, False, 0.0, False)
    chat = types_pb2.Sample(
        uid="c/0", prompt=json.dumps([{"role": "user", "content": "hi"}]), response="r", label="l"
    )
    (obj,) = score({"rm_url": f"{http_url}/object", "rm_type": "remote_rm"}, [chat])
    assert obj.reward == 0.25 and not obj.failed


def test_remote_reward_retries_transient_errors(http_url: str):
    (r,) = score({"rm_url": f"{http_url}/flaky", "rm_max_retries": 3}, [sample(0, "x")])
    assert (r.reward, r.failed) == (1.5, False)
    assert _Handler.calls["/flaky"] == 3


def test_remote_reward_failures_are_marked_failed(http_url: str):
    cases = {
        "/error500": "HTTP 500: model crashed (after 2 attempts)",
        "/bad-request": "HTTP 400: missing field",
        "/not-json": "reply is not JSON",
        "/slow": "timed out (after 1 attempts)",
    }
    for path, message in cases.items():
        retries = 0 if path == "/slow" else 1
        (r,) = score(
            {"rm_url": f"{http_url}{path}", "rm_timeout": 0.3, "rm_max_retries": retries}, [sample(0, "x")]
        )
        assert r.failed and r.reward == 0.0, path
        assert message in r.error, (path, r.error)
    assert _Handler.calls["/bad-request"] == 1  # a 4xx is final: not retried


def test_check_reachable_closed_port_is_one_line():
    url = f"http://127.0.0.1:{closed_port()}/score"
    with pytest.raises(RewardConfigError) as info:
        check_reachable(url, timeout=2.0)
    assert str(info.value) == f"--rm-url {url}: unreachable (connection refused)"


def test_check_reachable_open_port(http_url: str):
    check_reachable(f"{http_url}/number")  # no exception


# ---- the entry point -----------------------------------------------------------------------


def test_main_help_is_fast_and_unreachable_url_exits_with_one_line():
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "slipstream.services.reward", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0 and "--rm-url" in out.stdout
    assert time.monotonic() - start < 5.0
    assert "grpc" not in subprocess.run(
        [sys.executable, "-c", "import sys, slipstream.services.reward.__main__; print(sorted(sys.modules))"],
        capture_output=True, text=True, timeout=30,
    ).stdout  # fmt: skip

    url = f"http://127.0.0.1:{closed_port()}/"
    out = subprocess.run(
        [sys.executable, "-m", "slipstream.services.reward", "--rm-url", url, "--port", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert (
        out.stderr.strip().splitlines()[-1]
        == f"slipstream reward: error: --rm-url {url}: unreachable (connection refused)"
    )
