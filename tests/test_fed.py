"""Federated rounds in one process: the real ClientApp round function (PEFT training on a tiny model)
feeding the real strategy, exact aggregation, admission, publishing, and every bad input the issue lists.

The Flower transport is exercised in test_fed_deploy.py; here the node and server halves are called
directly with the same RecordDicts Flower would carry, so each rule is checked quickly and precisely.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import pytest
import torch
from fed_setup import CUBE_ID, Federation, make_federation

from memfed.errors import IncompatibleModelError
from memfed.fed.aggregate import aggregate, aggregation_error, cube_factors, delta
from memfed.fed.authority import LocalAuthority
from memfed.fed.client_app import NodeSetup, hello_content, load_setup, signed_reply, train_round
from memfed.fed.strategy import SharedCubeStrategy, TrainSettings
from memfed.fed.wire import CONFIG_KEY, record_to_factors
from memfed.node.store import CubeStore

TRAIN = TrainSettings(rank=2, steps=3, lr=1e-2, batch_size=8)


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    return make_federation(tmp_path_factory.mktemp("fed"))


def _setup(fed: Federation, name: str) -> NodeSetup:
    identity, data = fed.nodes[name]
    return load_setup(str(identity), str(data), str(fed.model_dir), "")


def _strategy(fed: Federation, **kw: object) -> SharedCubeStrategy:
    authority = LocalAuthority(fed.store, fed.grants)
    return SharedCubeStrategy(authority, authority, CUBE_ID, train=TRAIN, **kw)  # type: ignore[arg-type]


def _admit(strategy: SharedCubeStrategy, fed: Federation, names: list[str]) -> dict[int, str]:
    """Run the admission handshake for each name (node id = position + 1), as configure_train does."""
    from flwr.app import ConfigRecord, RecordDict

    challenge = os.urandom(32)
    query = RecordDict({CONFIG_KEY: ConfigRecord({"challenge": challenge})})
    ids = {}
    for i, name in enumerate(names, start=1):
        strategy.principals[i] = strategy.identify(hello_content(_setup(fed, name), query), challenge)
        ids[i] = name
    return ids


def test_aggregation_exact_vs_fedit_and_svd() -> None:
    from memfed.cube.build import lora_cube
    from memfed.node.tiny_models import tiny_llama

    model = tiny_llama()
    gen = torch.Generator().manual_seed(0)
    modules = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    zero = {m: (torch.zeros(1, 64), torch.zeros(64, 1)) for m in modules}
    current = lora_cube(model, zero, cube_id="shared")
    updates = [
        {m: (torch.randn(4, 64, generator=gen), torch.randn(64, 4, generator=gen) * (i + 1)) for m in modules}
        for i in range(3)
    ]
    counts = [10, 20, 70]
    before = cube_factors(current)
    stack = aggregate(current, updates, counts, method="stack")
    assert stack.weights == pytest.approx([0.1, 0.2, 0.7])
    assert aggregation_error(before, stack.factors, updates, stack.weights) <= 1e-6
    assert stack.factors[modules[0]][0].shape[0] == 1 + 12  # ranks add up
    fedit = aggregate(current, updates, counts, method="fedit")
    assert aggregation_error(before, fedit.factors, updates, fedit.weights) > 0.05
    svd = aggregate(current, updates, counts, method="svd", rank=4)
    err = aggregation_error(before, svd.factors, updates, svd.weights)
    assert svd.truncation_error == pytest.approx(err, rel=1e-3)
    full = aggregate(current, updates, counts, method="svd", rank=13)
    assert aggregation_error(before, full.factors, updates, full.weights) <= 1e-6


def test_three_nodes_two_rounds_publish_exact_average(fed: Federation) -> None:
    strategy = _strategy(fed)
    ids = _admit(strategy, fed, ["alice", "bob", "carol"])
    for server_round in (1, 2):
        before = cube_factors(strategy.current)
        contents = strategy.open_round(server_round, list(ids))
        replies = [(n, train_round(_setup(fed, ids[n]), contents[n])) for n in ids]
        arrays, metrics = strategy.collect(server_round, replies)
        assert arrays is not None and metrics is not None and metrics["accepted"] == 3
        report = strategy.reports[-1]
        assert report.version == f"1.{server_round}.0" and sorted(report.contributors) == [
            "alice",
            "bob",
            "carol",
        ]
        # Independently: new ΔW − old ΔW == Σ n_i/N ΔW_i, from the updates as they arrived.
        counts = {ids[n]: int(c.metric_records["metrics"]["num-examples"]) for n, c in replies}
        total = sum(counts.values())
        after = cube_factors(strategy.current)
        for module in after:
            want = sum(
                counts[ids[n]] / total * delta(record_to_factors(c.array_records["update"]), module)
                for n, c in replies
            )
            got = delta(after, module) - delta(before, module)
            assert torch.linalg.norm(got - want) <= 1e-5 * max(1e-12, float(torch.linalg.norm(want)))
        assert report.aggregation_error is not None and report.aggregation_error <= 1e-6
    with CubeStore(fed.store) as store:
        assert store.versions(CUBE_ID)[-3:] == ["1.0.0", "1.1.0", "1.2.0"]
        m = store.get_manifest(CUBE_ID, "1.2.0")
        first = store.get_manifest(CUBE_ID, "1.1.0")
    assert m.origin.method == "federated" and m.origin.params["round"] == "2"
    assert sorted(m.origin.contributors) == ["alice", "bob", "carol"]
    assert list(m.version_chain)[-1] == first.digest
    assert json.loads(m.origin.params["weights"]).keys() == {"alice", "bob", "carol"}


def test_not_granted_node_is_not_admitted_and_its_update_rejected(fed: Federation) -> None:
    strategy = _strategy(fed)
    ids = _admit(strategy, fed, ["alice", "mallory"])
    from memfed.errors import PermissionDeniedError
    from memfed.fed.validate import check_allowed

    with pytest.raises(PermissionDeniedError):
        check_allowed(strategy.authority, "mallory", CUBE_ID)
    # Even if mallory got a ticket, its update does not count; alice's round goes on.
    contents = strategy.open_round(1, list(ids))
    replies = [(n, train_round(_setup(fed, ids[n]), contents[n])) for n in ids]
    strategy.collect(1, replies)
    report = strategy.reports[-1]
    assert report.contributors == ["alice"]
    assert [(r.principal, r.error) for r in report.rejected] == [("mallory", "PermissionDeniedError")]


def _tampered(
    fed: Federation, strategy: SharedCubeStrategy, ids: dict[int, str], server_round: int, how: str
):
    """One honest reply per node, except node 2's, which is made bad in the way ``how`` names."""
    contents = strategy.open_round(server_round, list(ids))
    replies = []
    for n in ids:
        setup = _setup(fed, ids[n])
        if n != 2:
            replies.append((n, train_round(setup, contents[n])))
            continue
        cfg = contents[n].config_records[CONFIG_KEY]
        shared = cube_factors(strategy.current)
        rank = 3 if how == "rank" else TRAIN.rank
        factors = {
            m: (torch.randn(rank, a.shape[1]) * 0.01, torch.randn(b.shape[0], rank) * 0.01)
            for m, (a, b) in shared.items()
        }
        module = next(iter(factors))
        if how == "nan":
            factors[module][0][0, 0] = math.nan
        if how == "inf":
            factors[module][1][0, 0] = math.inf
        if how == "huge":
            factors[module] = (factors[module][0] * 1e5, factors[module][1] * 1e5)
        if how == "other-model":
            from memfed.cube.fingerprint import fingerprint_model
            from memfed.node.tiny_models import tiny_llama

            setup = NodeSetup(
                **{**setup.__dict__, "fingerprint": fingerprint_model(tiny_llama(seed=5)).SerializeToString()}
            )
        replies.append((n, signed_reply(setup, cfg, factors, 5, 0.0)))
    return replies


