"""`python -m slipstream.services.coordinator --config run.json --port 0 --ready-file f`."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    from slipstream.config import parse_config

    prog = "slipstream coordinator"
    cfg = parse_config(argv, prog=prog, description="The control plane: prompts, leases, groups, weights.")
    from slipstream.required import require

    require(cfg, prog, "--redis-url", "--reward-addr")  # one line, exit 2
    from slipstream.log import error_exit, setup_logging

    setup_logging("coordinator")
    from slipstream.rpc import security

    security.configure_process(cfg, "coordinator", prog)  # secrets from files; one line on error
    # Heavy imports (grpc, transformers, redis) only once the flags are known to be good.
    from slipstream.buffer.coordinator_store import RunFinished
    from slipstream.data import DataError
    from slipstream.rollout_filters import FilterLoadError
    from slipstream.rpc.server import exit_now, run_async
    from slipstream.services.coordinator.server import serve

    try:
        run_async(serve(cfg))
        exit_now()  # stopped cleanly: skip the interpreter's teardown (seconds with torch)
    except (DataError, FilterLoadError, RunFinished, TimeoutError, OSError) as e:
        error_exit(prog, e)  # 2 before it serves (bad input, reward unreachable), 1 after


if __name__ == "__main__":
    main()
