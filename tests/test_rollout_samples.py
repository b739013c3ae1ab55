"""The rollout server's pure pieces: sample assembly (`samples.py`) and its settings (`settings.py`).

A real tokenizer (the demo's character tokenizer) and real config sections; no engine, no network.
"""

from __future__ import annotations

import pytest

from slipstream.config import config_from_values
from slipstream.demo.tokenizer import build_char_tokenizer
from slipstream.models import Qwen3Config
from slipstream.proto import types_pb2
from slipstream.services.rollout.engine import Result
from slipstream.services.rollout.samples import eos_token_ids, finish_sample, make_request, with_status
from slipstream.services.rollout.settings import EngineConfig, ServerConfig


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_char_tokenizer(tmp_path_factory.mktemp("tok"))


def test_unset_sampling_fields_mean_the_defaults():
    sample = types_pb2.Sample(tokens=[1, 2, 3])
    req = make_request("r", sample, types_pb2.SamplingParams(temperature=0.7), default_max_new_tokens=9)
    assert (req.rid, req.tokens, req.max_new_tokens, req.temperature) == (
        "r",
        [1, 2, 3],
        9,
        pytest.approx(0.7),
    )
    assert (req.top_p, req.top_k, req.seed, req.stop_token_ids) == (1.0, -1, None, [])
    given = types_pb2.SamplingParams(max_new_tokens=4, top_p=0.5, top_k=3, seed=11, stop_token_ids=[7])
    req = make_request("r", sample, given, default_max_new_tokens=9)
    assert (req.max_new_tokens, req.top_p, req.top_k, req.seed, req.stop_token_ids) == (4, 0.5, 3, 11, [7])


def test_parameters_the_engine_cannot_use_are_a_value_error():
    sample = types_pb2.Sample(tokens=[1])
    with pytest.raises(ValueError, match="temperature"):
        make_request("r", sample, types_pb2.SamplingParams(temperature=-1.0), 4)
    with pytest.raises(ValueError, match="empty prompt"):
        make_request("r", types_pb2.Sample(), types_pb2.SamplingParams(), 4)


def test_a_finished_sample_carries_the_response_and_its_status(tokenizer):
    prompt = tokenizer.encode("12+3=")
    answer = tokenizer.encode("15")
    sample = types_pb2.Sample(tokens=prompt, prompt="12+3=")
    out = finish_sample(sample, Result("r", answer, [-0.5, -0.25], [3, 3], "stop"), tokenizer)
    assert list(out.tokens) == prompt + answer and out.response_length == 2
    assert out.response == "15" and out.prompt == "12+3="
    assert list(out.rollout_log_probs) == [-0.5, -0.25] and list(out.policy_versions) == [3, 3]
    assert list(out.loss_mask) == [1, 1]
    assert out.status == types_pb2.SAMPLE_STATUS_COMPLETED
    assert list(sample.tokens) == prompt  # the input is not changed
    for reason, status in [
        ("length", types_pb2.SAMPLE_STATUS_TRUNCATED),
        ("abort", types_pb2.SAMPLE_STATUS_ABORTED),
    ]:
        assert finish_sample(sample, Result("r", [], [], [], reason), tokenizer).status == status


def test_a_continued_sample_keeps_its_earlier_part(tokenizer):
    """A partial (aborted, sent back) is continued: the new tokens are appended to the old response."""
    prompt, first, rest = tokenizer.encode("7*6="), tokenizer.encode("4"), tokenizer.encode("2")
    partial = types_pb2.Sample(
        tokens=prompt + first, response_length=1, rollout_log_probs=[-0.1], policy_versions=[1], loss_mask=[1]
    )
    out = finish_sample(partial, Result("r", rest, [-0.2], [2], "stop"), tokenizer)
    assert list(out.tokens) == prompt + first + rest and out.response_length == 2
    assert out.response == "42"
    assert list(out.rollout_log_probs) == pytest.approx([-0.1, -0.2]) and list(out.policy_versions) == [1, 2]
    assert list(out.loss_mask) == [1, 1]


def test_with_status_changes_the_status_only():
    sample = types_pb2.Sample(tokens=[1, 2], response_length=1, status=types_pb2.SAMPLE_STATUS_ABORTED)
    out = with_status(sample, types_pb2.SAMPLE_STATUS_FAILED)
    assert (
        out.status == types_pb2.SAMPLE_STATUS_FAILED
        and list(out.tokens) == [1, 2]
        and out.response_length == 1
    )
    assert sample.status == types_pb2.SAMPLE_STATUS_ABORTED


def test_eos_ids_come_from_config_and_tokenizer(tokenizer):
    eos = tokenizer.eos_token_id
    assert eos_token_ids(Qwen3Config(eos_token_id=[1, 2]), tokenizer) == [1, 2, eos]
    assert eos_token_ids(Qwen3Config(eos_token_id=eos), tokenizer) == [eos]  # not twice


def test_no_eos_anywhere_is_refused(tokenizer):
    class NoEos:  # a tokenizer without an EOS token (some base models ship one)
        eos_token_id = None

        def decode(self, token_ids, skip_special_tokens=False):
            return ""

    with pytest.raises(ValueError, match="no EOS token"):
        eos_token_ids(Qwen3Config(eos_token_id=None), NoEos())


def test_engine_settings_resolve_auto_device_and_dtype():
    cfg = config_from_values(
        {
            "hf_checkpoint": "m",
            "rollout_max_prompt_len": 16,
            "rollout_max_response_len": 8,
            "rollout_fp8": True,
        }
    )
    cpu = EngineConfig.from_sections(cfg.model, cfg.rollout, cfg.infra, cuda_available=False)
    assert (cpu.engine, cpu.model_path, cpu.device, cpu.dtype, cpu.max_seq_len) == (
        "native",
        "m",
        "cpu",
        "float32",
        24,
    )
    assert (
        cpu.fp8 and cpu.kv_cache_dtype == "auto" and cpu.max_batch_size == cfg.rollout.rollout_max_batch_size
    )
    gpu = EngineConfig.from_sections(cfg.model, cfg.rollout, cfg.infra, cuda_available=True)
    assert (gpu.device, gpu.dtype) == ("cuda", "bfloat16")
    pinned = config_from_values({"device": "cuda:1", "dtype": "float32"})
    got = EngineConfig.from_sections(pinned.model, pinned.rollout, pinned.infra, cuda_available=False)
    assert (got.device, got.dtype) == ("cuda:1", "float32")
    import torch

    assert got.torch_dtype is torch.float32


def test_server_settings_swap_mode_and_defaults():
    cfg = config_from_values({"server_id": "r-0", "rollout_max_response_len": 7, "rollout_max_batch_size": 5})
    s = ServerConfig.from_sections(cfg.rollout, cfg.infra)
    assert (s.server_id, s.default_max_new_tokens, s.max_concurrent_samples, s.pause_mode) == (
        "r-0",
        7,
        5,
        "drain",
    )
    partial = config_from_values({"partial_rollout": True, "pause_generation_mode": "in_place"})
    assert ServerConfig.from_sections(partial.rollout, partial.infra).pause_mode == "in_place"
    assert ":" in ServerConfig.from_sections(partial.rollout, partial.infra).server_id  # host:pid
