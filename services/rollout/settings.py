"""What the rollout server reads from the config, resolved once in `serve()`.

Two small typed settings instead of the whole `Config` tree: `EngineConfig` is what an engine is
built from (checkpoint, device, dtype, batch, FP8, KV-cache dtype, int4), `ServerConfig` what the
server's rooms need (who it is, where the coordinator is, the sampling default, the swap mode).
"auto" values are resolved here, so every part sees one concrete device and dtype.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from slipstream.config import InfraConfig, ModelConfig, RolloutConfig, TrainConfig

if TYPE_CHECKING:
    import torch

PauseMode = Literal["drain", "abort", "in_place"]


@dataclass(frozen=True)
class EngineConfig:
    engine: str  # --rollout-engine: "native"
    model_path: str  # --hf-checkpoint: the checkpoint it serves
    device: str  # "cpu", "cuda", "cuda:1" (--device, "auto" resolved)
    dtype: str  # torch dtype name, "float32" or "bfloat16" (--dtype, "auto" resolved for the device)
    max_batch_size: int  # --rollout-max-batch-size
    max_seq_len: int  # --rollout-max-prompt-len + --rollout-max-response-len
    fp8: bool  # --rollout-fp8
    kv_cache_dtype: str  # --kv-cache-dtype
    int4_targets: str = ""  # --int4-qat-targets when the weights come as int4 (served W4A16); "" = not
    speculative_num_steps: int = 0  # --speculative-num-steps under --speculative-algorithm; 0 = no drafting
    mtp_num_layers: int = 0  # --mtp-num-layers: the draft head's depth
    draft_model_path: str = ""  # --speculative-draft-model-path; "" = the seeded version-0 init
    draft_in_weights: bool = False  # --enable-mtp-training: every weights version carries the draft
    unified_fp8: bool = False  # --fp8-format: the trainer computes with FP8-rounded projections
    true_on_policy: bool = False  # --true-on-policy-mode: batch-invariant kernels, bf16-valued weights

    @classmethod
    def from_sections(
        cls,
        model: ModelConfig,
        rollout: RolloutConfig,
        infra: InfraConfig,
        *,
        cuda_available: bool,
        train: TrainConfig | None = None,
    ) -> EngineConfig:
        """Auto device: CUDA when there is one; auto dtype: bfloat16 on CUDA, float32 elsewhere.
        `train` says the weights' wire format: int4 ones are served W4A16."""
        device = infra.device
        if device == "auto":
            device = "cuda" if cuda_available else "cpu"
        dtype = model.rollout_dtype(device)
        return cls(
            engine=rollout.rollout_engine,
            model_path=model.hf_checkpoint,
            device=device,
            dtype=dtype,
            max_batch_size=rollout.rollout_max_batch_size,
            max_seq_len=rollout.rollout_max_prompt_len + rollout.rollout_max_response_len,
            fp8=rollout.rollout_fp8,
            kv_cache_dtype=rollout.kv_cache_dtype,
            int4_targets=_int4_targets(train, device),
            speculative_num_steps=rollout.speculative_num_steps if rollout.speculative_algorithm else 0,
            mtp_num_layers=model.mtp_num_layers,
            draft_model_path=rollout.speculative_draft_model_path,
            draft_in_weights=train is not None and train.enable_mtp_training,
            unified_fp8=train is not None and bool(train.fp8_format),
            true_on_policy=train is not None and train.true_on_policy_mode,
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)


def _int4_targets(train: TrainConfig | None, device: str) -> str:
    """--int4-qat-targets when the trainer pushes int4 weights, else ""."""
    if train is None or train.effective_weight_sync_dtype(device.split(":")[0]) != "int4":
        return ""
    return train.int4_qat_targets


@dataclass(frozen=True)
class ServerConfig:
    server_id: str  # --server-id, or host:pid
    coordinator_addr: str  # --coordinator-addr; empty: Rollout.Generate only
    reconnect_timeout: float  # --reconnect-timeout: how long the coordinator may stay unreachable
    max_concurrent_samples: int  # said in Hello: --rollout-max-batch-size
    default_max_new_tokens: int  # for a request that names none: --rollout-max-response-len
    pause_mode: PauseMode  # what a weight swap does to work in flight (`version_gate.py`)
    http_port: int = 0  # --http-port: SGLang's HTTP API (`http_api.py`); 0 = off

    @classmethod
    def from_sections(cls, rollout: RolloutConfig, infra: InfraConfig) -> ServerConfig:
        """The swap mode is --pause-generation-mode under --partial-rollout, else drain."""
        return cls(
            server_id=infra.server_id or f"{socket.gethostname()}:{os.getpid()}",
            coordinator_addr=infra.coordinator_addr,
            reconnect_timeout=infra.reconnect_timeout,
            max_concurrent_samples=rollout.rollout_max_batch_size,
            default_max_new_tokens=rollout.rollout_max_response_len,
            pause_mode=rollout.pause_generation_mode if rollout.partial_rollout else "drain",
            http_port=infra.http_port,
        )