@pytest.mark.parametrize(
    ("how", "error"),
    [
        ("rank", "InvalidArgumentError"),
        ("nan", "InvalidArgumentError"),
        ("inf", "InvalidArgumentError"),
        ("huge", "InvalidArgumentError"),
        ("other-model", "IncompatibleModelError"),
    ],
)
def test_bad_update_is_rejected_and_round_goes_on(fed: Federation, how: str, error: str) -> None:
    strategy = _strategy(fed, max_update_norm=100.0)
    ids = _admit(strategy, fed, ["alice", "bob", "carol"])
    start = strategy.current.manifest.version
    strategy.collect(1, _tampered(fed, strategy, ids, 1, how))
    report = strategy.reports[-1]
    assert sorted(report.contributors) == ["alice", "carol"]
    assert [(r.principal, r.error) for r in report.rejected] == [("bob", error)]
    assert report.version is not None and report.version != start
    assert report.aggregation_error is not None and report.aggregation_error <= 1e-6


def test_replayed_update_from_earlier_round_is_rejected(fed: Federation) -> None:
    strategy = _strategy(fed)
    ids = _admit(strategy, fed, ["alice", "bob"])
    contents = strategy.open_round(1, list(ids))
    round1 = [(n, train_round(_setup(fed, ids[n]), contents[n])) for n in ids]
    strategy.collect(1, round1)
    contents = strategy.open_round(2, list(ids))
    replies = [(1, train_round(_setup(fed, "alice"), contents[1])), (2, round1[1][1])]  # bob replays round 1
    strategy.collect(2, replies)
    report = strategy.reports[-1]
    assert report.contributors == ["alice"]
    assert [(r.principal, r.error) for r in report.rejected] == [("bob", "IntegrityError")]


