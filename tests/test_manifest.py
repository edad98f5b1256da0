"""The cube manifest: build, validate, serialize, parse."""

from __future__ import annotations

import pytest

from memfed.cube import manifest_from_bytes, manifest_to_bytes, new_manifest, payload_digest
from memfed.cube.manifest import manifest_to_dict, parse_ref, semver_key, validate_manifest
from memfed.errors import InvalidManifestError
from memfed.mip.v1 import cube_pb2


def _fingerprint() -> cube_pb2.BaseModelFingerprint:
    return cube_pb2.BaseModelFingerprint(
        architecture="LlamaForCausalLM", config_digest=b"\x01" * 32, shapes_digest=b"\x02" * 32
    )


def _lora_manifest(**overrides):
    payload = b"payload bytes"
    spec = cube_pb2.LoraSpec(rank=16, alpha=32, target_modules=["q_proj", "v_proj", "o_proj"])
    args = dict(
        cube_id="param_legal_expert",
        version="2.3.0",
        kind="lora",
        digest=payload_digest(payload),
        size_bytes=len(payload),
        base_model=_fingerprint(),
        payload=cube_pb2.PayloadDescription(lora=spec),
        origin=cube_pb2.Origin(method="fine-tune", description="Fine-tuned on CaseLaw-10K"),
        owner="node:alpha",
        version_chain=[payload_digest(b"v2.0"), payload_digest(b"v2.1")],
        tags=["legal"],
        ttl_seconds=180 * 86400,
        priority="high",
        grants=[cube_pb2.Grant(principal="group:legal_team", actions=["read", "use"])],
    )
    args.update(overrides)
    return new_manifest(**args)


def test_every_architecture_field_round_trips() -> None:
    m = _lora_manifest()
    back = manifest_from_bytes(manifest_to_bytes(m))
    assert back == m
    d = manifest_to_dict(back)
    for field in (
        "cube_id", "version", "digest", "version_chain", "created_at", "origin", "owner",
        "access_control", "ttl_seconds", "priority", "tags", "kind", "base_model", "payload", "lifecycle",
    ):  # fmt: skip
        assert field in d, field
    assert d["kind"] == "CUBE_KIND_LORA"
    assert d["lifecycle"] == "LIFECYCLE_STATE_GENERATED"
    assert d["access_control"]["grants"][0]["principal"] == "group:legal_team"


def test_serialization_is_deterministic() -> None:
    m = _lora_manifest()
    m.annotations.update({"b": "2", "a": "1"})
    assert manifest_to_bytes(m) == manifest_to_bytes(manifest_from_bytes(manifest_to_bytes(m)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"cube_id": "bad id!"}, "cube id"),
        ({"version": "2.3"}, "semantic version"),
        ({"digest": "md5:abc"}, "malformed digest"),
        ({"base_model": None}, "does not name its base model"),
        ({"payload": cube_pb2.PayloadDescription()}, "no LoRA spec"),
        ({"grants": [cube_pb2.Grant(principal="user:x", actions=["delete"])]}, "malformed"),
    ],
)
def test_invalid_manifests_are_refused_with_the_field_named(overrides: dict, message: str) -> None:
    with pytest.raises(InvalidManifestError, match=message):
        _lora_manifest(**overrides)


def test_own_digest_in_version_chain_is_refused() -> None:
    m = _lora_manifest()
    m.version_chain.append(m.digest)
    with pytest.raises(InvalidManifestError, match="own digest"):
        validate_manifest(m)


def test_garbage_bytes_do_not_parse() -> None:
    with pytest.raises(InvalidManifestError):
        manifest_from_bytes(b"\xff\xff\xff\xff not a manifest")


def test_plaintext_cubes_need_no_base_model() -> None:
    m = new_manifest(
        cube_id="notes", version="0.1.0", kind="plaintext", digest=payload_digest(b"x"), size_bytes=1
    )
    assert manifest_from_bytes(manifest_to_bytes(m)).kind == cube_pb2.CUBE_KIND_PLAINTEXT


def test_refs_and_semver_order() -> None:
    assert parse_ref("legal@1.2.0") == ("legal", "1.2.0")
    assert parse_ref("legal") == ("legal", None)
    versions = ["1.10.0", "1.2.0", "1.2.0-rc.1", "0.9.9"]
    assert sorted(versions, key=semver_key) == ["0.9.9", "1.2.0-rc.1", "1.2.0", "1.10.0"]
    with pytest.raises(InvalidManifestError):
        parse_ref("legal@latest")
