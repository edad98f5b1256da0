"""Flower's deployment engine on loopback with TLS: a SuperLink, three SuperNodes, three rounds.

Real processes (flower-superlink, flower-supernode with memfed's warm ClientApp executor, flwr run),
real PEFT training on a tiny model, the registry's CA for TLS, and the registry (SQLite) deciding who
takes part and recording each version in its catalog. Checks the published versions, their origins,
the catalog, and that each version's delta is exactly the previous one plus the sample-weighted mean of
the updates (the strategy's own check, recomputed from the stored cubes' factors by the round report).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from fed_setup import AGGREGATOR, CUBE_ID, GRANTED, federation_paths, make_federation, registry_federation

from memfed.fed import deploy
from memfed.fed.registry_authority import open_registry
from memfed.fed.server_app import ServerSettings
from memfed.node.store import CubeStore


def test_superlink_three_supernodes_three_rounds_tls(tmp_path: Path) -> None:
    t0 = time.monotonic()
    phases: dict[str, float] = {}
    tls = deploy.make_tls(tmp_path / "ca")
    procs = []
    try:
        # The SuperLink and the SuperNodes start while the federation is laid out: a node reads its
        # files only when the first task comes.
        link, address = deploy.launch_superlink(tmp_path / "link", tls)
        procs.append(link.proc)
        model_dir, paths = federation_paths(tmp_path / "fed")
        nodes = []
        for name in GRANTED:
            identity, data = paths[name]
            config = {"identity": str(identity), "data": str(data), "model": str(model_dir)}
            nodes.append(deploy.launch_supernode(address, tls.ca, config, tmp_path / name))
            procs += nodes[-1].procs
        fed = make_federation(tmp_path / "fed", granted=GRANTED)
        # Admission and publishing go through the registry (SQLite), as `memfed fed serve
        # --registry-dir` does: the ServerApp process opens it beside the SuperLink.
        registry_federation(fed, tmp_path, granted=GRANTED).close()
        report = tmp_path / "report.json"
        settings = ServerSettings(
            cube_id=CUBE_ID,
            store=str(tmp_path / "aggregator-store"),
            registry_dir=str(tmp_path / "registry"),
            identity=str(tmp_path / AGGREGATOR / "identity"),
            rounds=3,
            rank=2,
            steps=2,
            batch_size=8,
            min_nodes=3,
            min_contributors=3,
            round_timeout=120.0,
            report=str(report),
        )
        link.wait()
        phases["link up"] = time.monotonic() - t0
        # Submitted while the SuperNodes still start: the ServerApp waits for min_nodes anyway.
        app = deploy.write_app(tmp_path / "app", settings.as_run_config())
        deploy.submit_run(app, address, tls.ca, tmp_path / "link")
        phases["submitted"] = time.monotonic() - t0
        for node in nodes:
            node.wait()
        phases["nodes up"] = time.monotonic() - t0
        deadline = time.monotonic() + 180
        while not report.exists() and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), "a Flower process died"
            time.sleep(0.1)
        phases["rounds done"] = time.monotonic() - t0
    finally:
        deploy.stop_all(procs)
        phases["stopped"] = time.monotonic() - t0
        print("phases (s since start):", {k: round(v, 1) for k, v in phases.items()})
    if not report.exists():
        logs = "\n".join(f.read_text()[-2000:] for f in tmp_path.rglob("*.log"))
        pytest.fail(f"the run wrote no report\n{logs}")
    rounds = json.loads(report.read_text())
    assert [r["version"] for r in rounds] == ["1.1.0", "1.2.0", "1.3.0"]
    for r in rounds:
        assert sorted(r["contributors"]) == sorted(GRANTED) and r["rejected"] == []
        assert r["aggregation_error"] <= 1e-6
    with CubeStore(tmp_path / "aggregator-store") as store:
        assert store.versions(CUBE_ID) == ["1.0.0", "1.1.0", "1.2.0", "1.3.0"]
        last = store.get_manifest(CUBE_ID, "1.3.0")
    assert last.origin.params["round"] == "3" and sorted(last.origin.contributors) == sorted(GRANTED)
    assert len(last.version_chain) == 3
    registry = open_registry(tmp_path / "registry")
    try:
        answer = registry.lookup_answer(CUBE_ID)  # the catalog: each round a version held by the aggregator
        assert [v.holders for v in answer.versions] == [[AGGREGATOR]] * 4
        newest, _ = registry.newest(CUBE_ID)
        assert newest.version == "1.3.0" and newest.digest == last.digest
        allowed = {e.principal for e in registry.audit_entries() if e.action == "use" and e.allowed}
        assert allowed == {f"node:{n}" for n in GRANTED}  # the registry decided admission
    finally:
        registry.close()
