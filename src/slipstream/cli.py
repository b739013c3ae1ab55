"""The `slipstream` command.

    slipstream train <flags>        the whole mesh on this machine (same as `python train.py <flags>`)
    slipstream demo [<flags>]       build the tiny demo model and task, then train it through the mesh
                                    (--task tool: a calculator used over multi-turn /generate)
    slipstream coordinator|rollout|reward|trainer <flags>
                                    one service, as containers and Kubernetes run it
    slipstream report RUN_DIR       the run's report: RUN_DIR/report/index.html and a PNG per plot
    slipstream status --coordinator HOST:PORT [--once]
                                    a live view of a running mesh (servers, buffer, trainer, reward)

Flags are slime/miles' names (`slipstream train --help` lists them all). Imports stay inside
the commands so `--help` answers at once.
"""

from __future__ import annotations

import importlib
import sys

SERVICES = ("coordinator", "rollout", "reward", "trainer")
USAGE = __doc__.split("\n\n", 1)[1].split("\n\nFlags")[0]


def _train(argv: list[str]) -> int:
    from slipstream.config import parse_config

    cfg = parse_config(argv, prog="slipstream train", description="Run the whole mesh on this machine.")
    if cfg.algo.loss_type == "sft_loss":  # the trainer alone, no mesh (services/trainer/sft.py)
        return importlib.import_module("slipstream.services.trainer.sft").main(cfg)
    try:
        cfg.logging.check_installed()
    except ValueError as e:
        print(f"slipstream train: error: {e}", file=sys.stderr)
        return 2
    import os

    from slipstream.launcher import run
    from slipstream.placement import given_fields

    return run(cfg, given=given_fields(argv, os.environ))


def _demo(argv: list[str]) -> int:
    """`--task sum` (the default: two-number sums) or `--task tool` (a calculator over multi-turn
    /generate, `demo/tool_run.py`); every other flag goes to that demo."""
    import argparse

    parser = argparse.ArgumentParser(prog="slipstream demo", add_help=False, allow_abbrev=False)
    parser.add_argument("--task", choices=["sum", "tool"], default="sum")
    known, rest = parser.parse_known_args(argv)
    if known.task == "tool":
        from slipstream.demo.tool_run import main as tool_main

        return tool_main(rest)
    from slipstream.demo.run import main as demo_main

    return demo_main(rest)


def _report(argv: list[str]) -> int:
    from slipstream.report import main as report_main

    return report_main(argv)


def _status(argv: list[str]) -> int:
    from slipstream.status import main as status_main

    return status_main(argv)


TOOLS = {"report": _report, "status": _status}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: slipstream <command> [flags]\n\n" + USAGE)
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command == "train":
        sys.exit(_train(rest))
    if command == "demo":
        sys.exit(_demo(rest))
    if command in TOOLS:
        sys.exit(TOOLS[command](rest))
    if command in SERVICES:
        importlib.import_module(f"slipstream.services.{command}.__main__").main(rest)
        return
    if command.startswith("--"):  # `slipstream --rollout-batch-size ...` is `train`
        sys.exit(_train(argv))
    import difflib

    close = difflib.get_close_matches(command, ["train", "demo", *SERVICES, *TOOLS], n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    print(f"slipstream: error: unknown command {command}{hint}", file=sys.stderr)
    sys.exit(2)
