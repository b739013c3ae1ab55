"""A buffer stream entry's payload: one field of protobuf bytes, checked as it is read.

A payload that does not decode, or decodes to a message the trainer cannot use, raises
`CorruptPayload`; the readers (`replay.py`, `partials.py`) move such an entry to the dead-letter
stream instead of crashing.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from slipstream.proto import types_pb2
from slipstream.rpc.convert import SampleError, check_sample, sample_metadata

PAYLOAD = b"p"  # the one field of a stream entry: the protobuf bytes


def as_str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class CorruptPayload(ValueError):
    """A stream entry whose payload is not the message it should be."""


def _parse(fields: dict[bytes, bytes], message, name: str):
    """The entry's payload parsed into `message` (a fresh protobuf message of type `name`)."""
    data = fields.get(PAYLOAD)
    if data is None:
        raise CorruptPayload(f"no {PAYLOAD.decode()!r} field (fields: {sorted(k.decode() for k in fields)})")
    try:
        message.ParseFromString(data)
    except DecodeError as e:
        raise CorruptPayload(f"not a {name}: {e}") from None
    return message


def decode_group(fields: dict[bytes, bytes]) -> types_pb2.Group:
    group = _parse(fields, types_pb2.Group(), "Group")
    if not group.samples:
        raise CorruptPayload("Group without samples")
    try:  # parseable is not enough: the trainer must be able to use every number in it
        for sample in group.samples:
            check_sample(sample)
            sample_metadata(sample)  # what converting it checks beyond check_sample
    except SampleError as e:
        raise CorruptPayload(str(e)) from None
    return group


def decode_sample(fields: dict[bytes, bytes]) -> types_pb2.Sample:
    return _parse(fields, types_pb2.Sample(), "Sample")
