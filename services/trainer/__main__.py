"""`slipstream trainer` / `python -m slipstream.services.trainer`: the trainer process."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from slipstream.config import parse_config

    cfg = parse_config(
        argv, prog="slipstream trainer", description="Train the policy from the replay buffer."
    )
    if cfg.algo.loss_type == "sft_loss":  # the trainer alone: no endpoint, no mesh
        from .sft import main as sft_main

        sys.exit(sft_main(cfg))
    from slipstream.required import require

    require(cfg, "slipstream trainer", "--redis-url", "--coordinator-addr")  # one line, exit 2
    try:
        cfg.logging.check_installed()  # before the model loads: one line naming the package
    except ValueError as e:
        print(f"slipstream trainer: error: {e}", file=sys.stderr)
        sys.exit(2)
    from slipstream.log import error_exit, setup_logging

    setup_logging("trainer")
    from slipstream.rpc import security

    security.configure_process(cfg, "trainer", "slipstream trainer")  # secrets from files; one line on error
    import torch

    if cfg.infra.torch_threads:
        torch.set_num_threads(cfg.infra.torch_threads)
    from slipstream.rpc.server import exit_now, run_async

    from .server import serve

    try:
        run_async(serve(cfg))
        exit_now()  # stopped cleanly: skip the interpreter's teardown (seconds with torch)
    except (FileNotFoundError, ValueError, RuntimeError, TimeoutError) as e:
        error_exit("slipstream trainer", e)  # 2 before it is up (--load, model, coordinator), 1 after


if __name__ == "__main__":
    main()
