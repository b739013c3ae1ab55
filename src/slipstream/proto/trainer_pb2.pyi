from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class GetStateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TrainerState(_message.Message):
    __slots__ = ("step", "policy_version", "num_groups_consumed", "finished")
    STEP_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_GROUPS_CONSUMED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    step: int
    policy_version: int
    num_groups_consumed: int
    finished: bool
    def __init__(self, step: _Optional[int] = ..., policy_version: _Optional[int] = ..., num_groups_consumed: _Optional[int] = ..., finished: _Optional[bool] = ...) -> None: ...