def test_dropped_node_round_completes_and_too_few_publishes_nothing(fed: Federation) -> None:
    strategy = _strategy(fed, min_contributors=2)
    ids = _admit(strategy, fed, ["alice", "bob", "carol"])
    contents = strategy.open_round(1, list(ids))
    # carol never answers; bob's ClientApp failed (Flower delivers an error reply).
    replies = [(1, train_round(_setup(fed, "alice"), contents[1])), (2, "node crashed")]
    before = strategy.current.ref
    arrays, _ = strategy.collect(1, replies)
    assert arrays is None and strategy.current.ref == before  # 1 < min_contributors: nothing published
    assert strategy.reports[-1].version is None
    assert [(r.principal, r.error) for r in strategy.reports[-1].rejected] == [("bob", "UnavailableError")]
    contents = strategy.open_round(2, list(ids))
    replies = [(n, train_round(_setup(fed, ids[n]), contents[n])) for n in (1, 3)]  # bob dropped
    arrays, _ = strategy.collect(2, replies)
    assert arrays is not None and sorted(strategy.reports[-1].contributors) == ["alice", "carol"]


def test_node_refuses_cube_for_another_base_model(fed: Federation, tmp_path: Path) -> None:
    from memfed.node.tiny_models import save_tiny_model_dir

    other = save_tiny_model_dir("llama", tmp_path / "other", seed=9)
    identity, data = fed.nodes["alice"]
    setup = load_setup(str(identity), str(data), str(other), "")
    strategy = _strategy(fed)
    contents = strategy.open_round(1, [1])
    with pytest.raises(IncompatibleModelError):
        train_round(setup, contents[1])


def test_warm_worker_runs_only_memfeds_client_app(tmp_path: Path) -> None:
    """The warm executor reads which ClientApp a run's FAB names, and runs nothing but memfed's."""
    import zipfile

    import tomli_w

    from memfed.fed import deploy
    from memfed.fed.worker import CLIENT_APP_REF, fab_client_app

    app = deploy.write_app(tmp_path / "app", {"cube-id": CUBE_ID})
    fab = tmp_path / "app.fab"
    with zipfile.ZipFile(fab, "w") as z:
        z.write(app / "pyproject.toml", "pyproject.toml")
    assert fab_client_app(fab.read_bytes()) == CLIENT_APP_REF
    other = {"tool": {"flwr": {"app": {"components": {"clientapp": "evil.app:app"}}}}}
    with zipfile.ZipFile(fab, "w") as z:
        z.writestr("pyproject.toml", tomli_w.dumps(other))
    assert fab_client_app(fab.read_bytes()) == "evil.app:app"
    assert fab_client_app(b"not a zip") == ""


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a ServerApp process has set before it creates messages (run, node and task ids)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


