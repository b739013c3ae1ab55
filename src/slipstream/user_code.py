"""Importing a user's Python file by path: `--custom-rm-path`, `--custom-reward-post-process-path`
and `--custom-generate-function-path` all accept `path/to/file.py:function`.

The module gets a stable name unique to the file's resolved path (two files both called reward.py
do not collide) and is registered in `sys.modules`, so the file's dataclasses and pickling find it.
What goes wrong is `error(f"{flag} {path}: ...")`, one line, for the caller's flag and error type.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def import_file(path: Path, flag: str, error: type[Exception]) -> ModuleType:
    if not path.is_file():
        raise error(f"{flag} {path}: no such file")
    resolved = path.resolve()
    name = f"_slipstream_user_{resolved.stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise error(f"{flag} {path}: not a loadable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
