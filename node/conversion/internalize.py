"""Internalize (plaintext → parameter): documents become a validated LoRA cube; the text is archived.

Steps, each measured: augment the documents (``augment``), train a PEFT LoRA on them with self-distilled
replay (``train``, ``replay``), build the cube, then **validate before registering**: recall on held-out
phrasings of every fact the documents state, asked through the node's module runtime. Below
``min_recall`` nothing is stored and ``QualityGateError`` (exit code 15) carries the report and the
reason. On success the cube goes to the store and each source document is put in the plaintext vault
(if it was not there) and archived; the cube's origin links every source by doc id, vault version and
text digest, and lists the (subject, relation) pairs it was taught, so externalization can probe for
exactly those later without ever reading the text.

Threshold: the embedded model answers 77% of held-out phrasings of the facts it was *built* with, and
some phrasings it never answers (0-7% for "What does X do for a living?" and "Who employs X?"), so
a module cannot be expected to beat that ceiling; the default gate, 0.5, fails a module that learned
strings rather than facts (those score 0-0.2) and passes one that learned the facts (0.6-0.75).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from memfed.cube.build import lora_cube
from memfed.cube.fingerprint import DEFAULT_SAMPLE_SEED
from memfed.cube.manifest import check_cube_id
from memfed.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError, QualityGateError
from memfed.mip.v1 import cube_pb2
from memfed.node.conversion.augment import all_facts, augment, heldout_probes, trained_probes
from memfed.node.conversion.documents import Document
from memfed.node.conversion.probing import generate, module_loaded, rate, recall
from memfed.node.conversion.replay import replay_items, retention, world_prompts
from memfed.node.conversion.train import LoraTrainConfig, train_lora
from memfed.node.runtime import ModuleRuntime

if TYPE_CHECKING:
    import torch

    from memfed.cube.core import MemCube
    from memfed.node.plaintext import PlaintextMemory
    from memfed.node.store import CubeStore

METHOD = "internalize"
PROBE_KEYS_PARAM = "probe_keys"
DEFAULT_MIN_RECALL = 0.5

# progress(stage, done, total): stage is "train" or "validate".
StageProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class InternalizeSettings:
    """Training and gate settings; the defaults are what the CLI and the bench use."""

    train: LoraTrainConfig = field(default_factory=LoraTrainConfig)
    min_recall: float = DEFAULT_MIN_RECALL
    replay_prompts: int = 256
    control_prompts: int = 64

    def check(self) -> None:
        self.train.check()
        if not 0.0 <= self.min_recall <= 1.0:
            raise InvalidArgumentError(f"min_recall must be in [0, 1], not {self.min_recall}")


@dataclass
class InternalizeReport:
    """What one internalization did and measured. ``registered`` is False only on a failed gate."""

    cube_id: str
    version: str
    registered: bool
    documents: list[dict[str, Any]]
    facts: int
    training_items: int
    heldout_probes: int
    recall_heldout: float  # the gate's figure: the module on held-out phrasings
    recall_heldout_before: float  # the bare model on the same probes (it should not know them)
    recall_trained: float  # the module on the trained phrasings
    retention: float  # control prompts whose answer the module left unchanged
    min_recall: float
    seconds: dict[str, float]
    reason: str = ""
    digest: str = ""

    @property
    def ref(self) -> str:
        return f"{self.cube_id}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {"ref": self.ref, **asdict(self)}


class RecallGateError(QualityGateError):
    """The module answered too few held-out questions; ``report`` holds what was measured and why."""

    def __init__(self, report: InternalizeReport, *, hint: str) -> None:
        super().__init__(f"cube {report.ref}: {report.reason}", hint=hint)
        self.report = report


def source_ref(doc: Document, vault_version: int | None = None) -> str:
    """How an origin names a source text: ``plaintext:<doc_id>[@v<version>]#sha256:<hex>``."""
    at = f"@v{vault_version}" if vault_version else ""
    return f"plaintext:{doc.doc_id}{at}#{doc.digest}"


def parse_source_ref(source: str) -> tuple[str, str] | None:
    """(doc_id, digest) of a ``plaintext:`` source reference; None for any other kind of source."""
    if not source.startswith("plaintext:") or "#" not in source:
        return None
    head, _, digest = source[len("plaintext:") :].rpartition("#")
    doc_id, _, version = head.rpartition("@v")
    if not doc_id or not version.isdigit():
        doc_id = head
    return doc_id, digest


