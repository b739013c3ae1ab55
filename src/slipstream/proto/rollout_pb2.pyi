from slipstream.proto import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("samples", "sampling")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    samples: _containers.RepeatedCompositeFieldContainer[_types_pb2.Sample]
    sampling: _types_pb2.SamplingParams
    def __init__(self, samples: _Optional[_Iterable[_Union[_types_pb2.Sample, _Mapping]]] = ..., sampling: _Optional[_Union[_types_pb2.SamplingParams, _Mapping]] = ...) -> None: ...

class GenerateReply(_message.Message):
    __slots__ = ("samples",)
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    samples: _containers.RepeatedCompositeFieldContainer[_types_pb2.Sample]
    def __init__(self, samples: _Optional[_Iterable[_Union[_types_pb2.Sample, _Mapping]]] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RolloutInfo(_message.Message):
    __slots__ = ("server_id", "policy_version", "num_running", "engine", "num_generated_tokens")
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    NUM_GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    policy_version: int
    num_running: int
    engine: str
    num_generated_tokens: int
    def __init__(self, server_id: _Optional[str] = ..., policy_version: _Optional[int] = ..., num_running: _Optional[int] = ..., engine: _Optional[str] = ..., num_generated_tokens: _Optional[int] = ...) -> None: ...
