"""The MemCube: manifest (defined in proto/) + safetensors payload, and the base-model fingerprint."""

from memfed.cube.core import MemCube
from memfed.cube.digest import payload_digest, verify_digest
from memfed.cube.manifest import (
    CubeManifest,
    manifest_from_bytes,
    manifest_to_bytes,
    new_manifest,
    parse_ref,
    ref_string,
    validate_manifest,
)

__all__ = [
    "CubeManifest",
    "MemCube",
    "manifest_from_bytes",
    "manifest_to_bytes",
    "new_manifest",
    "parse_ref",
    "payload_digest",
    "ref_string",
    "validate_manifest",
    "verify_digest",
]
