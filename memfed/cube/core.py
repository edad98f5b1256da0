"""The MemCube: a manifest plus the exact payload bytes (safetensors) it describes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from memfed.cube.digest import verify_digest
from memfed.cube.manifest import CubeManifest, ref_string

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class MemCube:
    """One cube version. ``payload`` is the safetensors file content; its SHA-256 is ``manifest.digest``."""

    manifest: CubeManifest
    payload: bytes

    @property
    def ref(self) -> str:
        return ref_string(self.manifest)

    def verify(self) -> None:
        """Raise IntegrityError if the payload does not match the manifest's digest."""
        verify_digest(self.payload, self.manifest.digest, what=f"cube {self.ref} payload")

    def tensors(self) -> dict[str, torch.Tensor]:
        """Decode the payload (safetensors, never pickle) into CPU tensors."""
        from memfed.cube.payload import decode_tensors

        return decode_tensors(self.payload)
