"""``--metrics-port`` and ``--log-json``: the observability options every memfed server command takes
(``memfed registry serve``, ``memfed node serve``), defined once so both read the same."""

from __future__ import annotations

import click

metrics_port_option = click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=65535),
    default=None,
    help="Serve Prometheus metrics on http://HOST:PORT/metrics (the --host address; 0: any free port). "
    "Default: off.",
)
log_json_option = click.option(
    "--log-json",
    is_flag=True,
    help="Log on stderr as JSON lines (ts, level, logger, message, fields) instead of text.",
)
