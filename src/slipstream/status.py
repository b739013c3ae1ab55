"""`slipstream status --coordinator HOST:PORT`: a live view of a running mesh.

Everything shown comes from one call, the coordinator's `GetStatus`, asked once a second: the
rollout servers attached (the policy version each serves, how far behind the trained policy
that is against `--max-staleness`, samples leased against capacity, engine idle share, when it
was last heard from), the replay buffer (groups in the stream, delivered but not acknowledged;
"?" when the coordinator could not read Redis),
the trainer's last reported step, and reward health (failures, dead letters). Scalar fields the
coordinator adds later show up under "other" without touching this file.

`--once` prints one snapshot and exits (0, or 1 with one line when the coordinator cannot be
reached): for scripts, CI and tests. The live view keeps going through a coordinator restart
and says when it last got an answer. Credentials are the services' own flags
(`--auth-token-file`, `--tls-cert/--tls-key/--tls-ca`), applied by `slipstream.rpc`'s channel.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

SHOWN = {  # CoordinatorStatus fields with a place of their own in the view
    "policy_version",
    "num_groups_dispatched",
    "num_groups_completed",
    "num_samples_in_flight",
    "num_rollout_servers",
    "server_versions",
    "servers",
    "finished",
    "num_reward_failures",
    "num_dead_lettered",
    "num_partials_recycled",
    "num_groups_filtered",
    "num_stale_samples",
    "rollout_idle_fraction",
    "weights_held",
    "trainer_step",
    "max_staleness",
    "buffer",
}


def _behind(status: Any, version: int) -> str:
    behind = status.policy_version - version
    if behind > status.max_staleness:
        return f"[red]{behind}[/]"
    return f"[yellow]{behind}[/]" if behind > 0 else "0"


def servers_table(status: Any):
    from rich.table import Table

    table = Table(title="rollout servers", title_justify="left", expand=False)
    for name, justify in (
        ("server", "left"),
        ("version", "right"),
        ("behind", "right"),
        ("in flight / capacity", "right"),
        ("idle", "right"),
        ("last heard", "right"),
    ):
        table.add_column(name, justify=justify)
    seen = set()
    for s in sorted(status.servers, key=lambda s: s.server_id):
        seen.add(s.server_id)
        load = f"{s.num_in_flight} / {s.max_concurrent}"
        if s.max_concurrent and s.num_in_flight >= s.max_concurrent:
            load = f"[bold]{load}[/]"
        table.add_row(
            s.server_id,
            f"v{s.policy_version}",
            _behind(status, s.policy_version),
            load,
            f"{s.idle_fraction:.0%}",
            f"{s.seconds_since_heard:.1f} s ago",
        )
    for server_id, version in sorted(status.server_versions.items()):  # a coordinator without `servers`
        if server_id not in seen:
            table.add_row(server_id, f"v{version}", _behind(status, version), "-", "-", "-")
    if not table.row_count:
        table.add_row("[red]none attached[/]", "", "", "", "", "")
    return table


def _grid(title: str, rows: list[tuple[str, str]]):
    from rich.table import Table

    grid = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 2, 0, 0))
    grid.add_column(style="dim")
    grid.add_column(justify="right")
    for k, v in rows:
        grid.add_row(k, v)
    return grid


def _reward_health(status: Any) -> str:
    if status.num_reward_failures == 0 and status.num_dead_lettered == 0:
        return "[green]ok[/]"
    return "[yellow]failures[/]"


def _others(status: Any) -> list[tuple[str, str]]:
    rows = []
    for f in status.DESCRIPTOR.fields:
        if f.name in SHOWN or f.is_repeated or f.cpp_type == f.CPPTYPE_MESSAGE:
            continue
        value = getattr(status, f.name)
        rows.append((f.name, f"{value:.3g}" if isinstance(value, float) else str(value)))
    return rows


def render(status: Any, addr: str, asked_at: float | None = None, error: str = ""):
    """The view of one `CoordinatorStatus` (`error`: why the latest ask failed, shown on top)."""
    from rich.columns import Columns
    from rich.console import Group
    from rich.text import Text

    state = "[green]finished[/]" if status.finished else "running"
    held = "" if status.weights_held or status.policy_version == 0 else "  [red]weights not held[/]"
    head = Text.from_markup(
        f"[bold]slipstream[/] coordinator {addr}  policy [bold]v{status.policy_version}[/]  "
        f"trainer step [bold]{status.trainer_step}[/]  {state}{held}"
    )
    parts: list[Any] = [head]
    if error:
        when = time.strftime("%H:%M:%S", time.localtime(asked_at)) if asked_at else "never"
        parts.insert(0, Text.from_markup(f"[red]unreachable: {error}[/] (last answer {when})"))
    parts.append(servers_table(status))
    pipeline = _grid(
        "groups",
        [
            ("dispatched", str(status.num_groups_dispatched)),
            ("stored", str(status.num_groups_completed)),
            ("samples in flight", str(status.num_samples_in_flight)),
            ("partials recycled", str(status.num_partials_recycled)),
            ("filtered", str(status.num_groups_filtered)),
            ("rollout idle", f"{status.rollout_idle_fraction:.0%}"),
        ],
    )
    known = status.HasField("buffer")
    buffer = _grid(
        "buffer",
        [
            ("groups in stream", str(status.buffer.num_groups) if known else "[red]?[/]"),
            ("pending (unacked)", str(status.buffer.num_pending) if known else "[red]?[/]"),
        ],
    )
    staleness = _grid(
        "staleness",
        [
            ("bound (--max-staleness)", str(status.max_staleness)),
            ("samples beyond it", str(status.num_stale_samples)),
        ],
    )
    reward = _grid(
        "reward",
        [
            ("health", _reward_health(status)),
            ("failures", str(status.num_reward_failures)),
            ("dead-lettered", str(status.num_dead_lettered)),
        ],
    )
    parts.append(Columns([pipeline, buffer, staleness, reward], padding=(0, 4)))
    others = _others(status)
    if others:
        parts.append(_grid("other", others))
    return Group(*parts)


def _settings(args: argparse.Namespace):
    """The services' own security settings, read from the same flags (as a client)."""
    from slipstream.config import config_from_values
    from slipstream.rpc import security

    flags = ("auth_token_file", "tls_cert", "tls_key", "tls_ca")
    cfg = config_from_values({"rpc_timeout": args.timeout, **{f: getattr(args, f) for f in flags}})
    return security.settings_from_config(cfg, "client")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="slipstream status",
        description="A live view of a running mesh from the coordinator's GetStatus: rollout servers "
        "(versions, load), buffer depth and pending, trainer step, staleness, reward health.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--coordinator", required=True, metavar="HOST:PORT", help="the coordinator's address")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit (scripts, tests)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each answer")
    p.add_argument("--auth-token-file", default="", help="file holding the mesh's token (as the services)")
    p.add_argument("--tls-cert", default="", help="dial TLS; with --tls-ca, the client certificate (mTLS)")
    p.add_argument("--tls-key", default="", help="key of --tls-cert (mTLS)")
    p.add_argument("--tls-ca", default="", help="CA to verify the coordinator against")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import grpc
    from rich.console import Console
    from rich.live import Live

    from slipstream.proto import coordinator_pb2, coordinator_pb2_grpc
    from slipstream.rpc import security
    from slipstream.rpc.channel import sync_channel

    try:
        security.use(_settings(args))
    except ValueError as e:  # SecurityError, ConfigError: an unusable secret or flag
        print(f"slipstream status: error: {e}", file=sys.stderr)
        return 2
    console = Console(width=None if sys.stdout.isatty() else 120)
    channel = sync_channel(args.coordinator)
    stub = coordinator_pb2_grpc.CoordinatorStub(channel)

    def ask() -> Any:
        return stub.GetStatus(coordinator_pb2.GetStatusRequest(), timeout=args.timeout)

    def why(e: grpc.RpcError) -> str:
        return f"{e.code().name}: {e.details()}"  # type: ignore[attr-defined]

    try:
        if args.once:
            try:
                console.print(render(ask(), args.coordinator))
            except grpc.RpcError as e:
                print(f"slipstream status: {args.coordinator}: {why(e)}", file=sys.stderr)
                return 1
            return 0
        last, asked_at, error = coordinator_pb2.CoordinatorStatus(), None, "no answer yet"
        with Live(
            render(last, args.coordinator, asked_at, error), console=console, auto_refresh=False
        ) as live:
            while True:
                try:
                    last, asked_at, error = ask(), time.time(), ""
                except grpc.RpcError as e:
                    error = why(e)
                live.update(render(last, args.coordinator, asked_at, error), refresh=True)
                time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
    finally:
        channel.close()