def probe_keys(manifest_origin: cube_pb2.Origin) -> list[tuple[str, str]]:
    """The (subject, relation) pairs an internalized cube's origin says it was taught (may be empty)."""
    raw = manifest_origin.params.get(PROBE_KEYS_PARAM, "")
    if not raw:
        return []
    try:
        return [(str(s), str(r)) for s, r in json.loads(raw)]
    except (ValueError, TypeError):
        return []


def internalize(
    model: torch.nn.Module,
    tokenizer: Any,
    documents: Sequence[Document],
    *,
    cube_id: str,
    version: str = "1.0.0",
    store: CubeStore | None = None,
    vault: PlaintextMemory | None = None,
    settings: InternalizeSettings | None = None,
    runtime: ModuleRuntime | None = None,
    owner: str = "",
    model_name: str | None = None,
    extra_sources: Sequence[str] = (),
    progress: StageProgress | None = None,
) -> tuple[InternalizeReport, MemCube]:
    """Internalize ``documents`` into a LoRA cube for ``model``; see the module docstring.

    Raises ``RecallGateError`` (a ``QualityGateError``, with ``.report``) when held-out recall is below
    the gate: then nothing is stored and no document changes status. Without a store the validated cube
    is only returned.
    ``extra_sources`` are added to the origin's sources (e.g. the cube a migrated text came from).
    """
    settings = settings or InternalizeSettings()
    t0 = time.perf_counter()
    facts, items, probes = plan(documents, cube_id=cube_id, version=version, store=store, settings=settings)
    subjects = {f.subject for f in facts}
    replay_prompts, control_prompts = world_prompts(
        settings.replay_prompts, settings.control_prompts, exclude_subjects=subjects, seed=settings.train.seed
    )
    seconds: dict[str, float] = {"augment": time.perf_counter() - t0}
    rt = runtime or ModuleRuntime(model)
    try:
        t = time.perf_counter()
        replay = replay_items(rt, tokenizer, replay_prompts)
        control_before = generate(rt, tokenizer, control_prompts)
        seconds["replay"] = time.perf_counter() - t

        t = time.perf_counter()
        with rt.routed(modules=()):  # train on the bare model, even when the node has modules active
            trained = train_lora(
                model,
                tokenizer,
                items,
                settings.train,
                replay=replay,
                progress=None if progress is None else lambda d, n: progress("train", d, n),
            )
        seconds["train"] = time.perf_counter() - t

        origin = document_origin(
            documents,
            facts,
            vault,
            how="internalized",
            extra_sources=extra_sources,
            params={
                **settings.train.as_params(),
                "steps": str(trained.steps),
                "augmentation": "templates",
                "training_items": str(len(items)),
                "replay_items": str(len(replay)),
            },
        )
        cube = lora_cube(
            host_fingerprint(rt, model_name),
            trained.factors,
            cube_id=cube_id,
            version=version,
            alpha=trained.alpha,
            origin=origin,
            owner=owner,
            tags=("internalized",),
        )

        t = time.perf_counter()
        with module_loaded(model, cube, rt) as (_, ref):
            if progress is not None:
                progress("validate", 0, 1)
            before = recall(rt, tokenizer, probes)
            after = recall(rt, tokenizer, probes, [ref])
            on_trained = recall(rt, tokenizer, trained_probes(facts), [ref])
            control_after = generate(rt, tokenizer, control_prompts, [ref])
            if progress is not None:
                progress("validate", 1, 1)
        seconds["validate"] = time.perf_counter() - t
    finally:
        if runtime is None:
            rt.close()

    report = InternalizeReport(
        cube_id=cube_id,
        version=version,
        registered=False,
        documents=[{"doc_id": d.doc_id, "title": d.title, "digest": d.digest} for d in documents],
        facts=len(facts),
        training_items=len(items),
        heldout_probes=len(probes),
        recall_heldout=rate(after),
        recall_heldout_before=rate(before),
        recall_trained=rate(on_trained),
        retention=retention(control_before, control_after),
        min_recall=settings.min_recall,
        seconds={},
        digest=cube.manifest.digest,
    )
    if report.recall_heldout < settings.min_recall:
        report.reason = (
            f"recall on {len(probes)} held-out questions about the documents is {report.recall_heldout:.2f}, "
            f"below the gate of {settings.min_recall:.2f}; the module was not registered"
        )
        report.seconds = _rounded(seconds, t0)
        raise RecallGateError(
            report, hint="train longer (--steps), raise --rank, or state the facts more plainly"
        )
    register(cube, report, store, vault, documents)
    report.seconds = _rounded(seconds, t0)
    return report, cube


