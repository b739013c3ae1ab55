"""`python -m slipstream.services.rollout --config run.json --coordinator-addr H:P --port 0 --ready-file f`."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    from slipstream.config import parse_config

    prog = "slipstream rollout"
    cfg = parse_config(
        argv, prog=prog, description="A rollout server: one inference engine attached to the coordinator."
    )
    from slipstream.log import error_exit, setup_logging

    setup_logging("rollout")
    from slipstream.rpc import security

    security.configure_process(cfg, "rollout", prog)  # secrets from files; one line on error
    # Heavy imports (torch, transformers, grpc) only once the flags are known to be good.
    from slipstream.rpc.server import exit_now, run_async
    from slipstream.services.rollout.attach import CoordinatorLost
    from slipstream.services.rollout.server import serve

    try:
        run_async(serve(cfg))
        exit_now()  # stopped cleanly: skip the interpreter's teardown (seconds with torch)
    except (CoordinatorLost, FileNotFoundError, ValueError, OSError, RuntimeError) as e:
        error_exit(prog, e)  # 2 before it serves (model, device, flags), 1 after


if __name__ == "__main__":
    main()
