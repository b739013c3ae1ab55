"""Prompt data: reading JSONL/Parquet records, validating them, turning prompts into tokens.

Every record is checked when the file is opened, so a malformed line fails the run at start
with one line naming the file and line number, not hours later when the cursor reaches it. A
reward that grades against labels (`--rm-type math|exact`) asks for `require_label`: a record
without one would score nothing and be dead-lettered, so it fails the run at start instead.
`encode_prompt` is the one place prompts become tokens: the coordinator, the demo's SFT
warm start and the benchmarks all call it, so they see the same tokens.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A prompt file that cannot be used; the message names the file (and line)."""


@dataclass
class PromptRecord:
    prompt: str | list[dict[str, str]]
    label: str
    metadata: dict[str, Any] = field(default_factory=dict)
    where: str = ""  # "file:line", for messages about this record


def _records_from_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            obj["__line__"] = lineno
            records.append(obj)
    return records


def _records_from_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    rows = pq.read_table(path).to_pylist()
    for i, row in enumerate(rows, 1):
        row["__line__"] = i
    return rows


def load_prompts(
    path: str,
    input_key: str = "prompt",
    label_key: str = "label",
    metadata_key: str = "metadata",
    require_label: bool = False,
) -> list[PromptRecord]:
    """Read and validate every record of a JSONL or Parquet prompt file.

    With `require_label` a record without a non-empty `label_key` is an error, not an empty label.
    """
    p = Path(path)
    if not path:
        raise DataError("--prompt-data is required")
    if not p.is_file():
        raise DataError(f"--prompt-data {path}: no such file")
    raw = _records_from_parquet(p) if p.suffix == ".parquet" else _records_from_jsonl(p)
    if not raw:
        raise DataError(f"{path}: no records")
    out = []
    for obj in raw:
        where = f"{path}:{obj['__line__']}"
        if input_key not in obj:
            raise DataError(f"{where}: missing key {input_key!r} (--input-key)")
        prompt = obj[input_key]
        if not isinstance(prompt, str | list):
            raise DataError(f"{where}: {input_key!r} must be a string or a list of chat messages")
        label = obj.get(label_key, "")
        if require_label and label_key not in obj:
            raise DataError(f"{where}: missing key {label_key!r} (--label-key)")
        if require_label and (label is None or not str(label).strip()):
            raise DataError(f"{where}: empty {label_key!r} (--label-key)")
        metadata = obj.get(metadata_key) or {}
        if not isinstance(metadata, dict):
            raise DataError(f"{where}: {metadata_key!r} must be an object")
        label = "" if label is None else str(label)
        out.append(PromptRecord(prompt=prompt, label=label, metadata=metadata, where=where))
    return out


def encode_prompt(tokenizer: Any, prompt: str | list[dict[str, str]], apply_chat_template: bool) -> list[int]:
    """Prompt -> token ids, the same way everywhere (no special tokens added to raw text)."""
    if apply_chat_template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict):  # newer transformers return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    if not isinstance(prompt, str):
        raise DataError("chat-message prompts need --apply-chat-template")
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


class PromptCursor:
    """Walks the records epoch after epoch (reshuffled per epoch when asked), resumable by position."""

    def __init__(self, records: list[PromptRecord], shuffle: bool, seed: int, position: int = 0):
        self.records = records
        self.shuffle = shuffle
        self.seed = seed
        self.position = position  # records handed out so far, across epochs
        self._epoch, self._epoch_order = -1, []  # the last epoch's order, shuffled once

    def _order(self, epoch: int) -> list[int]:
        # Once per epoch: shuffling every record for each prompt handed out cost the coordinator
        # ~2 ms a prompt at 4,096 records (a quarter of its CPU in the CPU mesh, issue 14) and
        # grows with the data set.
        if epoch != self._epoch:
            order = list(range(len(self.records)))
            if self.shuffle:
                random.Random(self.seed + epoch).shuffle(order)
            self._epoch, self._epoch_order = epoch, order
        return self._epoch_order

    def next(self) -> tuple[int, PromptRecord]:
        """(global index, record) of the next prompt."""
        epoch, offset = divmod(self.position, len(self.records))
        index = self.position
        self.position += 1
        return index, self.records[self._order(epoch)[offset]]
