"""Weights on the wire: a versioned manifest plus sha256-checked chunks of one blob.

`pack` / `iter_messages` write a version (trainer side); `WeightStager` reads, verifies and
decodes one (rollout side). The coordinator only relays the messages. When trainer and rollout
server share a GPU, `IpcExporter` sends the same stream with a CUDA IPC handle instead of bytes;
when they share a host, `ShmExporter` with the name of a /dev/shm file holding the bytes.
"""

from slipstream.weights.ipc import IpcExporter
from slipstream.weights.packer import WeightError, iter_messages, model_fingerprint, pack, weights_to_sync
from slipstream.weights.shm import ShmExporter
from slipstream.weights.stager import WeightStager

__all__ = [
    "IpcExporter",
    "ShmExporter",
    "WeightError",
    "WeightStager",
    "iter_messages",
    "model_fingerprint",
    "pack",
    "weights_to_sync",
]
