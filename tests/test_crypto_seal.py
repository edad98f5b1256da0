"""Sealed cubes (.mcube): round trips, and every kind of bad input refused with a typed error and the
store left unchanged. Real keys, real files, a real store; no mocks."""

from __future__ import annotations

import hashlib
import io
import pickle
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memfed.crypto.envelope import MAGIC, MAX_HEADER_BYTES, PREFIX_BYTES, SealedCubeHeader, encode_header
from memfed.crypto.identity import Identity, init_identity
from memfed.crypto.seal import open_file, open_into_store, seal_file, seal_to
from memfed.crypto.signing import MAX_MANIFEST_BYTES, TrustedKeys
from memfed.crypto.stream import TAG_BYTES
from memfed.cube import new_manifest, payload_digest
from memfed.errors import (
    AuthenticationError,
    IncompatibleModelError,
    IntegrityError,
    InvalidArgumentError,
    MemfedError,
    PermissionDeniedError,
    UnsupportedError,
)
from memfed.mip.v1 import cube_pb2
from memfed.node.store import CubeStore

CHUNK = 1024  # small chunks: several per payload, so chunk-level attacks have something to work on
TYPED = (IntegrityError, AuthenticationError, PermissionDeniedError, InvalidArgumentError)


def fingerprint(tag: str) -> cube_pb2.BaseModelFingerprint:
    """A base-model fingerprint (as fingerprint_model writes them) for a model named ``tag``."""
    fp = cube_pb2.BaseModelFingerprint(
        architecture="LlamaForCausalLM",
        model_type="llama",
        name=tag,
        config_digest=hashlib.sha256(b"config" + tag.encode()).digest(),
        shapes_digest=hashlib.sha256(b"shapes" + tag.encode()).digest(),
        sample_seed=7,
        num_parameters=1000,
        fingerprint_id=tag,
    )
    fp.weight_sample.extend([0.5, -0.25])
    return fp


HOST = fingerprint("host")


def safetensors_bytes(size: int, seed: int) -> bytes:
    """A valid safetensors file of about ``size`` bytes (one U8 tensor), without torch."""
    header = b'{"w":{"dtype":"U8","shape":[%d],"data_offsets":[0,%d]}}' % (size, size)
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + random.Random(seed).randbytes(size)


def weights_cube(
    *,
    size: int = 5000,
    seed: int = 0,
    base: cube_pb2.BaseModelFingerprint = HOST,
    payload: bytes | None = None,
) -> tuple[cube_pb2.CubeManifest, bytes]:
    """A parametric (steering-vector) cube: its payload is weights, so base model and format are checked."""
    data = payload if payload is not None else safetensors_bytes(size, seed)
    m = new_manifest(
        cube_id="legal",
        version="1.0.0",
        kind="steering",
        digest=payload_digest(data),
        size_bytes=len(data),
        base_model=base,
    )
    return m, data


@dataclass
class World:
    alice: Identity  # producer
    bob: Identity  # recipient (classic X25519)
    carol: Identity  # another node (hybrid post-quantum)
    mallory: Identity  # untrusted signer
    tmp: Path

    def trusted(self) -> TrustedKeys:
        return TrustedKeys([self.alice.public])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    tmp = tmp_path_factory.mktemp("ids")
    return World(
        init_identity(tmp / "alice"),
        init_identity(tmp / "bob"),
        init_identity(tmp / "carol", post_quantum=True),
        init_identity(tmp / "mallory"),
        tmp,
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CubeStore]:
    with CubeStore(tmp_path / "store") as s:
        yield s


def seal_bytes(world: World, manifest, payload: bytes, *, signer=None, recipients=None) -> bytes:  # type: ignore[no-untyped-def]
    out = io.BytesIO()
    seal_to(
        out,
        manifest,
        io.BytesIO(payload),
        signer or world.alice,
        recipients or [world.bob.public],
        chunk_size=CHUNK,
    )
    return out.getvalue()


def snapshot(store: CubeStore) -> tuple[list[str], list[str]]:
    files = sorted(str(p.relative_to(store.root)) for p in (store.root / "objects").rglob("*") if p.is_file())
    return files, [f"{m.cube_id}@{m.version}" for m in store.list()]


