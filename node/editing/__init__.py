"""Parameter editing: rewrite facts a model holds, as cubes that can be shared and rolled back.

- locate: ``causal_trace`` (which layer and token carry a fact);
- rewrite one fact: ROME (``Editor.rome``), a rank-one-per-key update of an MLP down-projection;
- rewrite many at once: MEMIT (``Editor.memit``), one least-squares update spread over layers;
- rewrite in milliseconds: a MEND editor (``mend_train.train_mend`` once per model, then
  ``MendEditor.edit``; stored by ``mend_cube``): a learned network turns one edit's gradient at the
  subject into a weight update, no optimization loop;
- rewrite for life: a GRACE codebook (``Editor.codebook_editor``), keys/values/radii applied by a hook,
  base weights untouched;
- scope edits (SERAC-style): an ``EditMemory`` of (prompt, new answer) records and a scope classifier;
  ``ScopedModel`` answers in-scope prompts from it and the rest from the untouched model;
- edit with no backward pass: ``gradfree_edit`` (ROME's closed form, value read from forward passes);
- measure: ``Evaluator`` over CounterFact-format cases (``load_cases``; ours ship in node/data);
- govern: ``lowrank_cube`` / ``codebook_cube`` (kind ``edit``, origin says subject: old → new and the
  layer), ``attach``, ``apply_edits`` (next version of an edit cube in a store).

Low-rank edit cubes use the LoRA tensor naming, so ``memfed.node.runtime.ModuleRuntime`` runs them like
LoRA modules; codebooks run as a forward hook (``attach``).
"""

from memfed.node.editing.arch import ModelLayout, layout_of
from memfed.node.editing.codebook import Codebook, CodebookHook
from memfed.node.editing.counterfact import EditCase, load_cases, novel_cases
from memfed.node.editing.cubes import (
    AttachedEdit,
    attach,
    codebook_cube,
    describe_edit,
    lowrank_cube,
    read_edit,
    scope_cube,
)
from memfed.node.editing.editor import Editor
from memfed.node.editing.evaluate import Evaluator, summarize
from memfed.node.editing.grace import CodebookEditor, new_codebook
from memfed.node.editing.gradfree import GradFreeResult, gradfree_edit
from memfed.node.editing.lowrank import LowRankEdit, apply_to_weights, remove_from_weights
from memfed.node.editing.mend import MendConfig, MendEditor
from memfed.node.editing.scope import EditMemory, ScopeMatch, calibrate_threshold
from memfed.node.editing.scope_path import ScopedModel, scoped_answer
from memfed.node.editing.trace import TraceResult, causal_trace
from memfed.node.editing.value import EditRequest, ValueConfig

__all__ = [
    "AttachedEdit",
    "Codebook",
    "CodebookEditor",
    "CodebookHook",
    "EditCase",
    "EditMemory",
    "EditRequest",
    "Editor",
    "Evaluator",
    "GradFreeResult",
    "LowRankEdit",
    "MendConfig",
    "MendEditor",
    "ModelLayout",
    "ScopeMatch",
    "ScopedModel",
    "TraceResult",
    "ValueConfig",
    "apply_to_weights",
    "attach",
    "calibrate_threshold",
    "causal_trace",
    "codebook_cube",
    "describe_edit",
    "gradfree_edit",
    "layout_of",
    "load_cases",
    "lowrank_cube",
    "new_codebook",
    "novel_cases",
    "read_edit",
    "remove_from_weights",
    "scope_cube",
    "scoped_answer",
    "summarize",
]
