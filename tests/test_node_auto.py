"""The node setting that internalizes hot plaintext while the node serves (``node serve --auto-internalize``):
the loop ticks on the model thread of a running NodeServer, registers the module, and archives the text."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from memfed.cli.main import main
from memfed.errors import InvalidArgumentError
from memfed.node.conversion.internalize import InternalizeSettings
from memfed.node.conversion.train import LoraTrainConfig
from memfed.node.conversion.triggers import AutoInternalizeSettings
from memfed.node.models import load_host_model, save_tiny_model_dir
from memfed.node.plaintext import PlaintextMemory
from memfed.node.service import Node, NodeServer
from memfed.node.service.auto import AutoInternalizeLoop
from memfed.node.store import CubeStore

QUICK = InternalizeSettings(
    train=LoraTrainConfig(steps=2), min_recall=0.0, replay_prompts=8, control_prompts=8
)


def test_loop_internalizes_hot_text_on_a_serving_node(tmp_path: Path) -> None:
    model, tokenizer = load_host_model(save_tiny_model_dir("llama", tmp_path / "tiny"))
    vault = PlaintextMemory(tmp_path / "plain.db")
    vault.add("guide/fezeira", "The official language of Fezeira is Trovouman.", title="Fezeira")
    for _ in range(12):
        vault.search("Fezeira language")
    with CubeStore(tmp_path / "store") as store:
        node = Node.from_model(model, tokenizer, store, plaintext=vault)
        server = NodeServer(node, port=0, insecure=True)

        async def scenario() -> list:
            await server.start()
            stop = asyncio.Event()
            loop = AutoInternalizeLoop(server, AutoInternalizeSettings(enabled=True, internalize=QUICK), 0.05)
            task = asyncio.create_task(loop.run(stop))
            for _ in range(600):
                if loop.outcomes:
                    break
                await asyncio.sleep(0.1)
            stop.set()
            await task
            await server.stop(grace=0)
            return loop.outcomes

        try:
            outcomes = asyncio.run(scenario())
            assert [o.cube_ref for o in outcomes if o.registered] == ["plain.guide_fezeira@1.0.0"]
            assert store.has("plain.guide_fezeira", "1.0.0")
            assert vault.get("guide/fezeira", count_access=False).status == "archived"
        finally:
            node.close()  # closes the vault too


def test_the_setting_needs_plaintext(tmp_path: Path) -> None:
    model, tokenizer = load_host_model(save_tiny_model_dir("llama", tmp_path / "tiny"))
    with CubeStore(tmp_path / "store") as store:
        node = Node.from_model(model, tokenizer, store)
        with pytest.raises(InvalidArgumentError, match="plaintext memory"):
            AutoInternalizeLoop(NodeServer(node, insecure=True), AutoInternalizeSettings(enabled=True))
        node.close()
    assert main(["node", "serve", "--insecure", "--auto-internalize", "--store", str(tmp_path / "s")]) == 3
