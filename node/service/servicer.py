"""``NodeService`` over ``grpc.aio``: every RPC of memfed.mip.v1.NodeService for one ``Node``.

Threads. The event loop only parses, checks and routes. Model work (loading, activating, evicting,
generating) runs on one model thread (the runtime serializes forward passes anyway, and one thread keeps
module residency changes in order); store work (listing, reading, writing payloads, lifecycle moves,
merging) runs on the default thread pool. Nothing blocks the loop, so health checks and listings answer
while a batch generates.

Errors. Library code raises ``memfed.errors`` types; this edge alone turns them into status codes
(``grpc_status``), with the message and hint as details and the error's type in trailing metadata, so
``memfed.client.NodeClient`` raises the same type on the caller's side. Anything else is a bug: it is
logged with its traceback and answered INTERNAL.

Hooks for the layers that come later: ``manifest_verifier`` (signature check of a pushed manifest
against a trust store), ``authorizer`` (capability tokens from the registry) and sealed streams
(``sealed_header``), which are refused as UNIMPLEMENTED until the crypto layer serves them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc

import memfed
from memfed.client import CHUNK_SIZE
from memfed.cube.core import MemCube
from memfed.cube.manifest import (
    LIFECYCLE_NAMES,
    PARAMETRIC_KINDS,
    CubeManifest,
    kind_name,
    lifecycle_name,
    manifest_from_bytes,
    parse_ref,
    parse_semver,
    ref_string,
    semver_key,
)
from memfed.errors import (
    CapacityError,
    DeadlineExceededError,
    IntegrityError,
    InvalidArgumentError,
    LifecycleError,
    MemfedError,
    NotFoundError,
    UnsupportedError,
)
from memfed.grpc_edge import make_edges
from memfed.mip.v1 import cube_pb2, node_service_pb2, node_service_pb2_grpc
from memfed.node.generation import MAX_ROWS, check_rows
from memfed.node.service import serde
from memfed.node.service.batcher import GenerateBatcher
from memfed.node.service.feedback import FeedbackIntake
from memfed.node.service.node import Node
from memfed.node.service.streams import PushSink
from memfed.registry.tls import peer_of

pb = node_service_pb2
log = logging.getLogger("memfed.node.service")
T = TypeVar("T")

ARCHIVED = LIFECYCLE_NAMES["archived"]
EXPIRED = LIFECYCLE_NAMES["expired"]
ACTIVATED = LIFECYCLE_NAMES["activated"]
GENERATED = LIFECYCLE_NAMES["generated"]
RUNTIME_KINDS = frozenset((cube_pb2.CUBE_KIND_LORA, cube_pb2.CUBE_KIND_ADAPTER))
DEFAULT_MAX_CUBE_BYTES = 8 << 30
# Refuse a Generate whose deadline is shorter than this share of the estimated time it needs: the
# estimate is rough (batch sizes vary), so only clearly hopeless calls are refused up front.
DEADLINE_REFUSE_SHARE = 0.5

ManifestVerifier = Callable[[cube_pb2.SignedManifest], None]
Authorizer = Callable[[str, str, pb.CapabilityToken | None, grpc.aio.ServicerContext], None]


def _internal(exc: BaseException, method: str) -> str:
    log.error("%s failed", method, exc_info=exc)
    return f"internal error on the node in {method} ({type(exc).__name__}: {exc}); the node's log has details"


# Map errors of unary / client-streaming (edge) and server-streaming (edge_stream) handlers to status
# codes (see the module docstring and memfed.grpc_edge).
edge, edge_stream = make_edges(_internal)


def _name(ref: pb.CubeRef) -> str:
    return f"{ref.cube_id}@{ref.version}" if ref.version else ref.cube_id


class NodeServicer(node_service_pb2_grpc.NodeServiceServicer):
    """The RPCs. Construct through ``memfed.node.service.NodeServer``, which also wires the batcher."""

    def __init__(
        self,
        node: Node,
        batcher: GenerateBatcher,
        model_executor: Executor,
        *,
        chunk_size: int = CHUNK_SIZE,
        max_cube_bytes: int = DEFAULT_MAX_CUBE_BYTES,
        manifest_verifier: ManifestVerifier | None = None,
        authorizer: Authorizer | None = None,
        sealer: Any | None = None,
        feedback: FeedbackIntake | None = None,
    ) -> None:
        self.node = node
        self.feedback = feedback  # memfed.node.service.feedback: the Feedback RPC's log and evolver
        self.sealer = sealer  # memfed.node.service.sealed.SealedSource: FetchCube with recipient_id
        self.store = node.store
        self.scheduler = node.scheduler
        self.runtime = node.runtime
        self.batcher = batcher
        self.model_executor = model_executor
        self.chunk_size = chunk_size
        self.max_cube_bytes = max_cube_bytes
        self.manifest_verifier = manifest_verifier
        self.authorizer = authorizer
        # The node's active modules. The runtime's own routing cannot be read for this from other threads:
        # while a batch runs it holds that batch's routing. So the set is read on the model thread (where
        # no batch is running then) after every change, and kept here for everyone else.
        self._active_now: tuple[str, ...] = self.runtime.active

    # -- helpers ----------------------------------------------------------------------------------------

    async def _on_model(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self.model_executor, functools.partial(fn, *args)
        )

    def _authorize(
        self, action: str, what: str, capability: pb.CapabilityToken | None, context: grpc.aio.ServicerContext
    ) -> None:
        """Capability check (registry tokens, a later issue). Without an authorizer every call is allowed:
        bind the node to loopback or put it behind mutual TLS until then."""
        if self.authorizer is not None:
            self.authorizer(action, what, capability, context)

    def _resolve(self, ref: pb.CubeRef) -> CubeManifest:
        return serde.resolve_ref(self.store, ref, node=f"node {self.node.node_id}")

    @staticmethod
    def _reason(reason: str, context: grpc.aio.ServicerContext, what: str) -> str:
        return reason.strip() or f"{what} requested over MIP by {context.peer()}"

    def _note_active(self) -> tuple[str, ...]:
        """Record the active set; call on the model thread after anything that may change it."""
        self._active_now = self.runtime.active
        return self._active_now

    def _forget(self, refs: Sequence[str], *, keep_resident: bool = False) -> None:
        """Take modules out of service on the model thread: out of the active set, and (unless
        ``keep_resident``) off the device and out of the host cache."""
        active = self.runtime.active
        if any(r in refs for r in active):
            self.runtime.activate(*(r for r in active if r not in refs))
        if not keep_resident:
            for ref in refs:
                with contextlib.suppress(NotFoundError):  # not loaded: nothing to free
                    self.scheduler.evict(ref, tier="host")
        self._note_active()

    # -- node -------------------------------------------------------------------------------------------

    @edge
    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthResponse:
        s = self.scheduler
        for _ in range(5):  # counters are read while the model thread may change them: retry a torn read
            try:
                return pb.HealthResponse(
                    node_id=self.node.node_id,
                    memfed_version=memfed.__version__,
                    base_model=self.node.fingerprint,
                    resident_modules=len(self.runtime.resident),
                    active_modules=list(self._active_now),
                    device_bytes_used=s.device_bytes(),
                    device_budget_bytes=s.device_budget,
                    host_bytes_used=s.host_bytes(),
                    host_budget_bytes=s.host_budget,
                    queued_rows=self.batcher.queued_rows,
                    device=self.node.device,
                )
            except RuntimeError:  # "dictionary changed size during iteration"
                await asyncio.sleep(0.001)
        raise MemfedError("the node's counters kept changing while they were read; retry")

    # -- cubes ------------------------------------------------------------------------------------------

    @edge
    async def ListCubes(
        self, request: pb.ListCubesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListCubesResponse:
        self._authorize("read", request.cube_id_prefix or "*", None, context)
        bad = [s for s in request.states if s not in LIFECYCLE_NAMES.values()]
        if bad:
            raise InvalidArgumentError(f"unknown lifecycle state number(s) {bad}")
        states = list(request.states) or None
        manifests = await asyncio.to_thread(self.store.list, request.cube_id_prefix or None, states)
        items, token = serde.page(manifests, request.page_size, request.page_token)
        return pb.ListCubesResponse(cubes=items, next_page_token=token)

    @edge
    async def GetManifest(
        self, request: pb.GetManifestRequest, context: grpc.aio.ServicerContext
    ) -> cube_pb2.SignedManifest:
        self._authorize("read", _name(request.ref), request.capability, context)
        m = await asyncio.to_thread(self._resolve, request.ref)
        return serde.signed_manifest(m)

    @edge_stream
    async def FetchCube(
        self, request: pb.FetchCubeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CubeStreamMessage | bytes]:
        """The cube as a stream: its manifest (or sealed header), then its payload chunks, which come
        encoded as bytes (``serde.chunk_wire_prefix``; the server's FetchCube serializer passes them on)."""
        self._authorize("export", _name(request.ref), request.capability, context)
        if request.recipient_id:
            if self.sealer is None:
                raise UnsupportedError(
                    "this node does not seal cubes in MIP streams (started without --identity and "
                    f"--registry), recipient_id {request.recipient_id!r}",
                    hint="start it with --identity and --registry, or seal it with `memfed cube export` and "
                    "send the .mcube file",
                )
            sealed_m = await asyncio.to_thread(self._resolve, request.ref)
            async for msg in self.sealer.fetch(sealed_m, request, context):
                yield msg
            return
        chunk_size = serde.chunk_size_of(request.chunk_size, self.chunk_size)
        m = await asyncio.to_thread(self._resolve, request.ref)
        cube = await asyncio.to_thread(self.store.get, m.cube_id, m.version)  # verified read
        serde.check_resume(len(cube.payload), chunk_size, request.resume_from_chunk)
        sent = CubeManifest()
        sent.CopyFrom(cube.manifest)
        sent.lifecycle = GENERATED  # lifecycle is this node's local state, not part of the cube
        yield pb.CubeStreamMessage(plain_manifest=serde.signed_manifest(sent))
        for msg in serde.chunk_messages(cube.payload, chunk_size, request.resume_from_chunk):
            yield msg

    @edge
    async def PushCube(
        self, request_iterator: AsyncIterator[pb.CubeStreamMessage], context: grpc.aio.ServicerContext
    ) -> pb.PushCubeResponse:
        stream = aiter(request_iterator)
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            raise InvalidArgumentError(
                "empty cube stream", hint="send the manifest first, then the payload chunks"
            ) from None
        body = first.WhichOneof("body")
        if body == "sealed_header":
            raise UnsupportedError(
                "this node does not open sealed cube streams yet",
                hint="import the sealed .mcube file on the node with `memfed cube import`, or push the "
                "plain cube over a trusted channel",
            )
        if body != "plain_manifest":
            raise InvalidArgumentError(
                f"a cube stream must start with the manifest, not a {body or 'empty'} message",
                hint="send CubeStreamMessage(plain_manifest=...) first, then the chunks",
            )
        if self.manifest_verifier is not None:
            self.manifest_verifier(first.plain_manifest)
        m = manifest_from_bytes(first.plain_manifest.manifest)
        self._authorize("admin", ref_string(m), None, context)
        m.lifecycle = GENERATED  # lifecycle is local state: a received cube starts fresh here
        if m.payload.size_bytes > self.max_cube_bytes:
            raise CapacityError(
                f"cube {ref_string(m)} is {m.payload.size_bytes:,} bytes; this node takes at most "
                f"{self.max_cube_bytes:,}",
                hint="raise the node's --max-cube-mb, or split the module",
            )
        await asyncio.to_thread(self._check_fits, m)
        already = await asyncio.to_thread(self.store.has, m.cube_id, m.version)
        validate = self._validate_payload if m.kind in RUNTIME_KINDS else None
        sink = PushSink(m, validate)
        sink.writer = asyncio.get_running_loop().run_in_executor(
            None, self.store.put_stream, m, sink.chunks()
        )
        try:
            await self._receive(stream, sink, m)
            stored = await sink.writer
        except BaseException:
            sink.abort()
            with contextlib.suppress(BaseException):
                await asyncio.shield(sink.writer)  # let the writer discard its temp file
            raise
        log.info("stored pushed cube %s (%s bytes) from %s", ref_string(stored), stored.payload.size_bytes,
                 context.peer())  # fmt: skip
        return pb.PushCubeResponse(stored=serde.ref_message(stored), already_present=already)

    async def _receive(
        self, stream: AsyncIterator[pb.CubeStreamMessage], sink: PushSink, m: CubeManifest
    ) -> None:
        expect = received = 0
        ended = False
        async for msg in stream:
            body = msg.WhichOneof("body")
            if body != "chunk":
                raise InvalidArgumentError(f"unexpected {body or 'empty'} message in the payload stream")
            if ended:
                raise InvalidArgumentError("a chunk arrived after the chunk marked last")
            if msg.chunk.index != expect:
                raise InvalidArgumentError(
                    f"chunk {msg.chunk.index} arrived where chunk {expect} was expected; nothing was stored",
                    hint="send chunks in order, numbered from 0",
                )
            received += len(msg.chunk.data)
            if received > m.payload.size_bytes:
                raise IntegrityError(
                    f"the payload stream of cube {ref_string(m)} is longer than the {m.payload.size_bytes:,} "
                    "bytes its manifest says; nothing was stored",
                    hint="the payload belongs to another manifest",
                )
            await sink.feed(msg.chunk.data)
            expect += 1
            ended = msg.chunk.last
            if sink.writer is not None and sink.writer.done():
                break  # the writer failed early (disk, validation): its error is the answer
        await sink.finish()

    def _check_fits(self, m: CubeManifest) -> None:
        """A node stores only cubes it can run: a parametric cube must be made for this base model.
        (Relaying foreign cubes between nodes is the registry's job, not a node's.)"""
        if m.kind in PARAMETRIC_KINDS:
            self.runtime.check_compatible(m)

    def _validate_payload(self, m: CubeManifest, payload: bytes) -> None:
        """The runtime's load checks (targets, ranks, shapes, NaN/Inf) without loading; runs before the
        store installs the payload, so a node never stores a module it could not run."""
        self.runtime.validate(MemCube(m, payload))

    # -- modules on the model -----------------------------------------------------------------------------

    @edge
    async def Load(self, request: pb.LoadRequest, context: grpc.aio.ServicerContext) -> pb.LoadResponse:
        self._authorize("use", _name(request.ref), request.capability, context)
        m = await asyncio.to_thread(self._resolve, request.ref)

        def load() -> pb.LoadResponse:
            t0 = time.perf_counter()
            module = self.scheduler.load(ref_string(m), pin=request.pin)
            return pb.LoadResponse(
                loaded=serde.ref_message(module.manifest),
                size_bytes=module.nbytes,
                seconds=time.perf_counter() - t0,
                device_bytes_used=self.scheduler.device_bytes(),
                device_budget_bytes=self.scheduler.device_budget,
            )

        return await self._on_model(load)

    @edge
    async def Evict(self, request: pb.EvictRequest, context: grpc.aio.ServicerContext) -> pb.EvictResponse:
        self._authorize("use", _name(request.ref), None, context)
        m = await asyncio.to_thread(self._resolve, request.ref)
        tier = request.tier or "device"

        def evict() -> pb.EvictResponse:
            ref = ref_string(m)
            try:
                self.scheduler.evict(ref, tier=tier)  # an evicted active module stops being active
            finally:
                self._note_active()
            return pb.EvictResponse(evicted=serde.ref_message(m), now_in=self.scheduler.stats[ref].tier)

        return await self._on_model(evict)

    @edge
    async def Activate(
        self, request: pb.ActivateRequest, context: grpc.aio.ServicerContext
    ) -> pb.ActivateResponse:
        self._authorize("use", _name(request.ref), request.capability, context)
        m = await asyncio.to_thread(self._resolve, request.ref)

        def activate() -> pb.ActivateResponse:
            t0 = time.perf_counter()
            ref = ref_string(m)
            # Another version of the same cube gives way: one version of a module is active at a time.
            keep = [r for r in self.runtime.active if parse_ref(r)[0] != m.cube_id]
            self.scheduler.load(ref, pin=request.pin)
            try:
                self.scheduler.activate(*keep, ref)
            finally:
                self._note_active()
            state = self.runtime.resident[ref].manifest.lifecycle
            return pb.ActivateResponse(
                state=state,
                seconds=time.perf_counter() - t0,
                activated=serde.ref_message(m),
                active=list(self._active_now),
            )

        return await self._on_model(activate)

    @edge
    async def Deactivate(
        self, request: pb.DeactivateRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeactivateResponse:
        ref = request.ref
        if not ref.cube_id:

            def deactivate_all() -> None:
                self.scheduler.deactivate()
                self._note_active()

            await self._on_model(deactivate_all)
            return pb.DeactivateResponse(active=[])
        serde.check_ref(ref)
        self._authorize("use", _name(ref), None, context)

        def deactivate() -> pb.DeactivateResponse:
            active = self.runtime.active
            hits = [
                r for r in active if parse_ref(r)[0] == ref.cube_id and (not ref.version or r == _name(ref))
            ]
            if not hits:
                raise NotFoundError(
                    f"module {_name(ref)} is not active on node {self.node.node_id}",
                    hint=f"active modules: {', '.join(active) or 'none'}",
                )
            self._forget(hits, keep_resident=True)
            m = self.runtime.resident[hits[0]].manifest
            return pb.DeactivateResponse(state=m.lifecycle, active=list(self._active_now))

        return await self._on_model(deactivate)

    @edge
    async def BindTask(
        self, request: pb.BindTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.BindTaskResponse:
        task = request.task.strip()
        if not task:
            raise InvalidArgumentError("the request names no task", hint="name one, e.g. contract_review")
        self._authorize("admin", f"task:{task}", request.capability, context)
        tasks = self.scheduler.tasks
        if not request.ref.cube_id:
            if task not in tasks:
                raise NotFoundError(
                    f"no module is bound to task {task!r} on node {self.node.node_id}",
                    hint=f"bound tasks: {', '.join(sorted(tasks)) or 'none'}",
                )
            await self._on_model(tasks.pop, task)
            module = pb.CubeRef()
        else:
            m = await asyncio.to_thread(self._resolve, request.ref)
            # Without a version the binding follows the module's current version.
            name = ref_string(m) if request.ref.version else m.cube_id
            await self._on_model(self.scheduler.bind_task, task, name)
            module = serde.ref_message(m)
        bindings = [f"{t}={n}" for t, n in sorted(tasks.items())]
        return pb.BindTaskResponse(task=task, module=module, bindings=bindings)

    # -- generation ---------------------------------------------------------------------------------------

    @edge
    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        if not request.rows:
            raise InvalidArgumentError("a generation request needs at least one row")
        if len(request.rows) > MAX_ROWS:
            raise InvalidArgumentError(
                f"{len(request.rows)} rows in one request; at most {MAX_ROWS}", hint="split it"
            )
        self._authorize("use", "generate", request.capability, context)
        active = self._active_now  # what rows that name no modules run: the modules active now
        rows = await asyncio.to_thread(self._rows, request.rows, active)
        check_rows(rows)
        deadline = None
        remaining = context.time_remaining()
        if remaining is not None:
            estimate = self.batcher.estimate_s(rows)
            if estimate is not None and remaining < DEADLINE_REFUSE_SHARE * estimate:
                most = max(r.max_new_tokens for r in rows)
                raise DeadlineExceededError(
                    f"the call allows {remaining:.2f}s but its rows need about {estimate:.2f}s here "
                    f"({most} new tokens at ~{1e3 * estimate / most:.1f} ms per token); nothing was run",
                    hint="raise the deadline (--timeout), or ask for fewer new tokens",
                )
            deadline = time.monotonic() + remaining
        results, batch_rows = await self.batcher.submit(rows, deadline)
        return pb.GenerateResponse(results=[serde.result_message(r) for r in results], batch_rows=batch_rows)

    def _rows(self, rows: Sequence[pb.GenerateRow], active: tuple[str, ...]) -> list[Any]:
        """RowRequests with every module resolved to its exact version (unknown ones fail here, before
        the call joins a batch)."""
        out = []
        exact: dict[tuple[str, str, str], str] = {}
        for i, row in enumerate(rows):
            if row.base_only and (row.modules or row.task):
                raise InvalidArgumentError(
                    f"row {i} asks for the bare model (base_only) and names modules or a task",
                    hint="drop base_only, or the modules and task",
                )
            names = []
            for ref in row.modules:
                key = (ref.cube_id, ref.version, ref.digest)
                if key not in exact:
                    exact[key] = ref_string(self._resolve(ref))
                names.append(exact[key])
            if not names and not row.task and not row.base_only:
                names = list(active)
            out.append(serde.row_request(row, tuple(dict.fromkeys(names))))
        return out

    # -- lifecycle and merging ----------------------------------------------------------------------------

    @edge
    async def Transition(
        self, request: pb.TransitionRequest, context: grpc.aio.ServicerContext
    ) -> pb.TransitionResponse:
        self._authorize("admin", _name(request.ref), request.capability, context)
        target = request.target
        if target not in LIFECYCLE_NAMES.values():
            raise InvalidArgumentError(
                "the transition names no target state", hint=f"use one of {', '.join(LIFECYCLE_NAMES)}"
            )
        reason = self._reason(request.reason, context, f"move to {lifecycle_name(target)}")

        def transition() -> tuple[CubeManifest, int]:
            m = self._resolve(request.ref)
            lc = self.node.lifecycle
            if target == ACTIVATED and m.lifecycle in (ARCHIVED, EXPIRED):
                lc.restore(m.cube_id, m.version, reason)
            else:
                lc.transition(m.cube_id, m.version, target, reason)
            return m, m.lifecycle

        # On the model thread, like evolve steps (which also move versions): one order for every change.
        m, old = await self._on_model(transition)
        if target in (ARCHIVED, EXPIRED, GENERATED):
            await self._on_model(
                functools.partial(self._forget, [ref_string(m)], keep_resident=target == GENERATED)
            )
        return pb.TransitionResponse(from_state=old, to_state=target)

    @edge
    async def Rollback(
        self, request: pb.RollbackRequest, context: grpc.aio.ServicerContext
    ) -> pb.RollbackResponse:
        self._authorize("admin", request.cube_id, request.capability, context)
        serde.check_ref(pb.CubeRef(cube_id=request.cube_id))
        reason = self._reason(request.reason, context, "rollback")

        def rollback() -> Any:
            to = request.to_version or self._version_before_current(request.cube_id)
            return self.node.lifecycle.rollback(request.cube_id, to, reason)

        result = await self._on_model(rollback)  # ordered with evolve steps, as Transition
        await self._on_model(self._forget, [f"{result.cube_id}@{v}" for v in result.archived])
        previous = pb.CubeRef(cube_id=result.cube_id, version=result.previous or "")
        return pb.RollbackResponse(
            previous=previous, current=pb.CubeRef(cube_id=result.cube_id, version=result.version)
        )

    @edge
    async def Feedback(
        self, request: pb.FeedbackRequest, context: grpc.aio.ServicerContext
    ) -> pb.FeedbackResponse:
        from memfed.node.evolve.feedback import FeedbackItem

        cube_id = request.ref.cube_id
        self._authorize("feedback", _name(request.ref), request.capability, context)
        if self.feedback is None:
            raise UnsupportedError(
                f"node {self.node.node_id} does not take feedback",
                hint="serve it with a feedback log (NodeServer(feedback=FeedbackIntake(node)); "
                "`memfed node serve` has one)",
            )
        serde.check_ref(pb.CubeRef(cube_id=cube_id))
        # Who rates: the certificate name of a mutual-TLS caller (with or without a capability authorizer);
        # only a node started with --insecure takes a relayed name from anyone.
        peer = peer_of(context)
        caller = peer.name if peer is not None else None
        operator = caller is not None and caller in getattr(self.authorizer, "local", ())
        item = FeedbackItem(
            cube_id=cube_id,
            principal=self.feedback.principal(caller, operator, request.on_behalf_of, context.peer()),
            prompt=request.prompt,
            answer=request.answer,
            good=request.good,
            correction=request.correction or None,
            version=request.ref.version or None,
        )
        receipt = await self.feedback.record(item, self._evolve_on_model)
        return pb.FeedbackResponse(
            module=pb.CubeRef(cube_id=receipt.cube_id, version=receipt.version),
            feedback_id=receipt.feedback_id,
            pending=receipt.pending,
            decision=receipt.decision,
            reason=receipt.reason,
        )

    async def _evolve_on_model(self, step: Callable[[], Any]) -> Any:
        """Run an evolve step on the model thread; a rollback takes the retired version out of service.

        Where the version a step replaced was active, the version it made current is activated in its
        place (one version of a module is active at a time, as ``Activate`` does): otherwise the node
        would keep answering with the version the evolver just replaced or rolled back."""

        def run() -> Any:
            decision = step()
            if decision.action not in ("promoted", "rolled_back") or not decision.from_version:
                return decision
            old = f"{decision.cube_id}@{decision.from_version}"
            was_active = old in self.runtime.active
            if decision.action == "rolled_back":
                self._forget([old])
            if was_active and decision.to_version:
                keep = [r for r in self.runtime.active if r != old]
                try:
                    self.scheduler.activate(*keep, f"{decision.cube_id}@{decision.to_version}")
                except MemfedError as exc:  # the decision stands (it is recorded); say why it is not served
                    log.warning("cannot activate %s@%s: %s", decision.cube_id, decision.to_version, exc)
                finally:
                    self._note_active()
            return decision

        return await self._on_model(run)

    def _version_before_current(self, cube_id: str) -> str:
        versions = self.store.versions(cube_id)
        if not versions:
            raise NotFoundError(f"no cube {cube_id!r} on node {self.node.node_id}")
        current = self.store.current_version(cube_id)
        if current is None:
            raise LifecycleError(
                f"no version of cube {cube_id} is current (all are archived or expired)",
                hint="name the version to roll back to",
            )
        older = [v for v in versions if semver_key(v) < semver_key(current)]
        if not older:
            raise LifecycleError(
                f"{cube_id}@{current} is the oldest stored version: there is nothing to roll back to",
                hint=f"stored versions: {', '.join(versions)}",
            )
        return older[-1]

    @edge
    async def Merge(self, request: pb.MergeRequest, context: grpc.aio.ServicerContext) -> pb.MergeResponse:
        from memfed.node.merge import MERGE_METHODS, merge_in_store

        self._authorize("admin", request.cube_id, request.capability, context)
        method = request.method or "cat"
        if method not in MERGE_METHODS:
            raise InvalidArgumentError(
                f"unknown merge method {method!r}", hint=f"use one of {', '.join(MERGE_METHODS)}"
            )
        if len(request.sources) < 2:
            raise InvalidArgumentError("a merge needs at least two source cubes")
        if request.weights and len(request.weights) != len(request.sources):
            raise InvalidArgumentError(
                f"{len(request.weights)} weights for {len(request.sources)} sources",
                hint="give one weight per source",
            )
        serde.check_ref(pb.CubeRef(cube_id=request.cube_id), "merged cube (cube_id)")
        version = request.version or "1.0.0"
        try:
            parse_semver(version)
        except MemfedError as exc:
            raise InvalidArgumentError(exc.message, hint=exc.hint) from exc
        kw: dict[str, Any] = {"method": method, "cube_id": request.cube_id, "version": version}
        if request.density:  # merge_lora_cubes refuses a setting the method does not use
            kw["density"] = request.density
        if request.rank:
            kw["rank"] = request.rank
        if method.startswith("dare"):
            kw["seed"] = request.seed

        def merge() -> tuple[MemCube, float]:
            t0 = time.perf_counter()
            names = [ref_string(self._resolve(ref)) for ref in request.sources]
            merged = merge_in_store(
                self.store, names, list(request.weights) or None, owner=self.node.node_id, **kw
            )  # stored in MERGED; the parents keep their states
            return merged, time.perf_counter() - t0

        merged, seconds = await asyncio.to_thread(merge)
        m = merged.manifest
        log.info(
            "merged %d cubes into %s (%s, %s)", len(request.sources), ref_string(m), method, kind_name(m.kind)
        )
        return pb.MergeResponse(merged=serde.ref_message(m), manifest=m, seconds=seconds)
