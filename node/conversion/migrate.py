"""Cross-model migration through text: a module made for model A reaches model B of another architecture.

Weights do not transfer between architectures (a cube is bound to its base model's fingerprint and is
refused anywhere else), but what a module *knows* does: externalize it on A (probe what it changes and
write it down), then internalize that text on B. The text in between is the externalized document,
kept ``pending_review`` in the vault when one is given, and linked from the new cube's origin together
with the source cube, so B's module says where its knowledge came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memfed.errors import InvalidArgumentError
from memfed.node.conversion.documents import parse_document
from memfed.node.conversion.externalize import ExternalizeReport, externalize
from memfed.node.conversion.internalize import InternalizeReport, InternalizeSettings, internalize

if TYPE_CHECKING:
    import torch

    from memfed.cube.core import MemCube
    from memfed.node.plaintext import PlaintextMemory
    from memfed.node.store import CubeStore


@dataclass
class MigrationReport:
    source_ref: str
    externalized: ExternalizeReport
    internalized: InternalizeReport

    @property
    def recall_on_target(self) -> float:
        """Held-out recall on model B: the figure the gate checked."""
        return self.internalized.recall_heldout

    def to_dict(self) -> dict[str, Any]:
        return {
            "source_ref": self.source_ref,
            "target_ref": self.internalized.ref,
            "facts_carried": len(self.externalized.claims),
            "recall_on_target_heldout": self.internalized.recall_heldout,
            "recall_on_target_trained": self.internalized.recall_trained,
            "externalized": self.externalized.to_dict(),
            "internalized": self.internalized.to_dict(),
        }


def migrate(
    source_model: torch.nn.Module,
    source_tokenizer: Any,
    cube: MemCube,
    target_model: torch.nn.Module,
    target_tokenizer: Any,
    *,
    cube_id: str | None = None,
    version: str | None = None,
    store: CubeStore | None = None,
    vault: PlaintextMemory | None = None,
    settings: InternalizeSettings | None = None,
    target_name: str | None = None,
) -> tuple[MigrationReport, MemCube]:
    """Externalize ``cube`` on the source model, internalize the text on the target model.

    The new cube is ``<cube_id>.<target model type>`` at the source's version unless named; it is
    validated on the target (``settings.min_recall``) like any internalized module.
    """
    m = cube.manifest
    out = externalize(source_model, source_tokenizer, cube, vault=vault)
    if not out.claims:
        raise InvalidArgumentError(
            f"module {out.cube_ref} changes no answer the probes could find: there is nothing to migrate"
        )
    doc_id = out.doc_id or f"externalized/{out.cube_ref}"
    document = parse_document(out.text, doc_id=doc_id, title=f"What module {out.cube_ref} answers")
    model_type = getattr(getattr(target_model, "config", None), "model_type", "") or "target"
    report, new_cube = internalize(
        target_model,
        target_tokenizer,
        [document],
        cube_id=cube_id or f"{m.cube_id}.{model_type}",
        version=version or m.version,
        store=store,
        vault=None,  # the text stays pending_review for a person; the origin links it
        settings=settings,
        model_name=target_name,
        extra_sources=[f"cube:{out.cube_ref}#{m.digest}"],
    )
    return MigrationReport(out.cube_ref, out, report), new_cube
