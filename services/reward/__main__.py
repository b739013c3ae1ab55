"""`python -m slipstream.services.reward <flags>` (or `slipstream reward <flags>`): the reward service.

Flags are the shared config's (`--config run.json --port 0 --ready-file f --rm-type math ...`);
gRPC and the reward code are imported only after parsing, so `--help` answers at once. A reward
setting that cannot work (a custom function that does not load, an unreachable `--rm-url`)
exits 2 with one line before serving.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    from slipstream.config import parse_config

    cfg = parse_config(argv, prog="slipstream reward", description="Score samples over gRPC (Reward.Score).")
    from slipstream.log import error_exit, setup_logging

    setup_logging("reward")
    from slipstream.rpc import security

    security.configure_process(cfg, "reward", "slipstream reward")  # secrets from files; one line on error
    from slipstream.rpc.server import exit_now, run_async
    from slipstream.services.reward import RewardConfigError
    from slipstream.services.reward.server import serve

    try:
        run_async(serve(cfg))
        exit_now()  # stopped cleanly: skip the interpreter's teardown (seconds with torch)
    except RewardConfigError as e:
        error_exit("slipstream reward", e)  # raised before it serves: 2


if __name__ == "__main__":
    main()
