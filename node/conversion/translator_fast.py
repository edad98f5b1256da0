"""``internalize --fast``: a module from the translator in milliseconds, gated exactly like a trained one.

The generated LoRA is validated with the trained path's gate: recall, through the node's module runtime,
on the same held-out phrasings (``heldout_probes``) against the same ``min_recall``. If it passes, it is
registered as an ``internalize`` cube (origin params say ``fast=translator`` and which translator); if
not, and fallback is allowed, the documents are internalized by training (``internalize``) and the
report carries both recalls and both times, so the user sees what the fast path would have given.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from memfed.cube.build import lora_cube
from memfed.errors import InvalidArgumentError
from memfed.mip.v1 import cube_pb2
from memfed.node.conversion.augment import trained_probes
from memfed.node.conversion.documents import Document
from memfed.node.conversion.internalize import (
    InternalizeReport,
    InternalizeSettings,
    RecallGateError,
    StageProgress,
    document_origin,
    host_fingerprint,
    internalize,
    plan,
    register,
)
from memfed.node.conversion.probing import generate, module_loaded, rate, recall
from memfed.node.conversion.replay import retention, world_prompts
from memfed.node.conversion.translator import document_facts, encode_facts, generate_factors
from memfed.node.conversion.translator_train import Translator
from memfed.node.runtime import ModuleRuntime

if TYPE_CHECKING:
    from memfed.cube.core import MemCube
    from memfed.node.plaintext import PlaintextMemory
    from memfed.node.store import CubeStore

FAST_PARAM = "fast"
TRANSLATOR_PARAM = "translator"


@dataclass
class FastAttempt:
    """What the translator's module measured: one forward pass's time and the gate's recall."""

    translator: str
    facts_written: int
    generate_ms: float  # documents → cube, including the base model's pass (the "milliseconds")
    validate_seconds: float
    recall_heldout: float
    recall_heldout_before: float
    passed: bool


@dataclass
class FastInternalizeReport:
    """``path`` is "fast" (the translator's cube was registered) or "trained" (the fallback's)."""

    path: str
    fast: FastAttempt
    result: dict[str, Any] = field(default_factory=dict)  # the registered cube's InternalizeReport
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "fast": asdict(self.fast), **self.result, "fast_reason": self.reason}


def translate(
    translator: Translator,
    tokenizer: Any,
    documents: Sequence[Document],
    fingerprint: cube_pb2.BaseModelFingerprint,
    *,
    cube_id: str,
    version: str = "1.0.0",
    origin: cube_pb2.Origin | None = None,
    owner: str = "",
) -> MemCube:
    """The documents' LoRA cube, from one batched pass of the base model and one of θ (no training)."""
    facts = document_facts(documents)
    enc = encode_facts(translator.layout, tokenizer, facts, translator.config)
    factors = generate_factors(
        translator.net, enc, translator.c_inv, translator.layout, translator.config.layers
    )
    return lora_cube(
        fingerprint,
        factors,
        cube_id=cube_id,
        version=version,
        origin=origin,
        owner=owner,
        tags=("internalized",),
    )


