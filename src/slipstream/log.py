"""Logging set-up shared by every process: one line per record, the service name first.

Also the exit codes every slipstream process uses (`error_exit`), the run directory's record of the resolved config (`config.txt`, beside `config.json`) and
the per-run service logs (`rotate_log`: one `logs/<service>.log` per run, earlier runs' kept as
`logs/<service>.<n>.log`).
"""

from __future__ import annotations

import gc
import logging
import os
import re
import sys
from pathlib import Path
from typing import NoReturn

KEEP_LOGS = 10  # earlier runs' logs kept per service

# Exit codes, one convention for every slipstream process (the launcher, each service, the tools):
#   0  done; 2  could not start: a bad flag, config value or input (file, checkpoint, address), or
#   something it needs unreachable at start-up: fix the command, nothing ran; 1  failed after it
#   was up (a dependency lost past its reconnect timeout, a diverged run, a crash). A service is up
#   once it serves (its ready file is written); the trainer once its model is loaded, its
#   checkpoint resumed and the coordinator reached.
EXIT_FAILED = 1
EXIT_CANNOT_START = 2
_up = False


def mark_up() -> None:
    """This process is up: an error from now on is a failure while running (exit 1).

    Its start-up is over too, so what that built and keeps (modules, the model, the tokenizer,
    the prompts: ~300k objects once torch is imported) is frozen out of the cyclic garbage
    collector: each full collection would walk all of it again (0.1-0.16 s on the 2-core box), in
    every process of the mesh (issue 20 item 5). Reference counting still frees them."""
    global _up
    if not _up:
        gc.collect()
        gc.freeze()
    _up = True


def error_exit(prog: str, e: BaseException) -> NoReturn:
    """The one line a service ends with, and the convention's exit code for when it happened."""
    print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
    sys.exit(EXIT_FAILED if _up else EXIT_CANNOT_START)


def setup_logging(service: str) -> None:
    level = os.environ.get("SLIPSTREAM_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _settings(cfg) -> list[tuple[str, str, object]]:
    from slipstream.config import redact

    rows = []
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            if key == "redis_url":  # secrets are read from files; one typed into the URL is hidden
                value = redact(value)
            rows.append((section, key, value))
    return rows


def config_table(cfg) -> str:
    """The resolved config, one setting a line: section, flag, value."""
    rows = [(s, "--" + k.replace("_", "-"), repr(v)) for s, k, v in _settings(cfg)]
    width = max(len(f) for _, f, _ in rows)
    return "".join(f"{s:<8} {f:<{width}} {v}\n" for s, f, v in rows)


def write_config_table(cfg, path: Path) -> str:
    """Write `config_table` to `path`; return the console's one line about it (what differs from
    the defaults, then where the whole table is)."""
    from slipstream.config import Config

    Path(path).write_text("resolved config (also config.json)\n" + config_table(cfg))
    defaults = {(s, k): v for s, k, v in _settings(Config())}
    rows = _settings(cfg)
    changed = [f"--{k.replace('_', '-')} {_short(v)}" for s, k, v in rows if defaults.get((s, k)) != v]
    listed = ", ".join(changed)
    if len(listed) > 200:
        listed = listed[:197].rsplit(", ", 1)[0] + ", ..."
    return f"config: {len(changed)} of {len(rows)} settings not default ({listed or 'none'}); all in {path}"


def _short(value: object, most: int = 32) -> str:
    text = str(value)
    return text if len(text) <= most else "..." + text[-(most - 3) :]  # a path's end says most


def rotate_log(path: Path, keep: int = KEEP_LOGS) -> Path | None:
    """Move an earlier run's `<name>.log` to `<name>.<n>.log` (n one past the highest there), so
    this run's log holds this run only; keep the newest `keep` of those. Returns where it went."""
    path = Path(path)
    if not path.exists():
        return None
    pattern = re.compile(re.escape(path.stem) + r"\.(\d+)" + re.escape(path.suffix) + "$")
    old = sorted((int(m.group(1)), p) for p in path.parent.iterdir() if (m := pattern.match(p.name)))
    target = path.with_name(f"{path.stem}.{(old[-1][0] if old else 0) + 1}{path.suffix}")
    os.replace(path, target)
    for _, p in old[: max(0, len(old) + 1 - keep)]:
        p.unlink(missing_ok=True)
    return target


def rotate_logs(logs: Path, keep: int = KEEP_LOGS) -> list[Path]:
    """`rotate_log` every service log of an earlier run in `logs` (at a launch, before any starts)."""
    if not Path(logs).is_dir():
        return []
    current = [p for p in sorted(Path(logs).glob("*.log")) if not re.search(r"\.\d+$", p.stem)]
    return [t for p in current if (t := rotate_log(p, keep)) is not None]
