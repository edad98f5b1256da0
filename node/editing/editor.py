"""The editing front door for one loaded model: checks requests, picks layers, runs a method.

``Editor`` holds what every method needs once per model (layout, fingerprint, key statistics, context
prefixes) and refuses bad input with errors that say what to fix: a subject missing from the prompt, a
target the model already gives, a layer the model does not have, a model without a recognised MLP.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from memfed.cube.fingerprint import fingerprint_model
from memfed.errors import InvalidArgumentError
from memfed.mip.v1 import cube_pb2
from memfed.node.editing.arch import layout_of
from memfed.node.editing.codebook import Codebook, Mode
from memfed.node.editing.grace import DEFAULT_RADIUS, DEFAULT_WINDOW, CodebookEditor, new_codebook
from memfed.node.editing.keys import context_prefixes
from memfed.node.editing.memit import DEFAULT_LAMBDA, MemitResult, memit_edit
from memfed.node.editing.rome import RomeResult, rome_edit
from memfed.node.editing.stats import second_moments
from memfed.node.editing.text import encode, subject_span, target_ids
from memfed.node.editing.trace import causal_trace
from memfed.node.editing.value import DEFAULT_VALUE, EditRequest, ValueConfig

# Value optimization for codebook edits: a short run (GRACE edits should be cheap). A larger step and an
# early stop once the target costs < 0.2 nats/token: on the embedded model most edits stop after 5-15
# steps, with the efficacy and generalization of 40 steps at lr 1 to a 0.05 stop, at a third of the time.
CODEBOOK_VALUE = ValueConfig(steps=40, lr=2.0, weight_decay=0.001, stop_nll=0.2)


class Editor:
    """Edits for one model. ``texts`` replaces the default corpus of the key statistics; ``cache_stats``
    False keeps them in memory only."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        texts: Sequence[str] | None = None,
        fingerprint: cube_pb2.BaseModelFingerprint | None = None,
        value: ValueConfig = DEFAULT_VALUE,
        cache_stats: bool = True,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.layout = layout_of(model)  # UnsupportedError for a model without a recognised MLP
        self.fingerprint = fingerprint or fingerprint_model(model)
        self.texts = texts
        self.value = value
        self.cache_stats = cache_stats
        self._moments: dict[int, torch.Tensor] | None = None

    # -- inputs ---------------------------------------------------------------------------------------

    @property
    def second_moments(self) -> dict[int, torch.Tensor]:
        if self._moments is None:
            self._moments = second_moments(
                self.model,
                self.tokenizer,
                texts=self.texts,
                fingerprint_id=self.fingerprint.fingerprint_id,
                cache=self.cache_stats,
            )
        return self._moments

    @torch.no_grad()
    def gives(self, prompt: str, target: str) -> bool:
        """Does greedy decoding after ``prompt`` produce ``target`` (and then end the word)?"""
        enc = encode(self.tokenizer, prompt, None, target)
        device = next(self.model.parameters()).device
        logits = self.model(input_ids=torch.tensor([enc.full], device=device)).logits[0]
        pred = logits[len(enc.ids) - 1 :].argmax(-1).tolist()
        if pred[: len(enc.target)] != list(enc.target):
            return False
        after = self.tokenizer.decode([pred[len(enc.target)]], skip_special_tokens=True)
        return after == "" or not after[0].isalnum()

    @torch.no_grad()
    def answer(self, prompt: str, max_tokens: int = 8) -> str:
        """The model's greedy answer after ``prompt``, up to the first punctuation or line end."""
        device = next(self.model.parameters()).device
        ids = list(self.tokenizer(prompt)["input_ids"])
        out: list[int] = []
        for _ in range(max_tokens):
            nxt = int(self.model(input_ids=torch.tensor([ids + out], device=device)).logits[0, -1].argmax())
            if nxt == self.tokenizer.eos_token_id:
                break
            out.append(nxt)
            text = self.tokenizer.decode(out, skip_special_tokens=True)
            if any(ch in text for ch in ".,;!?\n"):
                break
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        for ch in ".,;!?\n":
            text = text.split(ch)[0]
        return text.strip()

    def request(
        self, prompt: str, subject: str, target: str, *, case_id: str | None = None, force: bool = False
    ) -> EditRequest:
        """A checked request: the subject is in the prompt, the target is not what the model already says
        (``force`` skips that check), and the answer being replaced is recorded for the cube's origin."""
        if not prompt or not prompt.strip():
            raise InvalidArgumentError("the prompt is empty", hint="give the text the answer should follow")
        subject_span(self.tokenizer, prompt, subject)
        target = target.strip() if isinstance(target, str) else target
        target_ids(self.tokenizer, target)
        old = self.answer(prompt)
        if not force and self.gives(prompt, target):
            raise InvalidArgumentError(
                f"the model already answers {target!r} after {prompt!r}: there is nothing to edit",
                hint="pick a different target, or check the prompt (the answer follows it after one space)",
            )
        return EditRequest(prompt, subject, target, old or None, case_id)

    # -- layers ---------------------------------------------------------------------------------------

    def check_layer(self, layer: int) -> int:
        return self.layout.check_layer(layer)

    def choose_layer(self, requests: Sequence[EditRequest], token: str = "all", samples: int = 4) -> int:
        """The layer whose MLP carries the facts, by causal tracing (up to 4 requests, effects summed)."""
        if not requests:
            raise InvalidArgumentError("no requests to trace")
        totals = [0.0] * self.layout.num_layers
        for req in list(requests)[:4]:
            trace = causal_trace(self.model, self.tokenizer, req.prompt, req.subject, samples=samples)
            first, last = trace.subject_range
            cols = range(first, last + 1) if token == "all" else [last]
            for layer in range(self.layout.num_layers):
                totals[layer] += max(trace.effects["mlp"][layer][t] for t in cols)
        usable = range(max(1, self.layout.num_layers - 1))
        return max(usable, key=lambda layer: totals[layer])

    # -- methods --------------------------------------------------------------------------------------

    def rome(self, request: EditRequest, layer: int | None = None, *, token: str = "all") -> RomeResult:
        """A ROME rank-one (per key) edit of ``request`` at ``layer`` (chosen by tracing when None)."""
        layer = self.choose_layer([request], token) if layer is None else self.check_layer(layer)
        return rome_edit(
            self.layout, self.tokenizer, request, layer, self.second_moments[layer],
            prefixes=context_prefixes(self.model, self.tokenizer), config=self.value, token=token,
        )  # fmt: skip

    def memit_layers(self, first: int) -> tuple[int, ...]:
        """MEMIT's default spread: ``first`` and the next layer (never the last, which cannot pass on)."""
        top = max(0, self.layout.num_layers - 2)
        return tuple(range(first, min(first + 1, top) + 1))

    def memit(
        self,
        requests: Sequence[EditRequest],
        layers: Sequence[int] | None = None,
        *,
        lam: float = DEFAULT_LAMBDA,
        token: str = "all",
    ) -> MemitResult:
        """One MEMIT edit writing all ``requests`` over ``layers`` (default: from the traced layer on)."""
        if layers is None:
            layers = self.memit_layers(self.choose_layer(requests, token))
        for layer in layers:
            self.check_layer(layer)
        return memit_edit(
            self.layout, self.tokenizer, requests, layers, self.second_moments, lam=lam,
            prefixes=context_prefixes(self.model, self.tokenizer), config=self.value, token=token,
        )  # fmt: skip

    def codebook_editor(
        self,
        codebook: Codebook | None = None,
        *,
        layer: int | None = None,
        requests: Sequence[EditRequest] = (),
        radius: float = DEFAULT_RADIUS,
        window: int = DEFAULT_WINDOW,
        mode: Mode = "replace",
        value: ValueConfig = CODEBOOK_VALUE,
    ) -> CodebookEditor:
        """A codebook editor, its hook attached: on ``codebook``, or a new one at ``layer`` (chosen by
        tracing ``requests`` when None)."""
        if codebook is None:
            if layer is None:
                layer = self.choose_layer(requests, "last") if requests else 0
            codebook = new_codebook(self.layout, self.check_layer(layer), window=window, mode=mode)
        else:
            self.check_layer(codebook.layer)
            if self.layout.down_proj[codebook.layer] != codebook.module:
                raise InvalidArgumentError(
                    f"the codebook sits on {codebook.module!r}, which is not this model's "
                    f"layer-{codebook.layer} MLP down-projection",
                    hint="use the codebook with the model it was made for",
                )
        return CodebookEditor(self.layout, self.tokenizer, codebook, radius=radius, config=value)