class _InProcessGrid:
    """A Grid answering in this process with the real node functions (what the engine would carry)."""

    def __init__(self, fed: Federation, names: list[str]) -> None:
        self.setups = {i: _setup(fed, n) for i, n in enumerate(names, start=1)}

    def get_node_ids(self) -> list[int]:
        return list(self.setups)

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        from flwr.app import Message, MessageType

        out = []
        for msg in messages:
            setup = self.setups[msg.metadata.dst_node_id]
            if msg.metadata.message_type == MessageType.QUERY:
                content = hello_content(setup, msg.content)
            else:
                content = train_round(setup, msg.content)
            reply = Message(content, reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
            out.append(reply)
        return out


class _SlowPublisher:
    """Publishes through ``inner`` on whatever thread calls it, slowly, failing at ``fail_at`` (1-based)."""

    def __init__(self, inner: LocalAuthority, fail_at: int = 0) -> None:
        self.inner, self.fail_at, self.calls = inner, fail_at, []  # type: ignore[var-annotated]

    def current(self, cube_id: str):  # type: ignore[no-untyped-def]
        return self.inner.current(cube_id)

    def publish(self, cube):  # type: ignore[no-untyped-def]
        import threading
        import time

        from memfed.errors import UnavailableError

        time.sleep(0.2)
        self.calls.append((cube.manifest.version, threading.current_thread().name))
        if len(self.calls) == self.fail_at:
            raise UnavailableError("the store is gone")
        return self.inner.publish(cube)


def _versions_after(version: str, n: int) -> list[str]:
    from memfed.fed.authority import next_version

    out = []
    for _ in range(n):
        version = next_version(version)
        out.append(version)
    return out


@pytest.mark.usefixtures("task_identity")
def test_start_publishes_in_background_in_order_on_the_right_base(fed: Federation, tmp_path: Path) -> None:
    from memfed.fed.wire import factors_to_record

    store = tmp_path / "store"
    authority = LocalAuthority(store, fed.grants)
    authority.publish(LocalAuthority(fed.store, fed.grants).current(CUBE_ID))
    publisher = _SlowPublisher(authority)
    strategy = SharedCubeStrategy(authority, publisher, CUBE_ID, train=TRAIN, min_nodes=2)
    first = strategy.current
    bases = []
    open_round = strategy.open_round

    def spy(server_round, admitted):  # type: ignore[no-untyped-def]
        bases.append(strategy.current.manifest.digest)
        return open_round(server_round, admitted)

    strategy.open_round = spy  # type: ignore[method-assign]
    initial = factors_to_record(cube_factors(first))
    strategy.start(_InProcessGrid(fed, ["alice", "bob"]), initial_arrays=initial, num_rounds=3)  # type: ignore[arg-type]
    versions = _versions_after(first.manifest.version, 3)
    assert [v for v, _ in publisher.calls] == versions
    assert all(t.startswith("memfed-publish") for _, t in publisher.calls)  # off the round's path
    assert [r.version for r in strategy.reports] == versions
    with CubeStore(store) as s:
        cubes = [s.get(CUBE_ID, v) for v in (first.manifest.version, *versions)]
    # every round trained on the previous round's aggregate, and the chain names each parent's digest
    assert bases == [c.manifest.digest for c in cubes[:3]]
    for parent, child in itertools.pairwise(cubes):
        assert list(child.manifest.version_chain)[-1] == parent.manifest.digest
    assert strategy.current.manifest.digest == cubes[-1].manifest.digest


@pytest.mark.usefixtures("task_identity")
def test_failed_background_publish_fails_the_run(fed: Federation, tmp_path: Path) -> None:
    from memfed.errors import UnavailableError
    from memfed.fed.wire import factors_to_record

    authority = LocalAuthority(tmp_path / "store", fed.grants)
    authority.publish(LocalAuthority(fed.store, fed.grants).current(CUBE_ID))
    publisher = _SlowPublisher(authority, fail_at=1)
    strategy = SharedCubeStrategy(authority, publisher, CUBE_ID, train=TRAIN, min_nodes=2)
    initial_version = strategy.current.manifest.version
    initial = factors_to_record(cube_factors(strategy.current))
    grid = _InProcessGrid(fed, ["alice", "bob"])
    with pytest.raises(UnavailableError, match="the store is gone"):
        strategy.start(grid, initial_arrays=initial, num_rounds=3)  # type: ignore[arg-type]
    failed = _versions_after(initial_version, 1)[0]
    assert [v for v, _ in publisher.calls] == [failed]  # nothing published after the failure
    assert strategy.reports[0].version is None
    assert len(strategy.reports) <= 2  # the run stopped at the next round at the latest
    with CubeStore(tmp_path / "store") as s:
        assert not s.has(CUBE_ID, failed)
    # a run whose last publish fails raises too
    authority2 = LocalAuthority(tmp_path / "store2", fed.grants)
    authority2.publish(LocalAuthority(fed.store, fed.grants).current(CUBE_ID))
    strategy = SharedCubeStrategy(authority2, _SlowPublisher(authority2, fail_at=1), CUBE_ID, train=TRAIN)
    with pytest.raises(UnavailableError):
        strategy.start(grid, initial_arrays=initial, num_rounds=1)  # type: ignore[arg-type]
    assert strategy.reports[0].version is None
