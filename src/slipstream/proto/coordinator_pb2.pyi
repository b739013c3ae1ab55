from slipstream.proto import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Hello(_message.Message):
    __slots__ = ("server_id", "policy_version", "max_concurrent_samples", "host_id")
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    policy_version: int
    max_concurrent_samples: int
    host_id: str
    def __init__(self, server_id: _Optional[str] = ..., policy_version: _Optional[int] = ..., max_concurrent_samples: _Optional[int] = ..., host_id: _Optional[str] = ...) -> None: ...

class SampleResult(_message.Message):
    __slots__ = ("work_id", "lease_epoch", "sample")
    WORK_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    work_id: str
    lease_epoch: int
    sample: _types_pb2.Sample
    def __init__(self, work_id: _Optional[str] = ..., lease_epoch: _Optional[int] = ..., sample: _Optional[_Union[_types_pb2.Sample, _Mapping]] = ...) -> None: ...

class ResultBatch(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SampleResult]
    def __init__(self, results: _Optional[_Iterable[_Union[SampleResult, _Mapping]]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("policy_version", "num_running", "idle_seconds", "uptime_seconds")
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    IDLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    policy_version: int
    num_running: int
    idle_seconds: float
    uptime_seconds: float
    def __init__(self, policy_version: _Optional[int] = ..., num_running: _Optional[int] = ..., idle_seconds: _Optional[float] = ..., uptime_seconds: _Optional[float] = ...) -> None: ...

class WeightsApplied(_message.Message):
    __slots__ = ("version", "ok", "error", "seconds")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    version: int
    ok: bool
    error: str
    seconds: float
    def __init__(self, version: _Optional[int] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ..., seconds: _Optional[float] = ...) -> None: ...

class RolloutEvent(_message.Message):
    __slots__ = ("hello", "result", "heartbeat", "weights_applied", "results")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_APPLIED_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    result: SampleResult
    heartbeat: Heartbeat
    weights_applied: WeightsApplied
    results: ResultBatch
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., result: _Optional[_Union[SampleResult, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., weights_applied: _Optional[_Union[WeightsApplied, _Mapping]] = ..., results: _Optional[_Union[ResultBatch, _Mapping]] = ...) -> None: ...

class WorkItem(_message.Message):
    __slots__ = ("work_id", "lease_epoch", "sample", "sampling", "min_policy_version")
    WORK_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MIN_POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    work_id: str
    lease_epoch: int
    sample: _types_pb2.Sample
    sampling: _types_pb2.SamplingParams
    min_policy_version: int
    def __init__(self, work_id: _Optional[str] = ..., lease_epoch: _Optional[int] = ..., sample: _Optional[_Union[_types_pb2.Sample, _Mapping]] = ..., sampling: _Optional[_Union[_types_pb2.SamplingParams, _Mapping]] = ..., min_policy_version: _Optional[int] = ...) -> None: ...

class WorkBatch(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[WorkItem]
    def __init__(self, items: _Optional[_Iterable[_Union[WorkItem, _Mapping]]] = ...) -> None: ...

class AbortWork(_message.Message):
    __slots__ = ("work_ids",)
    WORK_IDS_FIELD_NUMBER: _ClassVar[int]
    work_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, work_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class NewWeights(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class RolloutCommand(_message.Message):
    __slots__ = ("work", "new_weights", "shutdown", "abort", "work_batch")
    WORK_FIELD_NUMBER: _ClassVar[int]
    NEW_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SHUTDOWN_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    WORK_BATCH_FIELD_NUMBER: _ClassVar[int]
    work: WorkItem
    new_weights: NewWeights
    shutdown: bool
    abort: AbortWork
    work_batch: WorkBatch
    def __init__(self, work: _Optional[_Union[WorkItem, _Mapping]] = ..., new_weights: _Optional[_Union[NewWeights, _Mapping]] = ..., shutdown: _Optional[bool] = ..., abort: _Optional[_Union[AbortWork, _Mapping]] = ..., work_batch: _Optional[_Union[WorkBatch, _Mapping]] = ...) -> None: ...

class PushWeightsReply(_message.Message):
    __slots__ = ("version", "num_servers_notified")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_SERVERS_NOTIFIED_FIELD_NUMBER: _ClassVar[int]
    version: int
    num_servers_notified: int
    def __init__(self, version: _Optional[int] = ..., num_servers_notified: _Optional[int] = ...) -> None: ...

class FetchWeightsRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class TrainerProgress(_message.Message):
    __slots__ = ("step", "num_groups_consumed", "finished")
    STEP_FIELD_NUMBER: _ClassVar[int]
    NUM_GROUPS_CONSUMED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    step: int
    num_groups_consumed: int
    finished: bool
    def __init__(self, step: _Optional[int] = ..., num_groups_consumed: _Optional[int] = ..., finished: _Optional[bool] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CoordinatorStatus(_message.Message):
    __slots__ = ("policy_version", "num_groups_dispatched", "num_groups_completed", "num_samples_in_flight", "num_rollout_servers", "server_versions", "finished", "num_reward_failures", "num_partials_recycled", "num_groups_filtered", "num_stale_samples", "rollout_idle_fraction", "weights_held", "trainer_step", "max_staleness", "num_dead_lettered", "servers", "buffer")
    class ServerVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_GROUPS_DISPATCHED_FIELD_NUMBER: _ClassVar[int]
    NUM_GROUPS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    NUM_ROLLOUT_SERVERS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    NUM_REWARD_FAILURES_FIELD_NUMBER: _ClassVar[int]
    NUM_PARTIALS_RECYCLED_FIELD_NUMBER: _ClassVar[int]
    NUM_GROUPS_FILTERED_FIELD_NUMBER: _ClassVar[int]
    NUM_STALE_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_IDLE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_HELD_FIELD_NUMBER: _ClassVar[int]
    TRAINER_STEP_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_FIELD_NUMBER: _ClassVar[int]
    NUM_DEAD_LETTERED_FIELD_NUMBER: _ClassVar[int]
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    BUFFER_FIELD_NUMBER: _ClassVar[int]
    policy_version: int
    num_groups_dispatched: int
    num_groups_completed: int
    num_samples_in_flight: int
    num_rollout_servers: int
    server_versions: _containers.ScalarMap[str, int]
    finished: bool
    num_reward_failures: int
    num_partials_recycled: int
    num_groups_filtered: int
    num_stale_samples: int
    rollout_idle_fraction: float
    weights_held: bool
    trainer_step: int
    max_staleness: int
    num_dead_lettered: int
    servers: _containers.RepeatedCompositeFieldContainer[RolloutServerStatus]
    buffer: BufferStatus
    def __init__(self, policy_version: _Optional[int] = ..., num_groups_dispatched: _Optional[int] = ..., num_groups_completed: _Optional[int] = ..., num_samples_in_flight: _Optional[int] = ..., num_rollout_servers: _Optional[int] = ..., server_versions: _Optional[_Mapping[str, int]] = ..., finished: _Optional[bool] = ..., num_reward_failures: _Optional[int] = ..., num_partials_recycled: _Optional[int] = ..., num_groups_filtered: _Optional[int] = ..., num_stale_samples: _Optional[int] = ..., rollout_idle_fraction: _Optional[float] = ..., weights_held: _Optional[bool] = ..., trainer_step: _Optional[int] = ..., max_staleness: _Optional[int] = ..., num_dead_lettered: _Optional[int] = ..., servers: _Optional[_Iterable[_Union[RolloutServerStatus, _Mapping]]] = ..., buffer: _Optional[_Union[BufferStatus, _Mapping]] = ...) -> None: ...

class BufferStatus(_message.Message):
    __slots__ = ("num_groups", "num_pending")
    NUM_GROUPS_FIELD_NUMBER: _ClassVar[int]
    NUM_PENDING_FIELD_NUMBER: _ClassVar[int]
    num_groups: int
    num_pending: int
    def __init__(self, num_groups: _Optional[int] = ..., num_pending: _Optional[int] = ...) -> None: ...

class RolloutServerStatus(_message.Message):
    __slots__ = ("server_id", "policy_version", "num_in_flight", "max_concurrent", "idle_fraction", "seconds_since_heard", "host_id")
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_FIELD_NUMBER: _ClassVar[int]
    IDLE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_HEARD_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    policy_version: int
    num_in_flight: int
    max_concurrent: int
    idle_fraction: float
    seconds_since_heard: float
    host_id: str
    def __init__(self, server_id: _Optional[str] = ..., policy_version: _Optional[int] = ..., num_in_flight: _Optional[int] = ..., max_concurrent: _Optional[int] = ..., idle_fraction: _Optional[float] = ..., seconds_since_heard: _Optional[float] = ..., host_id: _Optional[str] = ...) -> None: ...

class JournalGroup(_message.Message):
    __slots__ = ("group_id", "samples", "results", "version", "deadline", "parked")
    class ResultsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: _types_pb2.Sample
        def __init__(self, key: _Optional[int] = ..., value: _Optional[_Union[_types_pb2.Sample, _Mapping]] = ...) -> None: ...
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    PARKED_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    samples: _containers.RepeatedCompositeFieldContainer[_types_pb2.Sample]
    results: _containers.MessageMap[int, _types_pb2.Sample]
    version: int
    deadline: int
    parked: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, group_id: _Optional[str] = ..., samples: _Optional[_Iterable[_Union[_types_pb2.Sample, _Mapping]]] = ..., results: _Optional[_Mapping[int, _types_pb2.Sample]] = ..., version: _Optional[int] = ..., deadline: _Optional[int] = ..., parked: _Optional[_Iterable[int]] = ...) -> None: ...
