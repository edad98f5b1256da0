"""Flower's simulation engine (Ray): the same ServerApp and ClientApp, N virtual nodes in one machine.

``prepare`` lays out a synthetic federation (per node: an identity, a slice of the shipped documents as
local data; one grants file granting all of them; the zero shared cube in a store), and ``simulate`` runs
it with ``flwr.simulation.run_simulation``. Virtual node i finds its identity and data under
``<root>/nodes/<i>/``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from memfed.fed.server_app import ServerSettings


def prepare(root: Path, nodes: int, *, model: str = "", cube_id: str = "shared_module") -> ServerSettings:
    """A federation of ``nodes`` granted nodes under ``root``; returns the server settings for it."""
    from memfed.crypto.identity import init_identity
    from memfed.fed.authority import LocalAuthority, write_grants
    from memfed.fed.shared import new_shared_cube
    from memfed.node.models import load_host_model

    sentences = _sentences()
    keys = {}
    for i in range(nodes):
        node = root / "nodes" / str(i)
        ident = init_identity(node / "identity", name=f"node-{i}", force=True)
        keys[f"node-{i}"] = ident.signing_key.public_key().public_bytes_raw()
        share = sentences[i::nodes] or sentences[:1]
        (node / "data").mkdir(parents=True, exist_ok=True)
        (node / "data" / "local.txt").write_text(" ".join(share), encoding="utf-8")
    grants = write_grants(root / "grants.json", keys, {cube_id: {"use": sorted(keys)}})
    authority = LocalAuthority(root / "store", grants)
    try:
        authority.current(cube_id)
    except Exception:  # no version yet: create 1.0.0
        lm, _ = load_host_model(model or None, device="cpu")
        authority.publish(new_shared_cube(lm, cube_id))
    return ServerSettings(cube_id=cube_id, store=str(root / "store"), grants=str(grants), min_nodes=nodes)


def _sentences() -> list[str]:
    from memfed.node.conversion.documents import split_sentences

    data = Path(__file__).resolve().parents[2] / "node" / "data" / "documents"
    files = sorted(data.glob("*.md")) if data.is_dir() else []
    text = " ".join(f.read_text(encoding="utf-8") for f in files)
    return split_sentences(text) or ["The shared module learns from every node."]


def simulate(root: Path, settings: ServerSettings, nodes: int, *, model: str = "") -> dict[str, Any]:
    """Run the rounds on Ray with ``nodes`` virtual SuperNodes; return the per-round reports and time."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from flwr.simulation import run_simulation

    from memfed.fed.client_app import make_client_app
    from memfed.fed.server_app import make_server_app

    report = root / "report.json"
    report.unlink(missing_ok=True)
    settings = replace(settings, report=str(report), min_nodes=nodes)
    t0 = time.perf_counter()
    run_simulation(
        server_app=make_server_app(settings),
        client_app=make_client_app(str(root / "nodes"), model),
        num_supernodes=nodes,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    seconds = time.perf_counter() - t0
    rounds = json.loads(report.read_text()) if report.exists() else []
    return {"nodes": nodes, "seconds": seconds, "rounds": rounds}
