"""The server's strategy: admit granted nodes, collect signed updates, aggregate exactly, publish.

A Flower (Message API) ``Strategy``, so Flower's ``Strategy.start`` runs the rounds on either engine.
Per round:

1. admission (in ``configure_train``): every connected node not yet identified gets a QUERY with a fresh
   challenge and answers with its principal, public key and signature; the key must be the one the
   registry holds and the principal must be granted ``use`` on the shared cube (checked every round, so
   a revocation takes effect at the next one). Nodes not admitted are sent nothing, not even the cube.
2. the admitted nodes get the current shared cube (ArrayRecord) and a round ticket (round, nonce, the
   version's digest, training settings) and return a signed residual update (``memfed.fed.client_app``).
3. ``aggregate_train`` validates each reply (``memfed.fed.validate``); a bad one is rejected with its
   typed error and the round goes on with the rest. With at least ``min_contributors`` accepted updates
   the exact aggregate (``memfed.fed.aggregate``) is published as the next version, its origin naming the
   round, the method, the weights and the contributing nodes; otherwise nothing is published.

Under ``start`` (Flower's round loop) publishing (the store's fsync'd put, the registry's record) runs
on one background thread while the next round trains: the next round's base is the aggregate itself
(``current``, its digest in every ticket), so nodes never wait for the disk. Publishes stay in round
order (one thread, and each waits for the one before), the next round does not open while an earlier
publish failed, and ``start`` returns only after the last one finished: a failed publish raises out of
the run, its round's report set to no version.

Client-side clipping and noise (``TrainSettings.dp_clip``/``dp_noise``) are applied by each node to
what it releases, before it signs it: ``memfed.fed.privacy`` says what that guarantees and what not.

Secure aggregation (Flower's SecAgg+) is not used, deliberately. In flwr 1.42 it is the
``SecAggPlusWorkflow`` of the legacy ServerApp style (``DefaultWorkflow`` + ``LegacyContext``) with the
``secaggplus_mod`` on the client, which masks the ClientApp's reply after the app returns; the server
learns only Σ_i (quantized) x_i. That conflicts with what this strategy must do:

- stacking is exact because the server *concatenates* each node's factors; a masked sum of factors is
  FedIT's Σ A_i, Σ B_i (the inexact baseline), and there is no masked concatenation;
- every update is checked on its own (a signature bound to the round, the node's grant, shapes, rank,
  NaN/Inf, absurd size) and a bad one is dropped while the round goes on; under SecAgg+ the server never
  sees an individual update, so one NaN or huge update poisons the sum unseen (SecAgg+ only clips to
  its quantization range), and the signature could not cover the masked vector the mod sends;
- where a sum *would* be exact (nodes sending dense ΔW_i for the ``svd`` mode), SecAgg+ quantizes each
  entry to an integer grid (``clipping_range``/``quantization_range``), so the aggregate is no longer
  exact to 1e-6, and a dense ΔW is out×in per module instead of (out+in)·r: for a 4096-wide layer at
  rank 8 that is 256× the bytes, against the requirement that only the adapter travels; and its extra
  key-sharing stages cost about 2.3× per round (measured here on a trivial app).

Local clipping + noise (above) is what this design offers instead for hiding one node's contribution.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from memfed.cube.build import lora_cube
from memfed.cube.core import MemCube
from memfed.errors import MemfedError, UnavailableError
from memfed.fed.aggregate import METHODS, Factors, aggregate, aggregation_error, cube_factors
from memfed.fed.authority import Authorizer, Publisher, next_version
from memfed.fed.privacy import DpSettings
from memfed.fed.validate import Accepted, Limits, check_allowed, validate_reply, verify_key
from memfed.fed.wire import (
    CONFIG_KEY,
    GLOBAL_KEY,
    PROOF_KEY,
    RoundTicket,
    check_signature,
    factors_to_record,
    hello_statement,
    read_proof,
)
from memfed.mip.v1 import cube_pb2

log = logging.getLogger("memfed.fed")


@dataclass(frozen=True)
class TrainSettings:
    """What each node is asked to do in a round (sent in the round's ConfigRecord)."""

    rank: int = 4
    steps: int = 20
    lr: float = 5e-3
    batch_size: int = 16
    dp_clip: float = 0.0  # client-side clipping of the flat factor vector (memfed.fed.privacy); 0: off
    dp_noise: float = 0.0  # Gaussian noise multiplier: std = dp_noise * dp_clip


@dataclass
class Rejection:
    node_id: int
    principal: str
    error: str  # the memfed error type, e.g. "PermissionDeniedError"
    message: str


@dataclass
class RoundReport:
    """What one round did: published version (or none), who counted, who was rejected and why."""

    server_round: int
    version: str | None
    contributors: list[str]
    weights: list[float]
    rejected: list[Rejection] = field(default_factory=list)
    truncation_error: float = 0.0
    aggregation_error: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class SharedCubeStrategy(Strategy):
    """Federated training of one shared LoRA cube, with registry admission and exact aggregation."""

    def __init__(
        self,
        authority: Authorizer,
        publisher: Publisher,
        cube_id: str,
        *,
        method: str = "stack",
        svd_rank: int | None = None,
        train: TrainSettings | None = None,
        min_nodes: int = 1,
        min_contributors: int = 1,
        max_update_norm: float = 1e3,
        wait_nodes_s: float = 120.0,
        query_timeout_s: float = 60.0,
        owner: str = "",
        check_exact: bool = True,
    ) -> None:
        if method not in METHODS:
            from memfed.errors import InvalidArgumentError

            raise InvalidArgumentError(f"unknown aggregation {method!r}", hint=f"use one of {METHODS}")
        self.authority, self.publisher, self.cube_id = authority, publisher, cube_id
        self.method, self.svd_rank = method, svd_rank
        self.train = train or TrainSettings()
        DpSettings(self.train.dp_clip, self.train.dp_noise)  # InvalidArgumentError for a bad setting
        self.min_nodes, self.min_contributors = min_nodes, min_contributors
        self.limits = Limits(rank=self.train.rank, max_update_norm=max_update_norm)
        self.wait_nodes_s, self.query_timeout_s = wait_nodes_s, query_timeout_s
        self.owner, self.check_exact = owner, check_exact
        self.current: MemCube = publisher.current(cube_id)
        self.principals: dict[int, str] = {}  # node id -> principal proven by a signed challenge
        self.tickets: dict[int, RoundTicket] = {}
        self.reports: list[RoundReport] = []
        self._pending: list[Rejection] = []
        self._shared: tuple[str, ArrayRecord] | None = None  # (digest, record) of ``current``'s factors
        self._publisher_pool: ThreadPoolExecutor | None = None  # only while ``start`` runs the rounds
        self._publishing: tuple[Future, RoundReport] | None = None

    # -- the round loop, with publishing off the critical path -------------------------------------

    def start(self, grid: Grid, initial_arrays: ArrayRecord, *args: Any, **kwargs: Any) -> Result:
        """Flower's round loop (``Strategy.start``), each round's publish overlapping the next round.

        Returns once every publish finished; a failed one raises here (or at the next round)."""
        self._publisher_pool = ThreadPoolExecutor(1, thread_name_prefix="memfed-publish")
        try:
            try:
                result = super().start(grid, initial_arrays, *args, **kwargs)
            except BaseException:
                self._settle(raise_error=False)  # the run's own error wins; a publish error is logged
                raise
            self._settle()
            return result
        finally:
            self._publisher_pool.shutdown(wait=True)
            self._publisher_pool = None

    def _settle(self, *, raise_error: bool = True) -> None:
        """Wait for the publish in flight; on failure mark its round unpublished and raise (or log)."""
        if self._publishing is None:
            return
        future, report = self._publishing
        self._publishing = None
        exc = future.exception()
        if exc is None:
            return
        log.error("round %d: publishing %s failed: %s", report.server_round, report.version, exc)
        report.version = None
        if raise_error:
            raise exc

    def _publish(self, cube: MemCube, report: RoundReport) -> None:
        """Publish ``cube`` now, or (under ``start``) on the publish thread after the previous one."""
        self._settle()
        if self._publisher_pool is None:
            self.publisher.publish(cube)
            return
        publish: Callable[[MemCube], object] = self.publisher.publish
        self._publishing = (self._publisher_pool.submit(publish, cube), report)

    def _check_publishing(self) -> None:
        """Raise a failed background publish before opening another round on its version."""
        if self._publishing is not None and self._publishing[0].done():
            self._settle()

    # -- admission ---------------------------------------------------------------------------------

    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        deadline = time.monotonic() + self.wait_nodes_s
        while len(nodes := list(grid.get_node_ids())) < self.min_nodes and time.monotonic() < deadline:
            time.sleep(0.2)
        return nodes

    def admit(self, grid: Grid, node_ids: list[int]) -> list[int]:
        """The node ids that proved a registered principal granted ``use``; the others are recorded."""
        unknown = [n for n in node_ids if n not in self.principals]
        if unknown:
            challenge = os.urandom(32)
            record = RecordDict({CONFIG_KEY: ConfigRecord({"challenge": challenge, "cube-id": self.cube_id})})
            queries = [Message(record, dst_node_id=n, message_type=MessageType.QUERY) for n in unknown]
            for reply in grid.send_and_receive(queries, timeout=self.query_timeout_s):
                node = reply.metadata.src_node_id
                try:
                    if reply.has_error():
                        raise UnavailableError(
                            f"node did not answer the admission query: {reply.error.reason}"
                        )
                    self.principals[node] = self.identify(reply.content, challenge)
                except MemfedError as exc:
                    self._reject(node, "?", exc)
        return self.granted(node_ids)

    def granted(self, node_ids: list[int]) -> list[int]:
        """Of the identified nodes, those whose principal is granted ``use`` now (asked every round, so a
        revoke takes effect at the next one); the others are recorded as rejected."""
        admitted = []
        for node in node_ids:
            principal = self.principals.get(node)
            if principal is None:
                continue
            try:
                check_allowed(self.authority, principal, self.cube_id)
            except MemfedError as exc:
                self._reject(node, principal, exc)
                continue
            admitted.append(node)
        return admitted

    def identify(self, content: RecordDict, challenge: bytes) -> str:
        """The principal a node's answer to ``challenge`` proves (AuthenticationError if it proves none)."""
        proof = content.config_records.get(PROOF_KEY)
        if proof is None:
            raise UnavailableError("node answered the admission query without a proof")
        principal, key, signature = read_proof(proof)
        verify_key(self.authority, principal, key)
        check_signature(key, signature, hello_statement(principal, challenge), principal)
        return principal

    def _reject(self, node: int, principal: str, exc: MemfedError) -> None:
        log.warning("rejected node %s (%s): %s: %s", node, principal, type(exc).__name__, exc)
        self._pending.append(Rejection(node, principal, type(exc).__name__, str(exc)))

    # -- Strategy ----------------------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._check_publishing()
        self._pending = []
        admitted = self.admit(grid, self._wait_for_nodes(grid))
        contents = self.open_round(server_round, admitted)
        log.info("round %d: %d of %d nodes admitted", server_round, len(admitted), len(self.principals))
        return [Message(c, dst_node_id=n, message_type=MessageType.TRAIN) for n, c in contents.items()]

    def open_round(self, server_round: int, admitted: list[int]) -> dict[int, RecordDict]:
        """The TRAIN content for each admitted node: the shared cube and the node's own round ticket."""
        self.tickets = {}
        contents = {}
        shared = self.shared_record()
        for node in admitted:
            ticket = RoundTicket(self.cube_id, self.current.manifest.digest, server_round, os.urandom(16))
            self.tickets[node] = ticket
            cfg = ConfigRecord(
                {
                    "cube-id": self.cube_id,
                    "version": self.current.manifest.version,
                    "base-digest": ticket.base_digest,
                    "base-model": self.current.manifest.base_model.SerializeToString(),
                    "server-round": server_round,
                    "nonce": ticket.nonce,
                    "rank": self.train.rank,
                    "steps": self.train.steps,
                    "lr": self.train.lr,
                    "batch-size": self.train.batch_size,
                    "dp-clip": self.train.dp_clip,
                    "dp-noise": self.train.dp_noise,
                    "seed": server_round,  # one seed per round: equal fresh A's on every node (FedIT's init)
                }
            )
            contents[node] = RecordDict({GLOBAL_KEY: shared, CONFIG_KEY: cfg})
        return contents

    def shared_record(self) -> ArrayRecord:
        """The current cube's factors as the ArrayRecord sent to every node (encoded once a version)."""
        digest = self.current.manifest.digest
        if self._shared is None or self._shared[0] != digest:
            self._shared = (digest, factors_to_record(cube_factors(self.current)))
        return self._shared[1]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        items: list[tuple[int, RecordDict | str]] = []
        for reply in replies:
            body = reply.error.reason if reply.has_error() else reply.content
            items.append((reply.metadata.src_node_id, body))
        return self.collect(server_round, items)

    def collect(
        self, server_round: int, items: list[tuple[int, RecordDict | str]]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate (node id, reply content or error reason) pairs, aggregate the good ones, publish."""
        t0 = time.perf_counter()
        accepted: list[Accepted] = []
        seen: set[str] = set()
        for node, body in items:
            principal = self.principals.get(node, "?")
            try:
                if isinstance(body, str):
                    raise UnavailableError(f"the node's ClientApp failed: {body}")
                ticket = self.tickets.get(node)
                if ticket is None:
                    raise UnavailableError("reply from a node that was not asked this round")
                update = validate_reply(
                    body,
                    expected_principal=self.principals.get(node),
                    ticket=ticket,
                    current=self.current,
                    authorizer=self.authority,
                    limits=self.limits,
                )
                if update.principal in seen:
                    from memfed.errors import IntegrityError

                    raise IntegrityError(f"a second update from {update.principal!r} in one round")
            except MemfedError as exc:
                self._reject(node, principal, exc)
                continue
            seen.add(update.principal)
            accepted.append(update)
        return self._finish(server_round, accepted, t0)

    def _finish(
        self, server_round: int, accepted: list[Accepted], t0: float
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rejected = self._pending
        accepted.sort(key=lambda u: u.principal)  # the stacked factors' order does not depend on arrival
        if len(accepted) < max(1, self.min_contributors):
            log.warning(
                "round %d: %d accepted updates, %d needed: nothing published",
                server_round,
                len(accepted),
                self.min_contributors,
            )
            seconds = time.perf_counter() - t0
            self.reports.append(RoundReport(server_round, None, [], [], rejected, seconds=seconds))
            return None, MetricRecord({"accepted": len(accepted), "rejected": len(rejected)})
        updates = [u.factors for u in accepted]
        agg = aggregate(
            self.current, updates, [u.num_examples for u in accepted], method=self.method, rank=self.svd_rank
        )
        before = cube_factors(self.current)
        error = aggregation_error(before, agg.factors, updates, agg.weights) if self.check_exact else None
        cube = self._next_cube(server_round, agg.factors, accepted, agg.weights, agg.truncation_error)
        report = RoundReport(
            server_round,
            cube.manifest.version,
            [u.principal for u in accepted],
            agg.weights,
            rejected,
            agg.truncation_error,
            error,
            0.0,
        )
        self._publish(cube, report)
        self.current = cube  # the next round trains on it, published or (under ``start``) publishing
        report.seconds = time.perf_counter() - t0
        self.reports.append(report)
        log.info("round %d: publishing %s from %s", server_round, cube.ref, report.contributors)
        metrics = MetricRecord(
            {
                "accepted": len(accepted),
                "rejected": len(rejected),
                "num-examples": sum(u.num_examples for u in accepted),
                "truncation-error": agg.truncation_error,
            }
        )
        return self.shared_record(), metrics

    def _next_cube(
        self,
        server_round: int,
        factors: Factors,
        accepted: list[Accepted],
        weights: list[float],
        truncation_error: float,
    ) -> MemCube:
        m = self.current.manifest
        params = {
            "round": str(server_round),
            "aggregation": self.method,
            "weights": json.dumps(dict(zip([u.principal for u in accepted], weights, strict=True))),
            "num_examples": str(sum(u.num_examples for u in accepted)),
            "train_rank": str(self.train.rank),
            "parent": self.current.ref,
            "rejected": json.dumps([[r.principal, r.error] for r in self._pending]),
        }
        if self.train.dp_clip > 0:
            params["dp_clip"] = f"{self.train.dp_clip:g}"
            params["dp_noise_multiplier"] = f"{self.train.dp_noise:g}"
        if self.method == "svd":
            params["truncation_error"] = f"{truncation_error:.6g}"
        origin = cube_pb2.Origin(
            method="federated",
            description=(
                f"federated round {server_round} of {self.cube_id}: {self.method} aggregation of "
                f"{len(accepted)} updates on {self.current.ref}"
            ),
            sources=[self.current.ref],
            contributors=[u.principal for u in accepted],
            params=params,
        )
        return lora_cube(
            m.base_model,
            {k: (a.float(), b.float()) for k, (a, b) in factors.items()},
            cube_id=self.cube_id,
            version=next_version(m.version),
            origin=origin,
            version_chain=[*m.version_chain, m.digest],
            owner=self.owner or m.owner,
            tags=list(m.tags),
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # evaluation is the bench's job (held-out facts), not a per-round message

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log.info(
            "SharedCubeStrategy: cube %s, %s aggregation, rank %d, %d steps, min %d contributors",
            self.cube_id,
            self.method,
            self.train.rank,
            self.train.steps,
            self.min_contributors,
        )
