"""The node's gRPC service end to end: a real grpc.aio server on a loopback port, the typed client, and
the bad inputs a node must refuse with the right status code, a message a person can act on, and its
store unchanged."""

from __future__ import annotations

import datetime
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from memfed.client import (
    ERROR_METADATA_KEY,
    SERVICE_NAME,
    DeadlineExceededError,
    NodeClient,
    Row,
    cube_stream,
)
from memfed.cube.build import lora_cube
from memfed.cube.core import MemCube
from memfed.errors import (
    CapacityError,
    IncompatibleModelError,
    InvalidArgumentError,
    LifecycleError,
    NotFoundError,
)
from memfed.mip.v1 import cube_pb2, envelope_pb2, node_service_pb2, node_service_pb2_grpc
from memfed.node.service import BackgroundServer, Node, NodeServer
from memfed.node.tiny_models import save_tiny_model_dir, tiny_llama

pb = node_service_pb2


# -- fixtures and helpers ---------------------------------------------------------------------------------


def _linear_layers(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {
        n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }


def make_lora(
    model: torch.nn.Module,
    fingerprint: cube_pb2.BaseModelFingerprint | torch.nn.Module,
    cube_id: str,
    seed: int,
    *,
    scale: float = 0.5,
    rank: int = 4,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    edit: Callable[[dict[str, tuple[torch.Tensor, torch.Tensor]]], None] | None = None,
    **kw,
) -> MemCube:
    """A random LoRA on every ``targets`` layer of ``model`` (large enough to change its outputs)."""
    g = torch.Generator().manual_seed(seed)
    factors = {
        name: (torch.randn(rank, i, generator=g) * scale, torch.randn(o, rank, generator=g) * scale)
        for name, (i, o) in _linear_layers(model).items()
        if name.endswith(targets)
    }
    if edit is not None:
        edit(factors)
    return lora_cube(fingerprint, factors, cube_id=cube_id, **kw)


class Served:
    """One node behind a real server, with a client and a raw stub."""

    def __init__(self, node: Node, **server_kw) -> None:
        self.node = node
        self.bg = BackgroundServer(NodeServer(node, insecure=True, **server_kw))
        self.address = self.bg.start()
        self.client = NodeClient(self.address, timeout=60)
        self.channel = grpc.insecure_channel(self.address)
        self.stub = node_service_pb2_grpc.NodeServiceStub(self.channel)

    @property
    def batcher(self):
        return self.bg.server.batcher

    def lora(self, cube_id: str, seed: int, **kw) -> MemCube:
        return make_lora(self.node.model, self.node.fingerprint, cube_id, seed, **kw)

    def put(self, cube: MemCube) -> str:
        self.node.store.put(cube.manifest, cube.payload)
        return cube.ref

    def snapshot(self) -> tuple[list[tuple[str, str, str, int]], list[str]]:
        """What the store holds (every version, any state) and its temp files."""
        rows = [
            (m.cube_id, m.version, m.digest, m.lifecycle) for m in self.node.store.list(include_expired=True)
        ]
        return rows, sorted(p.name for p in self.node.store.tmp_dir.iterdir())

    def close(self) -> None:
        self.client.close()
        self.channel.close()
        self.bg.stop()
        self.node.close()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model_dir("llama", tmp_path_factory.mktemp("model") / "tiny-llama", seed=3)


@pytest.fixture(scope="module")
def served(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    node = Node.open(tiny_dir, tmp_path_factory.mktemp("store"), node_id="node-test", kv_cache_bytes=16 << 20)
    s = Served(node)
    yield s
    s.close()


def _wait(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def _rpc_error(fn: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


def _error_type(err: grpc.RpcError) -> str:
    import json

    for key, value in err.trailing_metadata() or ():
        if key == ERROR_METADATA_KEY:
            return json.loads(value)["type"]
    return ""


# -- the service, RPC by RPC ------------------------------------------------------------------------------


def test_health_grpc_health_and_reflection(served: Served) -> None:
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    h = served.client.health()
    assert h.node_id == "node-test" and h.device == "cpu"
    assert h.base_model.fingerprint_id == served.node.fingerprint.fingerprint_id
    health = health_pb2_grpc.HealthStub(served.channel)
    for service in ("", SERVICE_NAME):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    # What `grpcurl -plaintext ADDR list` and `describe` do: list services, then resolve descriptors.
    db = ProtoReflectionDescriptorDatabase(served.channel)
    assert SERVICE_NAME in db.get_services()
    service = DescriptorPool(db).FindServiceByName(SERVICE_NAME)
    assert {"Generate", "PushCube", "FetchCube", "Load", "Evict", "Merge", "Rollback"} <= set(
        service.methods_by_name
    )


def test_push_list_show_and_get_round_trip(served: Served) -> None:
    cube = served.lora("roundtrip", 1)
    first = served.client.put_cube(cube, chunk_size=300)  # several chunks
    assert (first.ref, first.already_present) == ("roundtrip@1.0.0", False)
    assert served.client.put_cube(cube).already_present
    assert "roundtrip" in {m.cube_id for m in served.client.list_cubes()}
    assert [m.cube_id for m in served.client.list_cubes(prefix="roundtr", page_size=1)] == ["roundtrip"]
    shown = served.client.show("roundtrip")
    assert shown.digest == cube.manifest.digest and shown.lifecycle == cube_pb2.LIFECYCLE_STATE_GENERATED
    for chunk_size in (0, 100):
        got = served.client.get_cube("roundtrip@1.0.0", chunk_size=chunk_size)
        assert got.payload == cube.payload and got.manifest.digest == cube.manifest.digest
    pinned = f"roundtrip@1.0.0#{cube.manifest.digest}"
    assert served.client.show(pinned).version == "1.0.0"
    with pytest.raises(NotFoundError, match="not the requested"):
        served.client.show("roundtrip@1.0.0#sha256:" + "0" * 64)
    # Resume an interrupted download: the header again, then chunks from the one asked for.
    msgs = list(
        served.stub.FetchCube(
            pb.FetchCubeRequest(ref=pb.CubeRef(cube_id="roundtrip"), chunk_size=100, resume_from_chunk=3),
            timeout=10,
        )
    )
    assert msgs[0].WhichOneof("body") == "plain_manifest"
    assert msgs[1].chunk.index == 3 and msgs[-1].chunk.last
    assert b"".join(m.chunk.data for m in msgs[1:]) == cube.payload[300:]
    past = pb.FetchCubeRequest(ref=pb.CubeRef(cube_id="roundtrip"), chunk_size=100, resume_from_chunk=10_000)
    err = _rpc_error(lambda: list(served.stub.FetchCube(past, timeout=10)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "past the payload" in err.details()
    sealed = pb.FetchCubeRequest(ref=pb.CubeRef(cube_id="roundtrip"), recipient_id="node:peer")
    err = _rpc_error(lambda: list(served.stub.FetchCube(sealed, timeout=10)))
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED and "memfed cube export" in err.details()


def test_load_activate_generate_deactivate_evict(served: Served) -> None:
    ref = served.client.put_cube(served.lora("skill", 2)).ref
    c = served.client
    bare = c.generate([Row("hello world", max_new_tokens=8)])[0]
    assert bare.memory_used == ()
    loaded = c.load("skill", pin=True)
    assert loaded.ref == ref and loaded.size_bytes > 0 and loaded.device_bytes_used >= loaded.size_bytes
    act = c.activate("skill")
    assert act.active == (ref,) and act.state == "activated"
    assert c.health().active_modules == (ref,)
    default, base, explicit = c.generate(
        [
            Row("hello world", max_new_tokens=8),
            Row("hello world", max_new_tokens=8, base_only=True),
            Row("hello world", modules=("skill",), max_new_tokens=8),
        ]
    )
    assert default.memory_used == explicit.memory_used == (f"param:{ref}",)
    assert default.text == explicit.text != bare.text  # the active module serves rows that name none
    assert base.text == bare.text and base.memory_used == ()
    assert c.deactivate("skill") == ()
    assert c.generate([Row("hello world", max_new_tokens=8)])[0].text == bare.text
    assert c.evict("skill") == "host"
    assert c.evict("skill", tier="host") == "disk"
    with pytest.raises(NotFoundError, match="not loaded"):
        c.evict("skill")
    with pytest.raises(NotFoundError, match="not active"):
        c.deactivate("skill")


def test_routed_generation_by_task_and_by_conversation(served: Served) -> None:
    c = served.client
    ref = c.put_cube(served.lora("contracts", 11)).ref
    assert c.bind_task("contract_review", "contracts") == ("contract_review=contracts",)
    routed, explicit = c.generate(
        [
            Row("clause 7", task="contract_review", max_new_tokens=6),
            Row("clause 7", modules=(ref,), max_new_tokens=6),
        ]
    )
    assert routed.memory_used == (f"param:{ref}",) and routed.text == explicit.text
    assert c.bind_task("contract_review", None) == ()
    with pytest.raises(NotFoundError, match="no module is bound"):
        c.bind_task("contract_review", None)
    with pytest.raises(NotFoundError):
        c.bind_task("contract_review", "no_such_module")
    # A continuing conversation reuses the cached prefix of its last turn (activation memory).
    first = c.generate(
        [Row("turn one of a chat", modules=(ref,), conversation_id="conv-1", max_new_tokens=4)]
    )[0]
    follow_up = f"turn one of a chat{first.text} then two"
    second = c.generate([Row(follow_up, modules=(ref,), conversation_id="conv-1", max_new_tokens=4)])[0]
    assert first.reused_tokens == 0 and second.reused_tokens > 10


def test_a_running_batch_does_not_leak_its_modules_into_other_calls(served: Served) -> None:
    """While a batch runs, the runtime's routing is that batch's; a call arriving then must still get the
    node's active set (here: none), not the modules of the batch in flight."""
    ref = served.client.put_cube(served.lora("in_flight", 12)).ref
    served.client.load(ref)
    gate, entered = threading.Event(), threading.Event()

    def busy_batch() -> None:  # what a running one-module batch looks like to the rest of the node
        with served.node.runtime.routed(modules=[ref]):
            entered.set()
            gate.wait(30)

    running = served.bg.server._model_executor.submit(busy_batch)
    assert entered.wait(10)
    call = served.stub.Generate.future(
        pb.GenerateRequest(rows=[pb.GenerateRow(prompt="q", max_new_tokens=2)])
    )
    time.sleep(0.3)  # the call is taken in while the batch runs
    gate.set()
    running.result()
    assert list(call.result(timeout=30).results[0].memory_used) == []
    assert served.client.health().active_modules == ()


def test_activating_a_new_version_replaces_the_old_one(served: Served) -> None:
    c = served.client
    for version, seed in (("1.0.0", 3), ("1.1.0", 4)):
        c.put_cube(served.lora("versioned", seed, version=version))
    assert c.activate("versioned@1.0.0").active == ("versioned@1.0.0",)
    assert c.activate("versioned@1.1.0").active == ("versioned@1.1.0",)
    assert c.deactivate() == ()


def test_lifecycle_archive_restore_rollback_and_illegal_moves(served: Served) -> None:
    c = served.client
    for version, seed in (("1.0.0", 5), ("1.1.0", 6)):
        c.put_cube(served.lora("legal", seed, version=version))
    c.activate("legal@1.1.0")
    back = c.rollback("legal", reason="regression in 1.1.0")
    assert (back.previous, back.current) == ("legal@1.1.0", "legal@1.0.0")
    assert c.show("legal@1.1.0").lifecycle == cube_pb2.LIFECYCLE_STATE_ARCHIVED
    assert "legal@1.1.0" not in c.health().active_modules  # an archived module is taken out of service
    with pytest.raises(LifecycleError, match="restore it first"):
        c.load("legal@1.1.0")
    restored = c.restore("legal@1.1.0")
    assert (restored.from_state, restored.to_state) == ("archived", "activated")
    c.load("legal@1.1.0")
    arch = c.archive("legal@1.1.0", reason="superseded")
    assert arch.to_state == "archived" and "legal@1.1.0" not in {r for r in served.node.runtime.resident}
    c.expire("legal@1.1.0")
    request = pb.TransitionRequest(
        ref=pb.CubeRef(cube_id="legal", version="1.1.0"), target=cube_pb2.LIFECYCLE_STATE_ARCHIVED
    )
    err = _rpc_error(lambda: served.stub.Transition(request, timeout=10))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "expired" in err.details()
    with pytest.raises(LifecycleError, match="oldest stored version"):
        c.rollback("legal")  # 1.0.0 is current and nothing is older


def test_merge_makes_a_new_cube_whose_chain_names_its_parents(served: Served) -> None:
    c = served.client
    a, b = served.lora("merge_a", 7, rank=2), served.lora("merge_b", 8, rank=2)
    c.put_cube(a)
    c.put_cube(b)
    m = c.merge(["merge_a", "merge_b@1.0.0"], cube_id="merged_ab", weights=[1.0, 0.5])
    assert m.cube_id == "merged_ab" and {a.manifest.digest, b.manifest.digest} <= set(m.version_chain)
    assert m.lifecycle == cube_pb2.LIFECYCLE_STATE_MERGED
    assert c.show("merge_a").lifecycle == cube_pb2.LIFECYCLE_STATE_GENERATED  # parents stay as they were
    assert c.get_cube("merged_ab").manifest.digest == m.digest
    assert c.generate([Row("abc", modules=("merged_ab",), max_new_tokens=4)])[0].memory_used == (
        "param:merged_ab@1.0.0",
    )
    with pytest.raises(InvalidArgumentError, match="unknown merge method"):
        c.merge(["merge_a", "merge_b"], cube_id="x", method="average")
    with pytest.raises(InvalidArgumentError, match="density"):
        c.merge(["merge_a", "merge_b"], cube_id="y", method="cat", density=0.5)


# -- bad inputs -------------------------------------------------------------------------------------------


def _nan(factors: dict) -> None:
    name = sorted(factors)[0]
    factors[name][0][0, 0] = float("nan")


def _inf(factors: dict) -> None:
    name = sorted(factors)[-1]
    factors[name][1][1, 1] = float("inf")


def _missing_layer(factors: dict) -> None:
    a, b = factors.pop(sorted(factors)[0])
    factors["model.layers.7.self_attn.q_proj"] = (a, b)


@pytest.mark.parametrize(
    ("case", "code", "words"),
    [
        ("foreign_model", grpc.StatusCode.FAILED_PRECONDITION, "was made for"),
        ("missing_layer", grpc.StatusCode.FAILED_PRECONDITION, "not a linear layer of this model"),
        ("wrong_rank", grpc.StatusCode.FAILED_PRECONDITION, "rank or target layer does not match"),
        ("nan", grpc.StatusCode.INVALID_ARGUMENT, "NaN or Inf"),
        ("inf", grpc.StatusCode.INVALID_ARGUMENT, "NaN or Inf"),
        ("tampered", grpc.StatusCode.DATA_LOSS, "does not hash"),
    ],
)
def test_a_bad_cube_is_refused_at_push_and_nothing_is_stored(served: Served, case, code, words) -> None:
    cube_id = f"bad_{case}"
    if case == "foreign_model":
        other = tiny_llama(seed=99)
        cube = make_lora(other, other, cube_id, 1)
    elif case == "wrong_rank":
        cube = served.lora(cube_id, 1)
        cube.manifest.payload.lora.targets[0].rank = 8  # the manifest claims rank 8, the factors are rank 4
    elif case == "tampered":
        good = served.lora(cube_id, 1)
        payload = bytearray(good.payload)
        payload[-1] ^= 0xFF
        cube = MemCube(good.manifest, bytes(payload))
    else:
        cube = served.lora(cube_id, 1, edit={"nan": _nan, "inf": _inf, "missing_layer": _missing_layer}[case])
    before = served.snapshot()
    err = _rpc_error(lambda: served.stub.PushCube(cube_stream(cube, 256), timeout=30))
    assert err.code() == code, err.details()
    assert words in err.details() and cube_id in err.details()
    assert served.snapshot() == before
    with pytest.raises(NotFoundError, match=cube_id):
        served.client.show(cube_id)


def test_bad_modules_already_in_the_store_fail_their_own_call_only(served: Served) -> None:
    """Cubes that reached the store some other way fail on load, each with its own status; a good call
    batched beside them is answered."""
    other = tiny_llama(seed=42)
    served.put(make_lora(other, other, "stored_foreign", 1))
    served.put(served.lora("stored_nan", 1, edit=_nan))
    with ThreadPoolExecutor(3) as pool:
        foreign = pool.submit(
            served.client.generate, [Row("x", modules=("stored_foreign",), max_new_tokens=4)]
        )
        nan = pool.submit(served.client.generate, [Row("x", modules=("stored_nan",), max_new_tokens=4)])
        good = pool.submit(served.client.generate, [Row("x", max_new_tokens=4, base_only=True)])
        with pytest.raises(IncompatibleModelError, match="was made for"):
            foreign.result()
        with pytest.raises(InvalidArgumentError, match="NaN or Inf"):
            nan.result()
        assert good.result()[0].new_tokens >= 0
    err = _rpc_error(
        lambda: served.stub.Load(pb.LoadRequest(ref=pb.CubeRef(cube_id="stored_nan")), timeout=10)
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and _error_type(err) == "InvalidArgumentError"


def test_unknown_modules_and_malformed_requests(served: Served) -> None:
    c = served.client
    with pytest.raises(NotFoundError, match="no cube 'no_such_module' on node node-test") as info:
        c.generate([Row("hi", modules=("no_such_module",))])
    assert "push the cube there first" in str(info.value)
    for call in (lambda: c.load("no_such_module"), lambda: c.activate("no_such_module@2.0.0")):
        with pytest.raises(NotFoundError):
            call()
    cases = [
        (pb.GenerateRequest(), "at least one row"),
        (pb.GenerateRequest(rows=[pb.GenerateRow(prompt="")]), "empty prompt"),
        (pb.GenerateRequest(rows=[pb.GenerateRow(prompt="x", max_new_tokens=100_000)]), "max_new_tokens"),
        (
            pb.GenerateRequest(
                rows=[pb.GenerateRow(prompt="x", base_only=True, modules=[pb.CubeRef(cube_id="skill")])]
            ),
            "base_only",
        ),
        (pb.GenerateRequest(rows=[pb.GenerateRow(prompt="x", modules=[pb.CubeRef()])]), "names no cube"),
        (
            pb.GenerateRequest(rows=[pb.GenerateRow(prompt="x", modules=[pb.CubeRef(cube_id="a b")])]),
            "not valid",
        ),
    ]
    for request, words in cases:
        err = _rpc_error(lambda r=request: served.stub.Generate(r, timeout=10))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.details(), err.details()
    cube = served.lora("ordering", 1)
    msgs = list(cube_stream(cube, 256))
    for stream, words in (
        ([msgs[1]], "must start with the manifest"),
        ([msgs[0], msgs[2]], "chunk 1 arrived where chunk 0 was expected"),
        ([msgs[0], msgs[0]], "unexpected plain_manifest"),
        ([pb.CubeStreamMessage(sealed_header=envelope_pb2.SealedCubeHeader())], "sealed"),
    ):
        before = served.snapshot()
        err = _rpc_error(lambda s=stream: served.stub.PushCube(iter(s), timeout=10))
        assert words in err.details(), err.details()
        assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED)
        assert served.snapshot() == before


@pytest.mark.parametrize("how", ["cancel", "short"])
def test_a_stream_cut_mid_upload_stores_nothing(served: Served, how: str) -> None:
    cube = served.lora(f"cut_{how}", 1)
    msgs = list(cube_stream(cube, 256))
    before = served.snapshot()
    gate = threading.Event()

    def stream() -> Iterator[pb.CubeStreamMessage]:
        yield from msgs[:3]  # the manifest and two chunks of about ten
        if how == "cancel":
            gate.wait(30)

    call = served.stub.PushCube.future(stream(), timeout=30)
    if how == "cancel":
        # The node is writing: a temp file exists. Then the client goes away.
        assert _wait(lambda: any(served.node.store.tmp_dir.iterdir()))
        call.cancel()
        gate.set()
        assert call.cancelled()
    else:
        err = call.exception()
        assert err.code() == grpc.StatusCode.DATA_LOSS and "nothing was stored" in err.details()
    assert _wait(lambda: served.snapshot() == before), served.snapshot()
    with pytest.raises(NotFoundError):
        served.client.show(f"cut_{how}")


def test_a_budget_smaller_than_one_module_is_a_clear_error(tiny_dir: Path, tmp_path: Path) -> None:
    small = Served(Node.open(tiny_dir, tmp_path / "store", device_budget_bytes=1024))
    try:
        ref = small.client.put_cube(small.lora("big", 1)).ref
        with pytest.raises(CapacityError, match="whole device budget") as info:
            small.client.load("big")
        assert "raise the node's device memory budget" in str(info.value)
        err = _rpc_error(
            lambda: small.stub.Generate(
                pb.GenerateRequest(rows=[pb.GenerateRow(prompt="x", modules=[pb.CubeRef(cube_id="big")])]),
                timeout=10,
            )
        )
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert small.client.generate([Row("still serving", max_new_tokens=2)])[0].new_tokens >= 0
        assert small.client.health().resident_modules == 0 and ref not in small.node.runtime.resident
    finally:
        small.close()


# -- deadlines and cancellation ---------------------------------------------------------------------------


def test_deadlines_are_honoured_and_cancelled_work_is_freed(served: Served) -> None:
    c, stats = served.client, served.batcher.stats
    long_rows = [Row(f"a long answer {i}", max_new_tokens=256) for i in range(16)]
    # 1. The deadline passes while the batch runs: the caller gets DEADLINE_EXCEEDED, and the node stops
    #    the batch at its next forward pass instead of finishing 16 x 256 tokens for nobody.
    aborted = stats.aborted_batches
    served.batcher._step_s = None  # no estimate yet: the call is not refused up front
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        c.generate(long_rows, timeout=0.2)
    assert _wait(lambda: stats.aborted_batches > aborted)
    assert time.monotonic() - started < 5
    # 2. A call cancelled while queued never runs.
    dropped = stats.dropped_rows
    gate = threading.Event()
    blocker = served.bg.server._model_executor.submit(gate.wait, 30)  # keep the model thread busy
    call = served.stub.Generate.future(
        pb.GenerateRequest(rows=[pb.GenerateRow(prompt="q", max_new_tokens=8)])
    )
    time.sleep(0.3)  # the call reaches the node and waits behind the busy model thread
    assert not call.done()
    call.cancel()
    gate.set()
    blocker.result()
    assert _wait(lambda: stats.dropped_rows > dropped)
    # 3. A deadline the node can tell is too short is refused before any work, saying why.
    served.batcher._step_s = 0.5  # pretend each token takes 0.5 s here
    try:
        request = pb.GenerateRequest(rows=[pb.GenerateRow(prompt="q", max_new_tokens=100)])
        err = _rpc_error(lambda: served.stub.Generate(request, timeout=5))
    finally:
        served.batcher._step_s = None
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "nothing was run" in err.details()
    assert c.generate([Row("after all that", max_new_tokens=2)])[0].new_tokens >= 0  # still serving


def test_tls_with_client_certificates(tiny_dir: Path, tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from memfed.errors import UnavailableError
    from memfed.node.service import tls_credentials

    def cert(name: str, issuer_key=None, issuer=None, ca=False):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer or subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
            )
        c = builder.sign(issuer_key or key, hashes.SHA256())
        pem_key = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return key, c, c.public_bytes(serialization.Encoding.PEM), pem_key

    ca_key, ca_cert, ca_pem, _ = cert("memfed test CA", ca=True)
    _, _, server_pem, server_key = cert("localhost", ca_key, ca_cert.subject)
    _, _, client_pem, client_key = cert("client", ca_key, ca_cert.subject)
    for name, data in (("ca.pem", ca_pem), ("s.pem", server_pem), ("s.key", server_key)):
        (tmp_path / name).write_bytes(data)
    creds = tls_credentials(tmp_path / "s.pem", tmp_path / "s.key", tmp_path / "ca.pem")
    node = Node.open(tiny_dir, tmp_path / "store")
    with pytest.raises(InvalidArgumentError, match="--insecure"):
        NodeServer(node)  # neither TLS nor an explicit plaintext port
    bg = BackgroundServer(NodeServer(node, host="localhost", credentials=creds))
    bg.start()
    try:
        good = grpc.ssl_channel_credentials(ca_pem, private_key=client_key, certificate_chain=client_pem)
        with NodeClient(bg.address, credentials=good, timeout=10) as client:
            assert client.health().node_id == node.node_id
        anonymous_creds = grpc.ssl_channel_credentials(ca_pem)  # no client certificate: the handshake fails
        with (
            NodeClient(bg.address, credentials=anonymous_creds, timeout=5) as anon,
            pytest.raises(UnavailableError),
        ):
            anon.health()
        with NodeClient(bg.address, timeout=5) as plaintext, pytest.raises(UnavailableError):
            plaintext.health()
    finally:
        bg.stop()
        node.close()


# -- batching: many concurrent callers, each row as if it ran alone -----------------------------------------


def test_64_concurrent_generate_calls_with_random_modules_match_their_solo_runs(
    default_model_dir: Path, tmp_path: Path
) -> None:
    s = Served(Node.open(default_model_dir, tmp_path / "store"), batch_wait_ms=20)
    try:
        modules = [s.client.put_cube(s.lora(f"mod{i}", 10 + i, scale=0.15)).ref for i in range(4)]
        prompts = ["The capital of", "Alice lives in", "Question: who", "My favourite"]
        rng = random.Random(1234)
        rows = [
            Row(
                rng.choice(prompts),
                modules=(m,) if (m := rng.choice([*modules, None])) else (),
                max_new_tokens=6,
            )
            for _ in range(64)
        ]
        for m in modules:
            s.client.load(m)  # all four fit: the batch needs them resident together
        start = threading.Barrier(64)

        def call(row: Row):
            start.wait()
            return s.client.generate([row])[0]

        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(call, rows))
        solo = {}
        for row in dict.fromkeys(rows):
            solo[row] = s.client.generate([row])[0]
            assert solo[row].batch_rows == 1
        for row, got in zip(rows, results, strict=True):
            want = solo[row]
            assert (got.text, got.memory_used) == (want.text, want.memory_used), (row, got, want)
        sizes = [r.batch_rows for r in results]
        assert max(sizes) > 1, sizes  # they really ran batched
        assert len({solo[r].text for r in solo if r.prompt == prompts[0]}) > 1  # modules change outputs
    finally:
        s.close()