def open_bytes(world: World, store: CubeStore, data: bytes, *, who: Identity | None = None, host=HOST):  # type: ignore[no-untyped-def]
    return open_into_store(io.BytesIO(data), store, who or world.bob, world.trusted(), host_fingerprint=host)


def refused(
    world: World, store: CubeStore, data: bytes, error: type[MemfedError] | tuple, **kw
) -> MemfedError:  # type: ignore[type-arg]
    """Open ``data``, expect ``error``, and check that the store did not change."""
    before = snapshot(store)
    with pytest.raises(error) as info:
        open_bytes(world, store, data, **kw)
    assert snapshot(store) == before
    assert not list((store.root / "tmp").iterdir()), "a temp file was left behind"
    return info.value


def chunk_offsets(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each ciphertext chunk in a sealed file."""
    (n,) = struct.unpack("<I", data[len(MAGIC) : PREFIX_BYTES])
    header = SealedCubeHeader()
    header.ParseFromString(data[PREFIX_BYTES : PREFIX_BYTES + n])
    pos, out, left = PREFIX_BYTES + n, [], header.encryption.plaintext_size
    for _ in range(header.encryption.chunk_count):
        size = min(left, header.encryption.chunk_size) + TAG_BYTES
        out.append((pos, pos + size))
        pos += size
        left -= size - TAG_BYTES
    assert pos == len(data)
    return out


# -- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["bob", "carol"])
def test_round_trip_both_suites(world: World, store: CubeStore, who: str) -> None:
    m, payload = weights_cube(size=10_000)
    recipient = getattr(world, who)
    data = seal_bytes(world, m, payload, recipients=[world.bob.public, world.carol.public])
    got = open_bytes(world, store, data, who=recipient)
    assert got.digest == m.digest
    assert store.get("legal").payload == payload


def test_exact_chunk_multiple_and_empty_payloads(world: World, tmp_path: Path) -> None:
    for i, size in enumerate([CHUNK * 3 - 8 - 62, 0]):  # 3 full chunks; then an empty plaintext cube
        data = random.Random(i).randbytes(size)
        m = new_manifest(
            cube_id=f"t{i}", version="1.0.0", kind="plaintext", digest=payload_digest(data), size_bytes=size
        )
        with CubeStore(tmp_path / f"s{i}") as s:
            open_bytes(world, s, seal_bytes(world, m, data))
            assert s.get(f"t{i}").payload == data


def test_file_round_trip_is_atomic_and_streams(world: World, store: CubeStore, tmp_path: Path) -> None:
    m, payload = weights_cube(size=3 * (1 << 20) + 17)  # default 1 MiB chunks: 4 chunks
    out = tmp_path / "x.mcube"
    seal_file(out, m, io.BytesIO(payload), world.alice, [world.bob.public])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    open_file(out, store, world.bob, world.trusted(), host_fingerprint=HOST)
    assert store.get("legal").payload == payload


def test_key_rotation_old_key_still_verifies(world: World, store: CubeStore, tmp_path: Path) -> None:
    """A manifest names its signing key; an importer trusting the old and new keys accepts both."""
    old = world.alice
    new = init_identity(tmp_path / "alice2")
    m, payload = weights_cube()
    signed_old = seal_bytes(world, m, payload, signer=old)
    trusted = TrustedKeys([new.public, old.public])
    open_into_store(io.BytesIO(signed_old), store, world.bob, trusted, host_fingerprint=HOST)
    assert len(trusted) == 2


# -- bad input ----------------------------------------------------------------------------------


@pytest.fixture
def sealed(world: World) -> bytes:
    m, payload = weights_cube(size=5000)
    return seal_bytes(world, m, payload)


def test_flipped_bit_anywhere_in_header(world: World, store: CubeStore, sealed: bytes) -> None:
    header_end = chunk_offsets(sealed)[0][0]
    for pos in range(0, header_end, 3):
        bad = bytearray(sealed)
        bad[pos] ^= 1 << (pos % 8)
        refused(world, store, bytes(bad), TYPED)


def test_flipped_header_field_outside_signature_fails_chunk_auth(world: World, store: CubeStore) -> None:
    """sender_id is not signed, but the chunks' associated data binds the whole header."""
    m, payload = weights_cube()
    data = seal_bytes(world, m, payload)
    (n,) = struct.unpack("<I", data[8:12])
    h = SealedCubeHeader()
    h.ParseFromString(data[12 : 12 + n])
    h.sender_id = "f" * len(h.sender_id)
    bad = encode_header(h) + data[12 + n :]
    err = refused(world, store, bad, IntegrityError)
    assert "chunk 0" in str(err)


@pytest.mark.parametrize("which", ["first", "middle", "last", "tag"])
def test_flipped_bit_in_a_chunk(world: World, store: CubeStore, sealed: bytes, which: str) -> None:
    chunks = chunk_offsets(sealed)
    start, end = {"first": chunks[0], "middle": chunks[2], "last": chunks[-1], "tag": chunks[1]}[which]
    pos = end - 3 if which == "tag" else (start + end) // 2
    bad = bytearray(sealed)
    bad[pos] ^= 0x10
    err = refused(world, store, bytes(bad), IntegrityError)
    assert "authentication" in str(err)


def test_flipped_bit_in_signature(world: World, store: CubeStore) -> None:
    m, payload = weights_cube()
    data = seal_bytes(world, m, payload)
    (n,) = struct.unpack("<I", data[8:12])
    h = SealedCubeHeader()
    h.ParseFromString(data[12 : 12 + n])
    sig = bytearray(h.signed_manifest.signature)
    sig[5] ^= 0x01
    h.signed_manifest.signature = bytes(sig)
    err = refused(world, store, encode_header(h) + data[12 + n :], IntegrityError)
    assert "signature" in str(err)


def test_truncated_file(world: World, store: CubeStore, sealed: bytes) -> None:
    chunks = chunk_offsets(sealed)
    cuts = [3, 10, PREFIX_BYTES + 5, chunks[0][0], chunks[2][0], chunks[-1][0], len(sealed) - 1]
    for cut in cuts:
        err = refused(world, store, sealed[:cut], (IntegrityError, InvalidArgumentError))
        assert "truncated" in str(err) or "magic" in str(err), str(err)


def test_chunks_reordered_or_duplicated(world: World, store: CubeStore, sealed: bytes) -> None:
    c = chunk_offsets(sealed)
    parts = [sealed[s:e] for s, e in c]
    head = sealed[: c[0][0]]
    swapped = head + parts[0] + parts[2] + parts[1] + b"".join(parts[3:])
    refused(world, store, swapped, IntegrityError)
    duplicated = head + parts[0] + parts[0] + b"".join(parts[2:])
    refused(world, store, duplicated, IntegrityError)
    # Dropping the last chunk and marking nothing as last: the new "last" was not sealed as last.
    dropped = head + b"".join(parts[:-1])
    refused(world, store, dropped, IntegrityError)


def test_chunk_spliced_from_another_export(world: World, store: CubeStore) -> None:
    m, payload = weights_cube(size=5000)
    one, two = seal_bytes(world, m, payload), seal_bytes(world, m, payload)  # same cube, two exports
    c1, c2 = chunk_offsets(one), chunk_offsets(two)
    spliced = one[: c1[1][0]] + two[c2[1][0] : c2[1][1]] + one[c1[1][1] :]
    assert len(spliced) == len(one)
    refused(world, store, spliced, IntegrityError)
    # Trailing bytes after the last chunk are refused too.
    refused(world, store, one + two[-TAG_BYTES:], IntegrityError)


def test_sealed_for_another_recipient(world: World, store: CubeStore, sealed: bytes) -> None:
    err = refused(world, store, sealed, PermissionDeniedError, who=world.carol)
    assert world.carol.public.fingerprint in str(err)


def test_signed_by_untrusted_key(world: World, store: CubeStore) -> None:
    m, payload = weights_cube()
    data = seal_bytes(world, m, payload, signer=world.mallory)
    err = refused(world, store, data, AuthenticationError)
    assert world.mallory.key_id in str(err)


def test_digest_mismatch(world: World, store: CubeStore) -> None:
    """A trusted producer that signed one payload but sealed another (same size)."""
    m, _ = weights_cube(seed=1)
    _, other = weights_cube(seed=2)
    err = refused(world, store, seal_bytes(world, m, other), IntegrityError)
    assert "digest" in str(err)


def test_cube_for_another_base_model(world: World, store: CubeStore) -> None:
    m, payload = weights_cube(base=fingerprint("other-model"))
    err = refused(world, store, seal_bytes(world, m, payload), IncompatibleModelError)
    assert "other-model" in str(err)


def test_digest_is_checked_before_base_model(world: World, store: CubeStore) -> None:
    m, _ = weights_cube(seed=1, base=fingerprint("other-model"))
    _, other = weights_cube(seed=2)
    refused(world, store, seal_bytes(world, m, other), IntegrityError)


def test_manifest_over_size_limit(world: World, store: CubeStore) -> None:
    m, payload = weights_cube()
    with pytest.raises(InvalidArgumentError):  # the producer refuses to sign it ...
        big = cube_pb2.CubeManifest()
        big.CopyFrom(m)
        big.annotations["blob"] = "x" * MAX_MANIFEST_BYTES
        seal_bytes(world, big, payload)
    data = seal_bytes(world, m, payload)  # ... and a reader refuses one that claims it
    (n,) = struct.unpack("<I", data[8:12])
    h = SealedCubeHeader()
    h.ParseFromString(data[12 : 12 + n])
    h.signed_manifest.manifest = h.signed_manifest.manifest + b"\x00" * MAX_MANIFEST_BYTES
    err = refused(world, store, encode_header(h) + data[12 + n :], InvalidArgumentError)
    assert "limit" in str(err)


def test_header_over_size_limit(world: World, store: CubeStore, sealed: bytes) -> None:
    bad = MAGIC + struct.pack("<I", MAX_HEADER_BYTES + 1) + sealed[PREFIX_BYTES:]
    err = refused(world, store, bad, InvalidArgumentError)
    assert "limit" in str(err)


def test_pickle_payload_refused(world: World, store: CubeStore) -> None:
    blob = pickle.dumps({"lora_A": [0.0] * 500})  # made, never loaded
    m, payload = weights_cube(payload=blob)
    err = refused(world, store, seal_bytes(world, m, payload), UnsupportedError)
    assert "pickle" in str(err)


def test_not_an_mcube(world: World, store: CubeStore) -> None:
    refused(world, store, b"PK\x03\x04 this is a zip file", InvalidArgumentError)
    refused(world, store, b"", InvalidArgumentError)


# -- fuzz ---------------------------------------------------------------------------------------

_FUZZ: dict[str, object] = {}


def _fuzz_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[World, CubeStore, bytes]:
    if not _FUZZ:
        tmp = tmp_path_factory.mktemp("fuzz")
        w = World(*(init_identity(tmp / n) for n in ("a", "b", "c", "m")), tmp)  # type: ignore[arg-type]
        m, payload = weights_cube(size=3000)
        _FUZZ.update(world=w, store=CubeStore(tmp / "store"), sealed=seal_bytes(w, m, payload))
    return _FUZZ["world"], _FUZZ["store"], _FUZZ["sealed"]  # type: ignore[return-value]


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[World, CubeStore, bytes]]:
    env = _fuzz_setup(tmp_path_factory)
    yield env
    env[1].close()


