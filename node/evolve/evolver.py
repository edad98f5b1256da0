"""The evolver: turns accumulated feedback into the next version of a module, or explains why not.

``Evolver.step(cube_id)`` does whatever is due for one cube, in this order, and records the outcome:

1. **Regression check.** If the current version was promoted by the evolver, its live feedback (items
   given on it) is compared with the good rate of the version it replaced, recorded at promotion.
   With at least ``regression_min_samples`` items from ``min_principals`` principals and a drop beyond
   ``regression_margin``, the cube is rolled back (``Lifecycle.rollback``: the old version current
   again, the new one archived) → ``rolled_back``.
2. **Enough feedback?** At least ``threshold`` items new since the last attempt, and after the poison
   guards (``memfed.node.evolve.weighting``) at least ``min_principals`` distinct principals behind
   them; otherwise → ``waiting``.
3. **Candidate.** The trusted verdicts are split by prompt into train and held-out; a candidate is trained
   from the current version's factors (``memfed.node.evolve.objective``).
4. **Gates.** Through the node's module runtime, candidate and current version are measured on the
   held-out feedback and on the module's validation set (``memfed.node.evolve.validation``). Promoted
   only if the held-out feedback score improves and validation recall drops by at most
   ``max_validation_drop``: stored as the next version (``next_version``: minor bump, parent digest on
   the version chain), the feedback it learned from marked used → ``promoted``. Else → ``discarded``
   with the failed gate as the reason; the feedback stays pending and a new attempt waits for
   ``threshold`` more items.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from memfed.cube.build import lora_cube
from memfed.cube.manifest import lifecycle_name
from memfed.errors import NotFoundError
from memfed.mip.v1 import cube_pb2
from memfed.node.conversion.augment import Probe, TrainingItem
from memfed.node.conversion.internalize import PROBE_KEYS_PARAM
from memfed.node.conversion.probing import generate, module_loaded, rate, recall
from memfed.node.conversion.replay import first_answer, world_prompts
from memfed.node.editing.lineage import next_version
from memfed.node.evolve.examples import training_examples
from memfed.node.evolve.feedback import FeedbackLog, StoredFeedback
from memfed.node.evolve.objective import StartPoint, train_candidate
from memfed.node.evolve.settings import EvolveDecision, EvolveSettings
from memfed.node.evolve.validation import ValidationSet, fact_of_prompt, facts_asked, validation_set
from memfed.node.evolve.weighting import Verdict, Weighing, weigh
from memfed.node.lifecycle import Lifecycle
from memfed.node.runtime import ModuleRuntime

if TYPE_CHECKING:
    import torch

    from memfed.cube.core import MemCube
    from memfed.node.plaintext import PlaintextMemory
    from memfed.node.store import CubeStore

__all__ = ["EvolveDecision", "EvolveSettings", "Evolver"]

METHOD = "evolve"
EPS = 1e-9  # figures are rounded to 4 places; comparisons allow for it


class Evolver:
    """Evolves the LoRA modules of one node store from the feedback in ``log``.

    ``runtime``: the node's module runtime (measurements go through it, as the node serves); without
    one, each step makes its own and closes it. ``vault``: the node's plaintext memory, where an
    internalized module's validation facts are read from (see ``memfed.node.evolve.validation``).
    Not thread-safe against other model users: run ``step`` on the node's model thread.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        store: CubeStore,
        log: FeedbackLog,
        settings: EvolveSettings | None = None,
        *,
        runtime: ModuleRuntime | None = None,
        vault: PlaintextMemory | None = None,
    ) -> None:
        self.model, self.tokenizer, self.store, self.log = model, tokenizer, store, log
        self.settings = settings or log.settings
        self.settings.check()
        self.runtime = runtime
        self.vault = vault

    def decisions(self, cube_id: str) -> list[EvolveDecision]:
        """Every recorded decision for ``cube_id``, oldest first."""
        return self.log.decisions(cube_id)

    def step(self, cube_id: str) -> EvolveDecision:
        """Do what is due for ``cube_id`` (see the module docstring); the recorded decision.

        NotFoundError when the store holds no usable version of the cube."""
        current = self.store.current_version(cube_id)
        if current is None:
            raise NotFoundError(
                f"every version of cube {cube_id!r} is archived or expired; nothing to evolve",
                hint=f"restore a version first (memfed module restore {cube_id}@VERSION)",
            )
        rolled_back = self._regression(cube_id, current)
        if rolled_back is not None:
            return rolled_back
        s = self.settings
        pending = self.log.pending(cube_id)
        fresh = [it for it in pending if it.id > self.log.last_attempt_item(cube_id)]
        figures = {"pending": float(len(pending)), "new_items": float(len(fresh))}
        if len(fresh) < s.threshold:
            return self._wait(
                cube_id, current, f"{len(fresh)} new feedback items since the last attempt; "
                f"{s.threshold} are needed", figures,
            )  # fmt: skip
        cube = self.store.get(cube_id, current)
        start = StartPoint.of(cube)  # UnsupportedError before any work for a module that cannot train
        validation = validation_set(cube, self.log, self.vault)
        weighing = weigh(
            pending, validation.answers(), min_trust=s.min_trust, drop_contradictions=s.drop_contradictions
        )
        figures.update(principals=float(len(weighing.principals)), dropped=float(len(weighing.dropped)))
        if len(weighing.principals) < s.min_principals:
            return self._wait(
                cube_id, current, f"the trusted feedback comes from {len(weighing.principals)} distinct "
                f"principal(s); a change needs {s.min_principals}", figures,
            )  # fmt: skip
        train, held = weighing.split(s.holdout_fraction)
        if not any(v.chosen for v in train) or not held:
            return self._wait(
                cube_id, current, "the trusted feedback names no answer to teach on enough distinct prompts "
                "(a train and a held-out prompt are needed)", figures,
            )  # fmt: skip
        return self._attempt(cube, start, pending, weighing, train, held, validation, figures)

    # -- a training attempt ---------------------------------------------------------------------------

    def _attempt(
        self,
        cube: MemCube,
        start: StartPoint,
        pending: Sequence[StoredFeedback],
        weighing: Weighing,
        train: Sequence[Verdict],
        held: Sequence[Verdict],
        validation: ValidationSet,
        figures: dict[str, float],
    ) -> EvolveDecision:
        cube_id, current, s = cube.manifest.cube_id, cube.manifest.version, self.settings
        last_item = max(it.id for it in pending)
        if not validation.probes:
            decision = EvolveDecision(
                cube_id, "discarded", "no validation set for this module: an evolved version could not be "
                "checked for what it forgets (store one with FeedbackLog.set_validation, or keep the "
                "module's source documents in the node's plaintext memory)", current, None, figures,
            )  # fmt: skip
            return self.log.record(decision, last_item=last_item)
        preferred, pairs = training_examples(train, held)
        sizes = {"train_prompts": train, "held_prompts": held, "preferred": preferred, "pairs": pairs}
        figures.update({name: float(len(part)) for name, part in sizes.items()})
        figures["validation_probes"] = float(len(validation.probes))
        nv = next_version(self.store, cube_id)
        rt = self.runtime or ModuleRuntime(self.model)
        try:
            with module_loaded(self.model, cube, rt) as (_, ref):
                replay = self._replay(rt, ref, validation, weighing)
                t0 = time.perf_counter()
                with rt.routed(modules=()):  # train on the bare model, whatever the node has active
                    trained = train_candidate(self.model, self.tokenizer, start, preferred, pairs, replay, s)
                figures["train_seconds"] = round(time.perf_counter() - t0, 3)
                candidate = self._candidate_cube(cube, trained, nv, weighing, len(pending))
                with module_loaded(self.model, candidate, rt) as (_, cand_ref):
                    for name, refs in (("before", ref), ("after", cand_ref)):
                        figures[f"validation_{name}"] = rate(
                            recall(rt, self.tokenizer, validation.probes, [refs])
                        )
                        figures[f"feedback_{name}"] = self._feedback_score(rt, held, refs)
        finally:
            if self.runtime is None:
                rt.close()
        figures["good_rate_before"] = self._good_rate(self.log.on_version(cube_id, current) or pending)
        failed = self._failed_gates(figures)
        if not failed:
            # Stored first, then recorded: the store is the source of truth, and a crash in between leaves
            # a published version whose feedback is still pending (trained on again later), never a
            # recorded promotion of a version that does not exist.
            self.store.put(candidate.manifest, candidate.payload)
            reason = (
                f"held-out feedback {figures['feedback_before']:.3f} -> {figures['feedback_after']:.3f}, "
                f"validation {figures['validation_before']:.3f} -> {figures['validation_after']:.3f}"
            )
            decision = EvolveDecision(cube_id, "promoted", reason, current, nv.version, figures)
            return self.log.record(decision, last_item=last_item, consumed=[it.id for it in pending])
        reason = "; ".join(failed)
        decision = EvolveDecision(cube_id, "discarded", reason, current, None, figures)
        return self.log.record(decision, last_item=last_item)

    def _failed_gates(self, figures: dict[str, float]) -> list[str]:
        """The gates a candidate failed, each as a reason; [] when it may be promoted."""
        s, f = self.settings, figures
        failed = []
        if f["feedback_after"] - f["feedback_before"] <= s.min_feedback_gain + EPS:
            failed.append(
                f"held-out feedback score {f['feedback_before']:.3f} -> {f['feedback_after']:.3f}: "
                f"no improvement beyond {s.min_feedback_gain:.3f}"
            )
        if f["validation_before"] - f["validation_after"] > s.max_validation_drop + EPS:
            failed.append(
                f"validation recall {f['validation_before']:.3f} -> {f['validation_after']:.3f}: "
                f"drops by more than {s.max_validation_drop:.3f}"
            )
        return failed

    def _replay(
        self, rt: ModuleRuntime, ref: str, validation: ValidationSet, weighing: Weighing
    ) -> list[TrainingItem]:
        """What the candidate must keep while it learns: the validation facts rehearsed (except those the
        trusted feedback answers otherwise), and the current version's own answers to prompts about the
        host's world facts (self-distillation, as internalization replays), minus subjects the feedback
        asks about (their answers are supposed to change)."""
        truth = validation.answers()
        contested = {
            key
            for v in weighing.verdicts
            if v.chosen is not None
            and (key := fact_of_prompt(v.prompt)) in truth
            and truth[key].casefold() != v.chosen.casefold()
        }
        items = validation.rehearsal(exclude=contested)
        s = self.settings
        asked = facts_asked([v.prompt for v in weighing.verdicts])
        subjects = {subject for subject, _ in asked}
        prompts, _ = world_prompts(s.replay_world_prompts, 0, exclude_subjects=subjects, seed=s.seed)
        if prompts:
            answers = generate(rt, self.tokenizer, prompts, [ref])
            pairs = [(p, first_answer(a)) for p, a in zip(prompts, answers, strict=True)]
            items += [TrainingItem(p, a, False, "replay") for p, a in pairs if a.strip(". ")]
        return items if s.replay_batch else []

    def _feedback_score(self, rt: ModuleRuntime, verdicts: Sequence[Verdict], ref: str) -> float:
        """Trust-weighted share of held-out verdicts the module satisfies: it gives the chosen answer, or
        (where none was agreed on) none of the rejected ones. One batched recall pass for all."""
        probes = [
            Probe(v.prompt, answer, str(i), "")
            for i, v in enumerate(verdicts)
            for answer in ([v.chosen] if v.chosen is not None else v.rejected)
        ]
        hits = recall(rt, self.tokenizer, probes, [ref])
        matched: dict[int, bool] = {}
        for probe, hit in zip(probes, hits, strict=True):
            i = int(probe.subject)
            matched[i] = matched.get(i, False) or hit
        total = got = 0.0
        for i, v in enumerate(verdicts):
            ok = matched.get(i, False) if v.chosen is not None else not matched.get(i, False)
            total += v.weight
            got += v.weight * ok
        return round(got / total, 4) if total else 0.0

    def _candidate_cube(
        self, parent: MemCube, trained: Any, nv: Any, weighing: Weighing, n_items: int
    ) -> MemCube:
        """The next version: the parent's host, owner and tags; its validation keys and sources carried on."""
        pm = parent.manifest
        s = self.settings
        params = {
            "evolved_from": parent.ref,
            "feedback_items": str(n_items),
            "principals": str(len(weighing.principals)),
            "steps": str(s.steps),
            "lr": str(s.lr),
            "dpo_beta": str(s.dpo_beta),
        }
        if PROBE_KEYS_PARAM in pm.origin.params:
            params[PROBE_KEYS_PARAM] = pm.origin.params[PROBE_KEYS_PARAM]
        origin = cube_pb2.Origin(
            method=METHOD,
            description=f"evolved from {parent.ref} on {n_items} feedback items from "
            f"{len(weighing.principals)} principals",
            sources=[*pm.origin.sources, parent.ref],
            params=params,
        )
        # In use if the parent was: the new version replaces it as the current one.
        lifecycle = "activated" if lifecycle_name(pm.lifecycle) in ("activated", "merged") else "generated"
        return lora_cube(
            pm.base_model, trained.factors, cube_id=pm.cube_id, version=nv.version, alpha=trained.alpha,
            origin=origin, lifecycle=lifecycle, version_chain=nv.chain, owner=pm.owner,
            tags=dict.fromkeys([*pm.tags, "evolved"]), priority=pm.priority,
        )  # fmt: skip

    # -- regression after promotion --------------------------------------------------------------------

    def _regression(self, cube_id: str, current: str) -> EvolveDecision | None:
        """Roll back a promoted version whose live feedback is worse than its predecessor's; None when
        there is nothing to roll back (not promoted here, too few samples, or no regression)."""
        promotions = self.log.decisions(cube_id, "promoted")
        if not promotions or promotions[-1].to_version != current:
            return None
        promo, s = promotions[-1], self.settings
        live = self.log.on_version(cube_id, current)
        if len(live) < s.regression_min_samples:
            return None
        weighing = weigh(live, {}, min_trust=s.min_trust)
        if len(weighing.principals) < s.min_principals:
            return None
        before = promo.figures.get("good_rate_before", 0.0)
        after = self._good_rate(live, weighing)
        figures = {"good_rate_before": before, "good_rate_live": after, "live_items": float(len(live))}
        if after >= before - s.regression_margin - EPS:
            return None
        assert promo.from_version is not None
        reason = (
            f"live good rate of {current} is {after:.3f} over {len(live)} items, below {before:.3f} of "
            f"{promo.from_version} by more than {s.regression_margin:.3f}"
        )
        Lifecycle(self.store).rollback(cube_id, promo.from_version, f"evolve regression: {reason}")
        decision = EvolveDecision(cube_id, "rolled_back", reason, current, promo.from_version, figures)
        return self.log.record(decision)

    def _good_rate(self, items: Sequence[StoredFeedback], weighing: Weighing | None = None) -> float:
        """Trust-weighted share of ``items`` marked good, leaving out the principals the guards drop."""
        weighing = weighing or weigh(items, {}, min_trust=self.settings.min_trust)
        total = good = 0.0
        for it in items:
            if it.id in weighing.dropped:
                continue
            t = weighing.trust.get(it.principal, 0.0)
            total += t
            good += t * it.good
        return round(good / total, 4) if total else 0.0

    def _wait(self, cube_id: str, current: str, reason: str, figures: dict[str, float]) -> EvolveDecision:
        return self.log.record(EvolveDecision(cube_id, "waiting", reason, current, None, figures))
