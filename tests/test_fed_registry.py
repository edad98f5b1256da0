"""The strategy against the real registry (``memfed.registry.Registry``, SQLite): admission is the
registry's access control (a ``use`` grant on the shared cube, checked every round and audited), the
node's key is the one it registered, and each round is recorded in the catalog as the next version."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fed_setup import AGGREGATOR, CUBE_ID, Federation, make_federation, registry_federation

from memfed.errors import PermissionDeniedError
from memfed.fed.aggregate import cube_factors
from memfed.fed.client_app import hello_content, load_setup, train_round
from memfed.fed.registry_authority import RegistryAuthority
from memfed.fed.strategy import SharedCubeStrategy, TrainSettings
from memfed.fed.wire import CONFIG_KEY

TRAIN = TrainSettings(rank=2, steps=2, lr=1e-2, batch_size=8)


@pytest.fixture(scope="module")
def fed_reg(tmp_path_factory: pytest.TempPathFactory) -> tuple[Federation, RegistryAuthority]:
    root = tmp_path_factory.mktemp("fedreg")
    fed = make_federation(root / "fed")
    return fed, registry_federation(fed, root, granted=("alice", "bob"))


def _round(strategy: SharedCubeStrategy, fed: Federation, names: list[str], server_round: int) -> None:
    """Admission handshake for nodes not yet known, then one round with every admitted node."""
    from flwr.app import ConfigRecord, RecordDict

    challenge = os.urandom(32)
    query = RecordDict({CONFIG_KEY: ConfigRecord({"challenge": challenge})})
    setups = {}
    for i, name in enumerate(names, start=1):
        identity, data = fed.nodes[name]
        setups[i] = load_setup(str(identity), str(data), str(fed.model_dir), "")
        if i not in strategy.principals:
            strategy.principals[i] = strategy.identify(hello_content(setups[i], query), challenge)
    strategy._pending = []  # what configure_train does: a round's rejections start empty
    contents = strategy.open_round(server_round, strategy.granted(list(setups)))
    strategy.collect(server_round, [(n, train_round(setups[n], contents[n])) for n in contents])


def test_registry_decides_admission_and_records_each_version(
    fed_reg: tuple[Federation, RegistryAuthority],
) -> None:
    fed, authority = fed_reg
    registry = authority.registry
    strategy = SharedCubeStrategy(authority, authority, CUBE_ID, train=TRAIN)
    assert strategy.current.manifest.version == "1.0.0"

    _round(strategy, fed, ["alice", "bob", "mallory"], 1)
    report = strategy.reports[-1]
    assert report.version == "1.1.0" and sorted(report.contributors) == ["alice", "bob"]
    assert [(r.principal, r.error) for r in report.rejected] == [("mallory", "PermissionDeniedError")]
    assert report.aggregation_error is not None and report.aggregation_error <= 1e-6
    manifest, holders = registry.newest(CUBE_ID)
    assert manifest.version == "1.1.0" and holders == [AGGREGATOR]
    assert manifest.digest == strategy.current.manifest.digest
    assert sorted(manifest.origin.contributors) == ["alice", "bob"] and manifest.origin.params["round"] == "1"

    # A revoke in the registry takes effect at the next round; the deny is in the audit log.
    registry.revoke(CUBE_ID, "node:bob", ["use"], by=f"node:{AGGREGATOR}")
    _round(strategy, fed, ["alice", "bob", "mallory"], 2)
    report = strategy.reports[-1]
    assert report.version == "1.2.0" and report.contributors == ["alice"]
    assert sorted(r.principal for r in report.rejected) == ["bob", "mallory"]
    assert [e.allowed for e in registry.audit_entries() if e.principal == "node:bob"][-1] is False
    assert len(registry.lookup_answer(CUBE_ID).versions) == 3
    assert registry.verify_audit().ok

    # The next strategy (a restarted server) resumes from the catalog's newest version.
    assert SharedCubeStrategy(authority, authority, CUBE_ID).current.manifest.version == "1.2.0"


def test_unregistered_or_other_key_is_not_a_principal(fed_reg: tuple[Federation, RegistryAuthority]) -> None:
    _fed, authority = fed_reg
    assert authority.signing_key("nobody") is None
    assert authority.signing_key("group:staff") is None
    assert authority.signing_key("alice") == authority.registry.node("alice").signing_public_key  # type: ignore[union-attr]
    assert not authority.is_allowed("mallory", CUBE_ID, "use")
    from memfed.fed.validate import check_allowed

    with pytest.raises(PermissionDeniedError):
        check_allowed(authority, "mallory", CUBE_ID)


def test_aggregator_without_admin_cannot_publish(
    fed_reg: tuple[Federation, RegistryAuthority], tmp_path: Path
) -> None:
    """Another registered node posing as aggregator: the registry refuses its version (and audits it)."""
    fed, authority = fed_reg
    from memfed.crypto.identity import load_identity

    alice = load_identity(fed.nodes["alice"][0])
    rogue = RegistryAuthority(authority.registry, tmp_path / "store", alice, "alice")
    strategy = SharedCubeStrategy(authority, authority, CUBE_ID, train=TRAIN)
    changed = {m: (a + 0.01, b + 0.01) for m, (a, b) in cube_factors(strategy.current).items()}
    cube = strategy._next_cube(99, changed, [], [], 0.0)
    with pytest.raises(PermissionDeniedError):
        rogue.publish(cube)
