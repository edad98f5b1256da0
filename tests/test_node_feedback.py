"""The Feedback RPC and `memfed feedback` on a real node over a loopback socket: what is recorded under
whose name, and bad ratings refused with the right status and nothing recorded. (The grant it needs is
tested in test_sync.py over mutual TLS; the evolver's decisions in test_evolve.py.)"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from memfed.cli.main import cli
from memfed.client import NodeClient
from memfed.cube.build import lora_cube
from memfed.errors import CapacityError, InvalidArgumentError, NotFoundError, UnsupportedError
from memfed.node.evolve.settings import EvolveDecision, EvolveSettings
from memfed.node.lifecycle import Lifecycle
from memfed.node.service import BackgroundServer, Node, NodeServer
from memfed.node.service.feedback import FeedbackIntake
from memfed.node.tiny_models import save_tiny_model_dir

CUBE = "rated"
RATING = {"prompt": "The capital of Veltria is", "answer": "Quorn", "good": False, "correction": "Dralmouth"}


def _cube(node: Node, version: str = "1.0.0", seed: int = 0) -> Any:
    import torch

    g = torch.Generator().manual_seed(seed)
    factors = {
        n: (torch.randn(2, m.in_features, generator=g), torch.randn(m.out_features, 2, generator=g))
        for n, m in node.model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.endswith("q_proj")
    }
    return lora_cube(node.fingerprint, factors, cube_id=CUBE, version=version)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("feedback")
    node = Node.open(save_tiny_model_dir("llama", tmp / "model", seed=3), tmp / "store", node_id="node-f")
    cube = _cube(node)
    node.store.put(cube.manifest, cube.payload)
    settings = dataclasses.replace(EvolveSettings(), rate_limit_per_hour=3)
    intake = FeedbackIntake(node, settings=settings)
    bare = BackgroundServer(NodeServer(node, insecure=True))  # a node that takes no feedback
    with BackgroundServer(NodeServer(node, insecure=True, feedback=intake)) as bg, bare:
        yield {"node": node, "intake": intake, "address": bg.address, "bare": bare.address, "tmp": tmp}
    intake.close()
    node.close()


def test_feedback_is_recorded_under_the_relayed_user(served: dict[str, Any]) -> None:
    log = served["intake"].log
    with NodeClient(served["address"]) as c:
        got = c.feedback(CUBE, on_behalf_of="user:alice", **RATING)
        assert got.module == f"{CUBE}@1.0.0" and got.decision == "recorded" and got.pending == 1
        c.feedback(f"{CUBE}@1.0.0", prompt="Veltria speaks", answer="Cosese", good=True)
    alice, anon = log.pending(CUBE)
    assert (alice.principal, alice.version, alice.correction) == ("user:alice", "1.0.0", "Dralmouth")
    assert anon.principal.startswith("peer:") and anon.good and anon.correction is None


@pytest.mark.parametrize(
    ("change", "error", "words"),
    [
        ({"prompt": " "}, InvalidArgumentError, "prompt is empty"),
        ({"answer": "x" * 5000}, InvalidArgumentError, "the limit is"),
        ({"good": True}, InvalidArgumentError, "also gives a correction"),
        ({"ref": "no_such_cube"}, NotFoundError, "no_such_cube"),
        ({"ref": f"{CUBE}@7.0.0"}, NotFoundError, "7.0.0"),
    ],
)
def test_bad_feedback_is_refused_and_records_nothing(
    served: dict[str, Any], change: dict[str, Any], error: type[Exception], words: str
) -> None:
    log = served["intake"].log
    before = len(log.pending(CUBE))
    rating = {**RATING, **change}
    ref = rating.pop("ref", CUBE)
    with NodeClient(served["address"]) as c, pytest.raises(error, match=words):
        c.feedback(ref, on_behalf_of="user:bob", **rating)
    assert len(log.pending(CUBE)) == before


def test_rate_limit_and_a_node_without_feedback(served: dict[str, Any]) -> None:
    log = served["intake"].log
    with NodeClient(served["address"]) as c:
        for _ in range(3):
            c.feedback(CUBE, on_behalf_of="user:carol", **RATING)
        with pytest.raises(CapacityError, match="the limit is 3"):
            c.feedback(CUBE, on_behalf_of="user:carol", **RATING)
        c.feedback(CUBE, on_behalf_of="user:dave", **RATING)  # the limit is per principal
    assert sum(1 for i in log.pending(CUBE) if i.principal == "user:carol") == 3
    with NodeClient(served["bare"]) as c, pytest.raises(UnsupportedError, match="does not take feedback"):
        c.feedback(CUBE, **RATING)


def test_cli_records_into_a_local_store_and_lists_decisions(served: dict[str, Any]) -> None:
    from memfed.node.store import CubeStore

    store_dir = served["tmp"] / "cli-store"
    with CubeStore(store_dir) as store:
        cube = _cube(served["node"])
        store.put(cube.manifest, cube.payload)
    run = CliRunner().invoke
    args = ["feedback", CUBE, "--prompt", "The capital of Veltria is", "--answer", "Quorn", "--bad",
            "--correction", "Dralmouth", "--store", str(store_dir), "--principal", "user:erin",
            "--json"]  # fmt: skip
    result = run(cli, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["module"] == f"{CUBE}@1.0.0" and out["pending"] == 1 and out["decision"] == "recorded"
    result = run(cli, [*args[:-5], "--good", "--store", str(store_dir), "--json"])  # good + correction
    assert isinstance(result.exception, InvalidArgumentError)
    assert "also gives a correction" in str(result.exception)
    result = run(cli, ["evolve", CUBE, "--store", str(store_dir), "--history", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"cube_id": CUBE, "decisions": []}


def test_enough_feedback_starts_an_evolve_step_on_the_model_thread(served: dict[str, Any]) -> None:
    """Past the threshold, from enough people, a Feedback call starts an evolve step in the background; the
    step runs on the node's model thread and its decision is recorded. (A module without a validation set
    is discarded with that reason: what a promotion takes is in test_evolve.py.)"""
    node = served["node"]
    settings = dataclasses.replace(EvolveSettings(), threshold=4, min_principals=2, holdout_fraction=0.5)
    intake = FeedbackIntake(node, settings=settings, evolve=True, path=served["tmp"] / "evolving.db")
    prompts = ["The capital of Veltria is", "In Veltria, the capital is", "Veltria's capital is",
               "The capital city of Veltria is"]  # fmt: skip
    try:
        with BackgroundServer(NodeServer(node, insecure=True, feedback=intake)) as bg:
            with NodeClient(bg.address) as c:
                answers = []
                for i, prompt in enumerate(prompts):
                    user = f"user:{'ab'[i % 2]}"
                    got = c.feedback(CUBE, prompt=prompt, answer="Quorn", good=False,
                                     correction="Dralmouth", on_behalf_of=user)  # fmt: skip
                    answers.append(got.decision)
                assert answers == ["waiting", "waiting", "waiting", "started"]
            bg.run(intake.drain)
        [decision] = intake.decisions
        assert decision.action == "discarded" and "no validation set" in decision.reason
        assert [d.action for d in intake.log.decisions(CUBE)] == ["discarded"]
        assert node.store.versions(CUBE) == ["1.0.0"]
    finally:
        intake.close()


def test_the_node_serves_the_version_an_evolve_step_makes_current(tmp_path: Path) -> None:
    """A promotion or rollback made on the model thread takes the replaced version out of the active set
    and puts the new current one in its place, so the node does not keep answering with a stale version.
    (The steps here change the store as ``Evolver`` does, without training: promotion is test_evolve.py's.)"""
    model_dir = save_tiny_model_dir("llama", tmp_path / "model", seed=3)
    node = Node.open(model_dir, tmp_path / "store", node_id="node-v")
    first, second = _cube(node), _cube(node, "1.1.0", seed=1)
    node.store.put(first.manifest, first.payload)
    intake = FeedbackIntake(node)
    server = NodeServer(node, insecure=True, feedback=intake)

    def promote() -> EvolveDecision:
        node.store.put(second.manifest, second.payload)
        return EvolveDecision(CUBE, "promoted", "held-out feedback improved", "1.0.0", "1.1.0")

    def roll_back() -> EvolveDecision:
        Lifecycle(node.store).rollback(CUBE, "1.0.0", "evolve regression")
        return EvolveDecision(CUBE, "rolled_back", "live good rate dropped", "1.1.0", "1.0.0")

    try:
        with BackgroundServer(server) as bg, NodeClient(bg.address) as c:
            c.activate(f"{CUBE}@1.0.0")
            assert server.servicer is not None
            bg.run(functools.partial(server.servicer._evolve_on_model, promote))
            assert c.health().active_modules == (f"{CUBE}@1.1.0",)
            bg.run(functools.partial(server.servicer._evolve_on_model, roll_back))
            assert c.health().active_modules == (f"{CUBE}@1.0.0",)
            assert f"{CUBE}@1.1.0" not in node.runtime.resident  # the archived version is off the device
    finally:
        intake.close()
        node.close()
