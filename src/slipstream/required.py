"""What a service cannot start without, checked right after the flags, before anything heavy.

The launcher fills every address in; a service started by hand, by docker compose or Kubernetes
gets them from flags, the config file or `SLIPSTREAM_*` variables. One missing is one line and
exit code 2, the parser's convention (`parse_config`), instead of a gRPC C-core trace or minutes
of retrying an empty address.
"""

from __future__ import annotations

import sys

from slipstream.config import Config

WHAT = {
    "--redis-url": "the Redis holding the run's buffer, e.g. redis://host:6379/0",
    "--reward-addr": "host:port of the reward service",
    "--coordinator-addr": "host:port of the coordinator",
}


def _value(cfg: Config, flag: str) -> str:
    return getattr(cfg.infra, flag.removeprefix("--").replace("-", "_"))


def missing(cfg: Config, *flags: str) -> list[str]:
    return [flag for flag in flags if not _value(cfg, flag)]


def require(cfg: Config, prog: str, *flags: str) -> None:
    """Exit 2 with one line naming every flag of `flags` that has no value."""
    gone = missing(cfg, *flags)
    if not gone:
        return
    named = "; ".join(
        f"{flag} ({WHAT[flag]}; or SLIPSTREAM_{flag[2:].upper().replace('-', '_')})" for flag in gone
    )
    print(f"{prog}: error: missing {named}", file=sys.stderr)
    sys.exit(2)
