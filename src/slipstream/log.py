"""Logging set-up shared by every process: one line per record, the service name first."""

from __future__ import annotations

import logging
import os


def setup_logging(service: str) -> None:
    level = os.environ.get("SLIPSTREAM_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def print_config(cfg) -> None:
    """The resolved config, section by section, at start (it is also saved as config.json)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="resolved config", show_header=False, box=None, pad_edge=False)
    from slipstream.config import redact

    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            if key == "redis_url":  # secrets are read from files; one typed into the URL is hidden
                value = redact(value)
            table.add_row(f"[dim]{section}[/]", "--" + key.replace("_", "-"), repr(value))
    Console(stderr=True).print(table)
