"""MIP v1 wire stability: the committed generated code matches proto/, and field numbers never move."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memfed.mip.v1 import cube_pb2, envelope_pb2, node_service_pb2, registry_service_pb2

SNAPSHOT = Path(__file__).parent / "data" / "mip_v1_field_numbers.json"
MODULES = (cube_pb2, envelope_pb2, node_service_pb2, registry_service_pb2)


def current_field_numbers() -> dict[str, dict[str, int]]:
    """message or enum full name -> {field or value name: number} for every MIP v1 type."""
    out: dict[str, dict[str, int]] = {}

    def visit(desc) -> None:
        out[desc.full_name] = {f.name: f.number for f in desc.fields}
        for nested in desc.nested_types:
            visit(nested)
        for enum in desc.enum_types:
            out[enum.full_name] = {v.name: v.number for v in enum.values}

    for module in MODULES:
        for desc in module.DESCRIPTOR.message_types_by_name.values():
            visit(desc)
        for enum in module.DESCRIPTOR.enum_types_by_name.values():
            out[enum.full_name] = {v.name: v.number for v in enum.values}
    return out


def test_generated_code_matches_proto_files() -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) regenerates the code")
    from memfed.mip.codegen import drift

    assert drift() == [], "generated MIP code is stale: run `make proto` and commit the result"


def test_field_numbers_are_stable() -> None:
    """A field or enum value may be added, never renumbered or removed (reserve it instead)."""
    snapshot = json.loads(SNAPSHOT.read_text())
    current = current_field_numbers()
    for type_name, fields in snapshot.items():
        assert type_name in current, f"{type_name} was removed from MIP v1"
        for name, number in fields.items():
            assert current[type_name].get(name) == number, f"{type_name}.{name} changed its number"


def test_version_lives_in_the_package_name() -> None:
    for module in MODULES:
        assert module.DESCRIPTOR.package == "memfed.mip.v1"


def test_services_stream_payloads_in_chunks() -> None:
    node = node_service_pb2.DESCRIPTOR.services_by_name["NodeService"]
    fetch = node.methods_by_name["FetchCube"]
    push = node.methods_by_name["PushCube"]
    assert fetch.server_streaming and push.client_streaming
    assert fetch.output_type.full_name == "memfed.mip.v1.CubeStreamMessage"
    registry = registry_service_pb2.DESCRIPTOR.services_by_name["RegistryService"]
    assert {"RegisterNode", "PublishVersion", "LookupVersions", "IssueToken", "ReadAudit"} <= set(
        registry.methods_by_name
    )


if __name__ == "__main__":  # refresh the snapshot after adding (never renumbering) fields
    SNAPSHOT.write_text(json.dumps(current_field_numbers(), indent=1, sort_keys=True) + "\n")
