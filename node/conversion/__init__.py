"""Memory conversion (MemOS section 3): plaintext ↔ parameters, measured at every step.

- ``internalize``: documents → augmented training items → PEFT LoRA → recall gate on held-out
  questions → cube registered, source text archived and linked (``internalize.py``).
- ``proposals`` / ``AutoInternalizer``: hot, stable plaintext proposed (or internalized) automatically
  (``triggers.py``).
- ``externalize``: the MemDumper; probe what a module changes and write it down for review
  (``externalize.py``).
- ``migrate``: a module to another architecture, through text (``migrate.py``).
- ``find_conflicts`` / ``record_conflicts``: new text against active modules (``governance.py``).

Documents, augmentation, training, probing and replay live in their own modules below these.
"""

from memfed.node.conversion.documents import (
    DocFact,
    Document,
    parse_document,
    read_document,
    shipped_documents,
)
from memfed.node.conversion.externalize import Claim, ExternalizeReport, externalize, recovery
from memfed.node.conversion.governance import Conflict, find_conflicts, list_conflicts, record_conflicts
from memfed.node.conversion.internalize import InternalizeReport, InternalizeSettings, internalize
from memfed.node.conversion.migrate import MigrationReport, migrate
from memfed.node.conversion.train import LoraTrainConfig
from memfed.node.conversion.triggers import AutoInternalizer, AutoInternalizeSettings, Proposal, proposals

__all__ = [
    "AutoInternalizeSettings",
    "AutoInternalizer",
    "Claim",
    "Conflict",
    "DocFact",
    "Document",
    "ExternalizeReport",
    "InternalizeReport",
    "InternalizeSettings",
    "LoraTrainConfig",
    "MigrationReport",
    "Proposal",
    "externalize",
    "find_conflicts",
    "internalize",
    "list_conflicts",
    "migrate",
    "parse_document",
    "proposals",
    "read_document",
    "record_conflicts",
    "recovery",
    "shipped_documents",
]