def _open_fuzzed(env: tuple[World, CubeStore, bytes], data: bytes) -> None:
    world, store, sealed = env
    before = snapshot(store)
    try:
        open_bytes(world, store, data)
    except MemfedError:
        assert snapshot(store) == before
        return
    # Success is only possible for bytes that authenticate as the original.
    assert data == sealed


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=4096))
def test_fuzz_arbitrary_bytes(fuzz_env, data: bytes) -> None:  # type: ignore[no-untyped-def]
    _open_fuzzed(fuzz_env, data)
    _open_fuzzed(fuzz_env, MAGIC + data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.lists(
        st.tuples(
            st.floats(0, 1, exclude_max=True), st.integers(0, 255), st.sampled_from(["set", "del", "ins"])
        ),
        min_size=1,
        max_size=4,
    ),
    cut=st.one_of(st.none(), st.floats(0, 1)),
)
def test_fuzz_mutated_mcube(fuzz_env, edits, cut) -> None:  # type: ignore[no-untyped-def]
    data = bytearray(fuzz_env[2])
    for where, value, op in edits:
        pos = int(where * len(data)) if data else 0
        if op == "set" and data:
            data[pos] = value
        elif op == "del" and data:
            del data[pos]
        else:
            data.insert(pos, value)
    if cut is not None:
        data = data[: int(cut * len(data))]
    _open_fuzzed(fuzz_env, bytes(data))