def plan(
    documents: Sequence[Document],
    *,
    cube_id: str,
    version: str,
    store: CubeStore | None,
    settings: InternalizeSettings,
) -> tuple[list[Any], list[Any], list[Any]]:
    """Check an internalization request and prepare it: (facts, training items, held-out probes).

    Every path to a module (trained or generated) starts here, so all refuse the same bad input and
    are gated on the same probes."""
    settings.check()
    check_cube_id(cube_id)
    if not documents:
        raise InvalidArgumentError("no documents to internalize")
    if store is not None and store.has(cube_id, version):
        raise AlreadyExistsError(
            f"cube {cube_id}@{version} exists already", hint="pick another --version or --cube-id"
        )
    facts = all_facts(documents)
    items = augment(documents)
    probes = heldout_probes(facts, items)
    if not facts or not probes:
        raise InvalidArgumentError(
            "the documents state no fact the validator can ask about, so a module could not be checked",
            hint="state facts as sentences in the model's relation vocabulary (see node/data/relations.json)",
        )
    return facts, items, probes


def document_origin(
    documents: Sequence[Document],
    facts: Sequence[Any],
    vault: PlaintextMemory | None,
    *,
    how: str,
    params: dict[str, str],
    extra_sources: Sequence[str] = (),
) -> cube_pb2.Origin:
    """An internalized cube's origin: its sources (by vault version and digest) and the (subject,
    relation) pairs it was taught, which externalization probes later."""
    return cube_pb2.Origin(
        method=METHOD,
        description=f"{how} from {len(documents)} document(s): "
        + ", ".join(d.title for d in documents)[:400],
        sources=[*(source_ref(d, vault_version(vault, d)) for d in documents), *extra_sources],
        params={**params, PROBE_KEYS_PARAM: json.dumps([list(f.key) for f in facts])},
    )


def host_fingerprint(rt: ModuleRuntime, model_name: str | None) -> cube_pb2.BaseModelFingerprint:
    """The runtime's host fingerprint (computed once per runtime), named ``model_name`` when given."""
    fp = cube_pb2.BaseModelFingerprint()
    fp.CopyFrom(rt.host_fingerprint(DEFAULT_SAMPLE_SEED))
    if model_name:
        fp.name = model_name
    return fp


def register(
    cube: MemCube,
    report: InternalizeReport,
    store: CubeStore | None,
    vault: PlaintextMemory | None,
    documents: Sequence[Document],
) -> None:
    """A module that passed the gate: its recall goes into its origin; then, with a store, it is stored
    and the sources are archived in the vault."""
    cube.manifest.origin.params.update(
        {"recall_heldout": str(report.recall_heldout), "min_recall": str(report.min_recall)}
    )
    if store is not None:
        store.put(cube.manifest, cube.payload)
        report.registered = True
        if vault is not None:
            archive_sources(vault, documents)


def vault_version(vault: PlaintextMemory | None, doc: Document) -> int | None:
    """The document's version in the vault, added first when absent or different (it is the source)."""
    if vault is None:
        return None
    try:
        current = vault.get(doc.doc_id, count_access=False)
    except NotFoundError:
        current = None
    if current is None or current.text != doc.text:
        current = vault.add(doc.doc_id, doc.text, title=doc.title, source="internalize")
    return current.version


def archive_sources(vault: PlaintextMemory, documents: Sequence[Document]) -> None:
    """Archive the source texts: inference uses the module now; the text stays for review and audit."""
    for doc in documents:
        vault.set_status(doc.doc_id, "archived")


def _rounded(seconds: dict[str, float], t0: float) -> dict[str, float]:
    out = {k: round(v, 3) for k, v in seconds.items()}
    out["total"] = round(time.perf_counter() - t0, 3)
    return out
