"""The node a service serves: host model, tokenizer, cube store, module runtime, scheduler, generator."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memfed.cube.fingerprint import DEFAULT_SAMPLE_SEED
from memfed.mip.v1 import cube_pb2
from memfed.node.generation import Generator
from memfed.node.lifecycle import Lifecycle
from memfed.node.runtime import ModuleRuntime
from memfed.node.scheduler import MemScheduler, MiB, RoutingPolicy
from memfed.node.store import CubeStore


@dataclass
class Node:
    """Everything one node holds. Build with ``Node.open`` (from folders) or directly (tests)."""

    model: Any
    tokenizer: Any
    store: CubeStore
    scheduler: MemScheduler
    node_id: str = field(default_factory=lambda: f"node-{uuid.uuid4().hex[:12]}")
    model_name: str = ""
    owns_store: bool = False

    def __post_init__(self) -> None:
        self.runtime: ModuleRuntime = self.scheduler.runtime
        self.generator = Generator(self.scheduler, self.tokenizer)
        self.lifecycle = Lifecycle(self.store)

    @classmethod
    def from_model(
        cls,
        model: Any,
        tokenizer: Any,
        store: CubeStore,
        *,
        node_id: str = "",
        model_name: str = "",
        device_budget_bytes: int = 512 * MiB,
        host_budget_bytes: int = 1024 * MiB,
        kv_cache_bytes: int = 0,
        plaintext: Any | None = None,
        policy: RoutingPolicy | None = None,
        owns_store: bool = False,
    ) -> Node:
        kv_cache = None
        if kv_cache_bytes > 0:
            from memfed.node.activation import KVCacheStore

            kv_cache = KVCacheStore(kv_cache_bytes)
        scheduler = MemScheduler(
            ModuleRuntime(model),
            store,
            device_budget_bytes=device_budget_bytes,
            host_budget_bytes=host_budget_bytes,
            policy=policy,
            plaintext=plaintext,
            kv_cache=kv_cache,
        )
        kw = {"node_id": node_id} if node_id else {}
        return cls(model, tokenizer, store, scheduler, model_name=model_name, owns_store=owns_store, **kw)

    @classmethod
    def open(
        cls,
        model_dir: Path | str | None,
        store_dir: Path | str,
        *,
        plaintext_path: Path | str | None = None,
        **kw: Any,
    ) -> Node:
        """Load the model from ``model_dir`` (None: the embedded default) and open the store."""
        from memfed.node.models import load_host_model, resolve_model_dir

        path = resolve_model_dir(model_dir)
        model, tokenizer = load_host_model(path)
        plaintext = None
        if plaintext_path is not None:
            from memfed.node.plaintext import PlaintextMemory

            plaintext = PlaintextMemory(plaintext_path)
        store = CubeStore(store_dir)
        return cls.from_model(
            model, tokenizer, store, model_name=path.name, plaintext=plaintext, owns_store=True, **kw
        )

    @property
    def fingerprint(self) -> cube_pb2.BaseModelFingerprint:
        return self.runtime.host_fingerprint(DEFAULT_SAMPLE_SEED)

    @property
    def device(self) -> str:
        return str(self.runtime.device)

    def close(self) -> None:
        self.runtime.close()
        if self.owns_store:
            self.store.close()
        plaintext = self.scheduler.plaintext
        if plaintext is not None and hasattr(plaintext, "close"):
            plaintext.close()
