"""How ``memfed node serve`` joins the network: token enforcement, sealed serving, registration, sync.

Kept out of node_cmd so the serve command only wires options: everything here is optional and off
unless --registry-key (enforce capability tokens) or --registry with --tls and --identity (register at
start, seal cubes for peers, background sync of --sync cubes) are given.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memfed.errors import InvalidArgumentError, MemfedError, UnavailableError

log = logging.getLogger("memfed.node.network")


def check_options(
    tls_dir: Path | None, registry_addr: str | None, registry_key: Path | None, identity_dir: Path | None,
    sync_cubes: tuple[str, ...],
) -> None:  # fmt: skip
    """Refuse inconsistent network options before the model is loaded (minutes on a cold cache)."""
    if (registry_addr or sync_cubes) and (tls_dir is None or identity_dir is None or registry_key is None):
        raise InvalidArgumentError(
            "--registry and --sync need --tls, --identity and --registry-key",
            hint="the node talks to the registry and its peers over mutual TLS only",
        )
    if sync_cubes and not registry_addr:
        raise InvalidArgumentError("--sync needs --registry", hint="the registry says who holds each cube")


@dataclass
class NodeNetwork:
    node: Any
    store_path: Path
    authorizer: Any = None
    sealer: Any = None
    verifier: Any = None
    registry: Any = None
    identity: Any = None
    tls: Any = None
    sync_cubes: tuple[str, ...] = ()
    sync_interval: float = 5.0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    def configure(
        cls, node: Any, store_path: Path, *, tls_dir: Path | None, registry_addr: str | None,
        registry_key: Path | None, identity_dir: Path | None, sync_cubes: tuple[str, ...],
        sync_interval: float, operators: tuple[str, ...],
    ) -> NodeNetwork:  # fmt: skip
        net = cls(node, store_path, sync_cubes=sync_cubes, sync_interval=sync_interval)
        if (registry_addr or sync_cubes) and (
            tls_dir is None or identity_dir is None or registry_key is None
        ):
            raise InvalidArgumentError(
                "--registry and --sync need --tls, --identity and --registry-key",
                hint="the node talks to the registry and its peers over mutual TLS only",
            )
        if registry_key is not None:
            from memfed.crypto.identity import load_public_identity
            from memfed.node.service.capability import CapabilityAuthorizer
            from memfed.registry.tokens import TokenVerifier

            net.verifier = TokenVerifier(load_public_identity(registry_key).signing_key)
            net.authorizer = CapabilityAuthorizer(
                net.verifier, node_id=node.node_id, local_operators=operators
            )
        if registry_addr:
            from memfed.crypto.identity import load_identity
            from memfed.node.service.sealed import SealedSource
            from memfed.registry.tls import TlsFiles
            from memfed.registry_client import RegistryClient

            assert tls_dir is not None and identity_dir is not None and net.verifier is not None
            net.tls = TlsFiles.from_dir(tls_dir)
            net.identity = load_identity(identity_dir)
            net.registry = RegistryClient(registry_addr, tls=net.tls, registry_key=net.verifier.registry_key)
            cache = store_path.parent / f"{store_path.name}-sealed"
            net.sealer = SealedSource(node, net.identity, net.registry.get_node, cache)
            net.authorizer.report = net.reporter()
        return net

    def reporter(self) -> Any:
        """Send the node's refusals to the registry's audit log on a worker thread (never blocking a
        request; a registry that is down loses the report, the node's own log keeps it)."""
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memfed-audit-report")
        registry = self.registry

        def send(principal: str, action: str, cube_id: str, reason: str) -> None:
            try:
                registry.report_decision(principal, action, cube_id, reason)
            except MemfedError as exc:
                log.warning("cannot report a refusal to the registry: %s", exc)

        return lambda *args: pool.submit(send, *args)

    async def start(self, address: str, stop: asyncio.Event) -> None:
        """Register (idempotent) and start the background sync loop."""
        if self.registry is None:
            return
        from memfed.cli.sync_cmd import sync_partial_dir
        from memfed.node.service.sync import Syncer, sync_loop
        from memfed.registry.node_identity import identity_message

        msg = identity_message(self.identity.public, self.tls.cert.read_bytes(), self.node.node_id, address)
        syncer = Syncer(
            store=self.node.store, identity=self.identity, registry=self.registry, tls=self.tls,
            node_id=self.node.node_id, host_fingerprint=lambda: self.node.fingerprint,
            partial_dir=sync_partial_dir(self.store_path),
        )  # fmt: skip

        async def register() -> bool:
            try:
                await asyncio.to_thread(self.registry.register, msg)
                return True
            except MemfedError as exc:
                if not isinstance(exc, UnavailableError):
                    raise  # refused (another identity holds this id, a bad certificate): say so, stop
                log.warning("cannot reach the registry to register (retrying): %s", exc)
                return False

        registered = await register()  # before the node reports ready, when the registry is up

        async def run() -> None:
            # A registry that is down is retried; the node serves meanwhile.
            while not registered and not stop.is_set():
                if await register():
                    break
                await asyncio.sleep(self.sync_interval)
            await sync_loop(syncer, list(self.sync_cubes), self.sync_interval, self.verifier, stop)

        self.tasks.append(asyncio.create_task(run()))
