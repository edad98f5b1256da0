"""The registry side's Flower ServerApp: run ``SharedCubeStrategy`` for the configured rounds.

Settings come from the run config (``memfed fed serve`` / ``simulate`` write them into the app's
pyproject and pass them with ``--run-config``): ``cube-id``, ``rounds``, ``aggregation``
(stack|svd|fedit), ``svd-rank``, ``rank``, ``steps``, ``lr``, ``batch-size``, ``min-nodes``,
``min-contributors``, ``max-update-norm``, ``round-timeout``, ``dp-clip``/``dp-noise`` (client-side
clipping and noise, ``memfed.fed.privacy``), and where admission and publishing go:
with ``registry-dir`` (and optionally ``registry-db``, a database URL) the registry decides admission
and records each version (``RegistryAuthority``; the aggregator is the node of ``identity``/``node-id``
and keeps the payloads in ``store``); otherwise ``store`` + ``grants`` (a ``LocalAuthority``: a grants
file, for a federation without a registry). ``report`` names a JSON file the per-round reports are
written to, for the CLI and tests to read after the run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from memfed.errors import InvalidArgumentError
from memfed.fed.authority import Authority, LocalAuthority
from memfed.fed.grid import PollingGrid
from memfed.fed.strategy import SharedCubeStrategy, TrainSettings
from memfed.fed.wire import factors_to_record


@dataclass(frozen=True)
class ServerSettings:
    """The run config, typed. Defaults are what ``memfed fed serve`` uses."""

    cube_id: str
    store: str
    grants: str = ""
    registry_dir: str = ""
    registry_db: str = ""
    identity: str = ""
    node_id: str = ""
    rounds: int = 3
    aggregation: str = "stack"
    svd_rank: int = 0
    rank: int = 4
    steps: int = 20
    lr: float = 5e-3
    batch_size: int = 16
    dp_clip: float = 0.0
    dp_noise: float = 0.0
    min_nodes: int = 1
    min_contributors: int = 1
    max_update_norm: float = 1e3
    round_timeout: float = 600.0
    report: str = ""

    @classmethod
    def from_run_config(cls, rc: dict[str, Any]) -> ServerSettings:
        fields = cls.__dataclass_fields__
        values = {}
        for name in fields:
            key = name.replace("_", "-")
            if key in rc:
                values[name] = rc[key]
        return cls(**values)

    def as_run_config(self) -> dict[str, Any]:
        return {name.replace("_", "-"): getattr(self, name) for name in self.__dataclass_fields__}


def build_authority(s: ServerSettings) -> Authority:
    """The registry when one is configured, else the grants file; InvalidArgumentError for neither."""
    if s.registry_dir:
        from memfed.fed.registry_authority import RegistryAuthority

        if not s.identity:
            raise InvalidArgumentError(
                "serving with a registry needs the aggregator's node identity", hint="pass --identity DIR"
            )
        return RegistryAuthority.open(
            s.registry_dir, s.store, s.identity, node_id=s.node_id, db_url=s.registry_db or None
        )
    if not s.grants:
        raise InvalidArgumentError(
            "no admission source: give a registry or a grants file", hint="pass --registry-dir or --grants"
        )
    return LocalAuthority(s.store, s.grants)


def build_strategy(s: ServerSettings) -> SharedCubeStrategy:
    authority = build_authority(s)
    return SharedCubeStrategy(
        authority,
        authority,
        s.cube_id,
        method=s.aggregation,
        svd_rank=s.svd_rank or None,
        train=TrainSettings(
            rank=s.rank,
            steps=s.steps,
            lr=s.lr,
            batch_size=s.batch_size,
            dp_clip=s.dp_clip,
            dp_noise=s.dp_noise,
        ),
        min_nodes=s.min_nodes,
        min_contributors=s.min_contributors,
        max_update_norm=s.max_update_norm,
    )


def make_server_app(fixed: ServerSettings | None = None) -> ServerApp:
    """The ServerApp: settings from the run config, or ``fixed`` (the simulation engine has no run config)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run(grid, fixed or ServerSettings.from_run_config(dict(context.run_config)))

    return server


def run(grid: Grid, settings: ServerSettings) -> SharedCubeStrategy:
    """Run all rounds on ``grid``; the per-round reports go to ``settings.report`` even on failure."""
    from memfed.fed.aggregate import cube_factors

    strategy = build_strategy(settings)
    try:
        strategy.start(
            PollingGrid(grid),
            initial_arrays=factors_to_record(cube_factors(strategy.current)),
            num_rounds=settings.rounds,
            timeout=settings.round_timeout,
        )
    finally:
        if settings.report:
            write_report(Path(settings.report), strategy)
        close = getattr(strategy.authority, "close", None)
        if close is not None:
            close()
    return strategy


app = make_server_app()


def write_report(path: Path, strategy: SharedCubeStrategy) -> None:
    """The per-round reports as JSON (temp file + rename, so a reader never sees half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([r.to_dict() for r in strategy.reports], indent=2), encoding="utf-8")
    tmp.replace(path)