def fast_internalize(
    model: torch.nn.Module,
    tokenizer: Any,
    documents: Sequence[Document],
    translator: Translator,
    *,
    cube_id: str,
    version: str = "1.0.0",
    store: CubeStore | None = None,
    vault: PlaintextMemory | None = None,
    settings: InternalizeSettings | None = None,
    fallback: bool = True,
    owner: str = "",
    model_name: str | None = None,
    progress: StageProgress | None = None,
) -> tuple[FastInternalizeReport, MemCube]:
    """Internalize with the translator; below the gate, train instead (``fallback``) or raise.

    Raises ``RecallGateError`` when the translator's module fails the gate and ``fallback`` is False
    (its report then describes the fast attempt), or when the fallback's trained module fails too.
    """
    settings = settings or InternalizeSettings()
    t0 = time.perf_counter()
    facts, _, probes = plan(documents, cube_id=cube_id, version=version, store=store, settings=settings)
    if not document_facts(documents):
        raise InvalidArgumentError(
            "the documents state no fact the translator can write",
            hint="state facts as sentences in the model's relation vocabulary (see node/data/relations.json)",
        )
    rt = ModuleRuntime(model)
    try:
        fp = host_fingerprint(rt, model_name)
        translator_ref = translator.info.get("ref", "(unsaved)")
        origin = document_origin(
            documents,
            facts,
            vault,
            how=f"internalized (fast, translator {translator_ref})",
            params={FAST_PARAM: "translator", TRANSLATOR_PARAM: translator_ref},
        )
        t = time.perf_counter()
        cube = translate(
            translator, tokenizer, documents, fp, cube_id=cube_id, version=version, origin=origin, owner=owner
        )
        generate_ms = (time.perf_counter() - t) * 1e3
        if progress is not None:
            progress("validate", 0, 1)
        t = time.perf_counter()
        control = world_prompts(0, settings.control_prompts, exclude_subjects={f.subject for f in facts},
                                seed=settings.train.seed)[1]  # fmt: skip
        with module_loaded(model, cube, rt) as (_, ref):
            before = rate(recall(rt, tokenizer, probes))
            after = rate(recall(rt, tokenizer, probes, [ref]))
            on_trained = rate(recall(rt, tokenizer, trained_probes(facts), [ref]))
            kept = retention(generate(rt, tokenizer, control), generate(rt, tokenizer, control, [ref]))
        attempt = FastAttempt(
            translator=translator_ref,
            facts_written=len(document_facts(documents)),
            generate_ms=round(generate_ms, 2),
            validate_seconds=round(time.perf_counter() - t, 3),
            recall_heldout=after,
            recall_heldout_before=before,
            passed=after >= settings.min_recall,
        )
    finally:
        rt.close()
    if attempt.passed:
        report = InternalizeReport(
            cube_id=cube_id,
            version=version,
            registered=False,
            documents=[{"doc_id": d.doc_id, "title": d.title, "digest": d.digest} for d in documents],
            facts=len(facts),
            training_items=0,
            heldout_probes=len(probes),
            recall_heldout=after,
            recall_heldout_before=before,
            recall_trained=on_trained,
            retention=kept,
            min_recall=settings.min_recall,
            seconds={
                "generate": round(generate_ms / 1e3, 4),
                "validate": attempt.validate_seconds,
                "total": round(time.perf_counter() - t0, 3),
            },
            digest=cube.manifest.digest,
        )
        register(cube, report, store, vault, documents)
        return FastInternalizeReport("fast", attempt, report.to_dict()), cube
    reason = (
        f"the translator's module answered {after:.2f} of {len(probes)} held-out questions, below the gate "
        f"of {settings.min_recall:.2f}"
    )
    if not fallback:
        failed = InternalizeReport(
            cube_id=cube_id, version=version, registered=False, documents=[], facts=len(facts),
            training_items=0, heldout_probes=len(probes), recall_heldout=after, recall_heldout_before=before,
            recall_trained=on_trained, retention=kept, min_recall=settings.min_recall,
            seconds={"generate": round(generate_ms / 1e3, 4), "total": round(time.perf_counter() - t0, 3)},
            reason=reason + "; not registered",
        )  # fmt: skip
        raise RecallGateError(failed, hint="train it instead (drop --no-fallback)")
    try:
        report, trained_cube = internalize(
            model, tokenizer, documents, cube_id=cube_id, version=version, store=store, vault=vault,
            settings=settings, owner=owner, model_name=model_name, progress=progress,
        )  # fmt: skip
    except RecallGateError as exc:
        exc.report.reason = f"{reason}; training instead: {exc.report.reason}"
        raise
    return FastInternalizeReport(
        "trained", attempt, report.to_dict(), reason + "; trained instead"
    ), trained_cube
