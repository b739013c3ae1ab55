"""`python -m slipstream.services.coordinator --config run.json --port 0 --ready-file f`."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from slipstream.config import parse_config

    prog = "slipstream coordinator"
    cfg = parse_config(argv, prog=prog, description="The control plane: prompts, leases, groups, weights.")
    from slipstream.log import setup_logging

    setup_logging("coordinator")
    from slipstream.rpc import security

    security.configure_process(cfg, "coordinator", prog)  # secrets from files; one line on error
    # Heavy imports (grpc, transformers, redis) only once the flags are known to be good.
    from slipstream.data import DataError
    from slipstream.rollout_filters import FilterLoadError
    from slipstream.rpc.server import run_async
    from slipstream.services.coordinator.server import serve

    try:
        run_async(serve(cfg))
    except (DataError, FilterLoadError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (TimeoutError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
