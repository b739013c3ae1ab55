"""The dispatch ledger: `<run-dir>/dispatch.jsonl`, one JSON line per thing that happened to work.

Events: `dispatched` (a sample handed to generation for the first time in this incarnation),
`stored` (its group reached the buffer), `filtered` (its group was dropped by the dynamic
filter), `reward_failed` (a scoring attempt failed), `dead_lettered` (it failed its reward
`--reward-max-failures` times: FAILED in its group, copied to the dead-letter stream). Each line
is `{"event", "group_id", "uid", "t"}` and is flushed as written, so a coordinator killed at
any instant leaves whole lines; a restarted one appends. `scripts/check_ledger.py` joins this
with the trainer's `trained.jsonl`: every dispatched sample must end trained or accounted for.
A sample may be `dispatched` more than once (its work regenerated after a crash); it is stored
once per group id. A group's `stored` lines follow its store's commit; a coordinator killed in
between writes them when it resumes (`complete`, from the store's own record of its last groups).
"""

from __future__ import annotations

import json
import time
from json.encoder import encode_basestring_ascii
from pathlib import Path

NAME = "dispatch.jsonl"


class DispatchLog:
    def __init__(self, run_dir: str | Path | None):
        # Only a run directory that exists (the launcher or the test made it) gets a ledger:
        # a coordinator started bare must not litter its working directory.
        self._file = None
        if run_dir and Path(run_dir).is_dir():
            self.path = Path(run_dir) / NAME
            self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - lives with the service

    @property
    def enabled(self) -> bool:
        return self._file is not None

    def event(self, event: str, group_id: str, uids: list[str] | tuple[str, ...] = ()) -> None:
        if self._file is None:
            return
        # json.dumps of each line's dict, written out: a step's 1,024 lines cost a json.dumps
        # call each otherwise (5% of the coordinator's CPU). Same bytes, keys in the same order.
        head = f'{{"event": {encode_basestring_ascii(event)}, "group_id": {encode_basestring_ascii(group_id)}'
        tail = f', "t": {float.__repr__(time.time())}}}\n'
        if uids:
            self._file.write("".join(f'{head}, "uid": {encode_basestring_ascii(u)}{tail}' for u in uids))
        else:
            self._file.write(head + tail)
        self._file.flush()

    def complete(self, event: str, groups: dict[str, list[str]]) -> list[str]:
        """Write `event` for each of `groups` (group id -> uids) that the ledger lacks it for;
        the group ids written."""
        if self._file is None or not groups:
            return []
        have = set()
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a torn line (a kill mid-write)
                continue
            if row.get("event") == event and row.get("group_id") in groups:
                have.add(row["group_id"])
        missing = [g for g in groups if g not in have]
        for group_id in missing:
            self.event(event, group_id, groups[group_id])
        return missing

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
