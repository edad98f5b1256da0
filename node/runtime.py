"""Module runtime: LoRA and bottleneck-adapter cubes applied to a host model without touching its weights.

Why hooks and slot tables instead of PEFT's wrapped layers: PEFT stores every adapter inside the module
tree, so ``set_adapter`` walks the model and loading slows as adapters accumulate. Here each adapted
linear layer gets one forward hook, installed the first time any module targets it, holding a table
``slot -> factors``. Which slots run is one shared routing object, so activating a resident module is a
couple of attribute writes: O(1), independent of the model size and of how many modules are resident.

A batch may route every row to its own set of modules (the per-row module index of S-LoRA/Punica). Each
layer then gathers, once per routing change, the row's factors concatenated along the rank axis
(several modules on one row = their ranks side by side, which is exactly the sum of their ΔW) and zero
padded to the batch's largest rank, and runs two batched matmuls. Rows without modules get zero factors,
i.e. the bare model. The gathered factors are cached until the routing changes, so a generate loop pays
for them once, not per token.

Bottleneck adapters (Houlsby-style: ``h + up(act(down(h)))`` on a layer's output) run after the LoRA
deltas of the same layer; they are non-linear, so per-row batches apply them to the rows that use them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from memfed.cube.build import ADAPTER_PARTS
from memfed.cube.fingerprint import (
    DEFAULT_SAMPLE_SEED,
    describe,
    fingerprint_model,
    mismatch_reasons,
    unwrap_base_model,
)
from memfed.cube.manifest import CubeManifest, kind_name, ref_string
from memfed.cube.payload import checked_views
from memfed.errors import (
    IncompatibleModelError,
    InvalidArgumentError,
    InvalidManifestError,
    NotFoundError,
    UnsupportedError,
)
from memfed.mip.v1 import cube_pb2

if TYPE_CHECKING:
    from memfed.cube.core import MemCube

LORA_PARTS = ("lora_A.weight", "lora_B.weight")
ACTIVATIONS: dict[str, Any] = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


@dataclass(frozen=True)
class ResidentModule:
    """A module loaded into the runtime: its slot, what it adapts and what it costs in memory."""

    ref: str
    slot: int
    kind: str
    targets: tuple[str, ...]
    nbytes: int
    manifest: CubeManifest = field(repr=False)


@dataclass(frozen=True)
class _Lora:
    a: torch.Tensor  # (r, in), as stored: F.linear reads it without a transposed copy
    b: torch.Tensor  # (out, r)
    scale: float

    def scaled_b(self) -> torch.Tensor:
        return self.b if self.scale == 1.0 else self.b * self.scale


@dataclass(frozen=True)
class _Adapter:
    down_w: torch.Tensor
    down_b: torch.Tensor
    up_w: torch.Tensor
    up_b: torch.Tensor
    act: Any

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act(F.linear(h, self.down_w, self.down_b)), self.up_w, self.up_b)


class _Routing:
    """Which slots run: one set for the whole batch, or one set per row. ``epoch`` invalidates plans."""

    __slots__ = ("epoch", "rows", "uniform")

    def __init__(self) -> None:
        self.epoch = 0
        self.uniform: tuple[int, ...] = ()
        self.rows: tuple[tuple[int, ...], ...] | None = None

    def set(self, uniform: tuple[int, ...], rows: tuple[tuple[int, ...], ...] | None) -> None:
        self.uniform, self.rows = uniform, rows
        self.epoch += 1


@dataclass
class _Plan:
    """What one layer computes under the current routing, built once per routing change."""

    a: torch.Tensor | None = None  # shared (R, in); or per row, transposed for bmm: (b, in, R)
    b: torch.Tensor | None = None  # shared (out, R); or per row (b, R, out)
    scale: float = 1.0  # shared path only; per-row factors carry their scale
    adapters: list[tuple[_Adapter, torch.Tensor | None]] = field(default_factory=list)  # (adapter, rows)
    batch: int | None = None


class _TargetLayer:
    """One adapted linear layer: its slot tables and the forward hook that applies them."""

    def __init__(self, name: str, layer: torch.nn.Module, in_f: int, out_f: int, routing: _Routing) -> None:
        self.name, self.in_features, self.out_features = name, in_f, out_f
        self.routing = routing
        self.lora: dict[int, _Lora] = {}
        self.adapters: dict[int, _Adapter] = {}
        self._plan: _Plan | None = None
        self._plan_epoch = -1
        self.handle = layer.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
        r = self.routing
        if r.rows is None and not r.uniform:
            return None
        if self._plan_epoch != r.epoch:
            self._plan = self._build(r)
            self._plan_epoch = r.epoch
        plan = self._plan
        if plan is None:
            return None
        return _apply(plan, args[0], out, self.name)

    def _build(self, r: _Routing) -> _Plan | None:
        if r.rows is None:
            return self._build_uniform(r.uniform)
        return self._build_rows(r.rows)

    def _build_uniform(self, slots: tuple[int, ...]) -> _Plan | None:
        loras = [self.lora[s] for s in slots if s in self.lora]
        adapters = [(self.adapters[s], None) for s in slots if s in self.adapters]
        if not loras and not adapters:
            return None
        plan = _Plan(adapters=adapters)
        if len(loras) == 1:  # the common case: the stored factors themselves, no copy
            plan.a, plan.b, plan.scale = loras[0].a, loras[0].b, loras[0].scale
        elif loras:  # ranks side by side = the sum of the modules' ΔW
            plan.a = torch.cat([lo.a for lo in loras], dim=0)
            plan.b = torch.cat([lo.scaled_b() for lo in loras], dim=1)
        return plan

    def _build_rows(self, rows: tuple[tuple[int, ...], ...]) -> _Plan | None:
        per_row = [[self.lora[s] for s in row if s in self.lora] for row in rows]
        ranks = [sum(lo.a.shape[0] for lo in los) for los in per_row]
        adapter_rows: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            for s in row:
                if s in self.adapters:
                    adapter_rows.setdefault(s, []).append(i)
        if not any(ranks) and not adapter_rows:
            return None
        plan = _Plan(batch=len(rows))
        width = max(ranks)
        if width:
            ref = next(lo for los in per_row for lo in los)
            at = ref.a.new_zeros(len(rows), self.in_features, width)
            bt = ref.b.new_zeros(len(rows), width, self.out_features)
            for i, los in enumerate(per_row):
                col = 0
                for lo in los:
                    r = lo.a.shape[0]
                    at[i, :, col : col + r] = lo.a.t()
                    bt[i, col : col + r, :] = lo.scaled_b().t()
                    col += r
            plan.a, plan.b = at, bt
        device = next(iter(self.adapters.values())).up_w.device if adapter_rows else None
        plan.adapters = [
            (self.adapters[s], torch.tensor(idx, device=device)) for s, idx in sorted(adapter_rows.items())
        ]
        return plan


def _apply(plan: _Plan, x: torch.Tensor, out: torch.Tensor, name: str) -> torch.Tensor:
    if plan.a is not None:
        if plan.batch is None:
            out = torch.add(out, F.linear(F.linear(x, plan.a), plan.b), alpha=plan.scale)
        else:
            if x.shape[0] != plan.batch:
                raise InvalidArgumentError(
                    f"layer {name} got a batch of {x.shape[0]} rows but the routing names {plan.batch}"
                )
            flat = x.reshape(plan.batch, -1, x.shape[-1])
            out = out + torch.bmm(torch.bmm(flat, plan.a), plan.b).view_as(out)
    for adapter, rows in plan.adapters:
        if rows is None:
            out = out + adapter(out)
        else:
            out = out.index_add(0, rows, adapter(out.index_select(0, rows)))
    return out


def is_lowrank_edit(m: CubeManifest) -> bool:
    """A ROME/MEMIT fact edit: kind ``edit``, declared low-rank by ``memfed.node.editing``, in LoRA form
    (ΔW = B·A on MLP down-projections). It runs exactly like a LoRA module."""
    return (
        kind_name(m.kind) == "edit"
        and m.annotations.get("memfed.edit.form") == "low-rank"
        and m.payload.WhichOneof("spec") == "lora"
    )


def _linear_shape(layer: torch.nn.Module) -> tuple[int, int] | None:
    """(in, out) of a linear-like layer (nn.Linear or GPT-2's Conv1D), None for anything else."""
    if isinstance(layer, torch.nn.Linear):
        return layer.in_features, layer.out_features
    if type(layer).__name__ == "Conv1D":  # weight is (in, out)
        w = layer.weight
        return int(w.shape[0]), int(w.shape[1])
    return None


class ModuleRuntime:
    """Holds a host model and the modules resident on it; routes forward passes through them.

    Thread-safe: ``load``/``unload``/``activate`` and every ``routed`` block serialize on one lock, so a
    forward pass never sees the routing change under it. Generation holds the lock for the whole call.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.base = unwrap_base_model(model)
        self.lock = threading.RLock()
        self._routing = _Routing()
        self._layers: dict[str, _TargetLayer] = {}
        self._resident: dict[str, ResidentModule] = {}
        self._next_slot = 1
        self._fingerprints: dict[int, cube_pb2.BaseModelFingerprint] = {}
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        # One walk over the model, at start-up: the names and shapes of every linear layer a module may
        # target. Loading and activation never walk the model again.
        self.linear_layers: dict[str, tuple[int, int]] = {}
        for name, layer in self.base.named_modules():
            shape = _linear_shape(layer)
            if shape is not None:
                self.linear_layers[name] = shape
        self.host_fingerprint(DEFAULT_SAMPLE_SEED)  # every cube memfed makes uses this seed

    # -- residency -----------------------------------------------------------------------------------

    @property
    def resident(self) -> Mapping[str, ResidentModule]:
        """Resident modules by ref (a read-only view; changes only through load/unload)."""
        return MappingProxyType(self._resident)

    @property
    def active(self) -> tuple[str, ...]:
        by_slot = {m.slot: ref for ref, m in self._resident.items()}
        return tuple(by_slot[s] for s in self._routing.uniform if s in by_slot)

    def host_fingerprint(self, seed: int) -> cube_pb2.BaseModelFingerprint:
        """The host model's fingerprint under ``seed``, computed once per seed."""
        fp = self._fingerprints.get(seed)
        if fp is None:
            fp = self._fingerprints[seed] = fingerprint_model(self.model, seed=seed)
        return fp

    def check_compatible(self, manifest: CubeManifest) -> None:
        """Refuse a cube made for another base model, naming both models and what differs."""
        expected = manifest.base_model
        actual = self.host_fingerprint(expected.sample_seed)
        if (expected.fingerprint_id, expected.config_digest, expected.shapes_digest) == (
            actual.fingerprint_id, actual.config_digest, actual.shapes_digest,
        ):  # fmt: skip
            return  # equal ids = equal samples on the bf16 grid: the common case, without numpy
        reasons = mismatch_reasons(expected, actual)
        if reasons:
            raise IncompatibleModelError(
                f"cube {ref_string(manifest)} was made for {describe(expected)} but this node hosts "
                f"{describe(actual)}; they differ in: {', '.join(reasons)}",
                hint="send the cube to a node hosting its base model, or move it through text "
                "(externalize, then internalize on this model)",
            )

    @staticmethod
    def decode(cube: MemCube) -> dict[str, torch.Tensor]:
        """The payload's tensors as zero-copy views, refused if any holds NaN or Inf."""
        views, bad = checked_views(cube.payload)
        if bad:
            raise InvalidArgumentError(
                f"cube {cube.ref}: tensor {bad[0]} holds NaN or Inf values"
                + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""),
                hint="the module diverged in training or was corrupted; retrain or re-export it",
            )
        return views

    def validate(
        self, cube: MemCube, *, tensors: dict[str, torch.Tensor] | None = None, checked: bool = False
    ) -> dict[str, Any]:
        """Every check ``load`` makes (kind, base model, targets, ranks, shapes, NaN/Inf), without
        installing anything: what a node runs before it stores a pushed module. Returns the prepared
        per-layer factors."""
        m = cube.manifest
        ref = ref_string(m)
        kind = kind_name(m.kind)
        if kind not in ("lora", "adapter") and not is_lowrank_edit(m):
            raise UnsupportedError(
                f"cube {ref} is a {kind} cube; the module runtime runs lora, adapter and low-rank edit cubes",
                hint="codebook edit cubes run as a hook (memfed edit, memfed.node.editing.attach), plaintext "
                "cubes are read as text",
            )
        self.check_compatible(m)
        if tensors is None:
            tensors, checked = self.decode(cube), True
        if kind != "adapter":
            return self._lora_parts(m, tensors, checked)
        return self._adapter_parts(m, tensors, checked)

    def load(
        self, cube: MemCube, *, tensors: dict[str, torch.Tensor] | None = None, checked: bool = False
    ) -> ResidentModule:
        """Make ``cube`` resident: check it fits this model, then install its factors in slot tables.

        Cost is proportional to the module's own size; the model is not walked. ``tensors`` may pass
        already-decoded payload tensors (the scheduler's host tier) to skip decoding; ``checked`` says
        they came from ``decode`` (so the NaN/Inf scan is not repeated).
        """
        m = cube.manifest
        ref = ref_string(m)
        with self.lock:
            if ref in self._resident:
                return self._resident[ref]
        if tensors is None:
            tensors, checked = self.decode(cube), True
        parts = self.validate(cube, tensors=tensors, checked=checked)
        kind = kind_name(m.kind)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        with self.lock:
            if ref in self._resident:
                return self._resident[ref]
            slot = self._next_slot
            self._next_slot += 1
            for name, factors in parts.items():
                layer = self._layers.get(name)
                if layer is None:
                    layer = self._install(name)
                table = layer.lora if isinstance(factors, _Lora) else layer.adapters
                table[slot] = factors
            module = ResidentModule(ref, slot, kind, tuple(sorted(parts)), nbytes, m)
            self._resident[ref] = module
            return module

    def _install(self, name: str) -> _TargetLayer:
        in_f, out_f = self.linear_layers[name]
        layer = _TargetLayer(name, self.base.get_submodule(name), in_f, out_f, self._routing)
        self._layers[name] = layer
        return layer

    def _target_shape(self, ref: str, module: str) -> tuple[int, int]:
        shape = self.linear_layers.get(module)
        if shape is None:
            raise IncompatibleModelError(
                f"cube {ref} targets layer {module!r}, which is not a linear layer of this model",
                hint="the cube was made for another architecture; check `memfed cube show` against the model",
            )
        return shape

    def _prepare(self, ref: str, name: str, t: torch.Tensor, checked: bool) -> torch.Tensor:
        if not t.is_floating_point():
            raise InvalidArgumentError(f"cube {ref}: tensor {name} is {t.dtype}, not floating point")
        if not checked and not bool(torch.isfinite(t).all()):
            raise InvalidArgumentError(
                f"cube {ref}: tensor {name} holds NaN or Inf values",
                hint="the module diverged in training or was corrupted; retrain or re-export it",
            )
        if t.dtype == self.dtype and t.device == self.device:
            return t
        return t.to(device=self.device, dtype=self.dtype)

    def _lora_parts(
        self, m: CubeManifest, tensors: dict[str, torch.Tensor], checked: bool
    ) -> dict[str, _Lora]:
        ref = ref_string(m)
        spec = m.payload.lora
        if not spec.targets:
            raise InvalidManifestError(f"cube {ref} is a lora cube without LoRA targets in its manifest")
        parts: dict[str, _Lora] = {}
        expected_names = set()
        for target in spec.targets:
            in_f, out_f = self._target_shape(ref, target.module)
            a_name, b_name = (f"{target.module}.{p}" for p in LORA_PARTS)
            expected_names.update((a_name, b_name))
            if a_name not in tensors or b_name not in tensors:
                raise InvalidManifestError(f"cube {ref}: the payload lacks {a_name} or {b_name}")
            a, b = tensors[a_name], tensors[b_name]
            r = target.rank
            if tuple(a.shape) != (r, in_f) or tuple(b.shape) != (out_f, r):
                raise IncompatibleModelError(
                    f"cube {ref}: layer {target.module} maps {in_f}->{out_f} features with rank {r}, but the "
                    f"payload holds A {tuple(a.shape)} and B {tuple(b.shape)}",
                    hint="the rank or target layer does not match this model; re-import the adapter",
                )
            a = self._prepare(ref, a_name, a, checked)
            b = self._prepare(ref, b_name, b, checked)
            parts[target.module] = _Lora(a=a, b=b, scale=float(target.scaling))
        extra = set(tensors) - expected_names
        if extra:
            raise InvalidManifestError(
                f"cube {ref}: payload tensors {sorted(extra)[:3]} are not described by the manifest"
            )
        return parts

    def _adapter_parts(
        self, m: CubeManifest, tensors: dict[str, torch.Tensor], checked: bool
    ) -> dict[str, _Adapter]:
        ref = ref_string(m)
        spec = m.payload.adapter
        act = ACTIVATIONS.get(spec.activation or "relu")
        if act is None:
            raise UnsupportedError(
                f"cube {ref}: adapter activation {spec.activation!r} is unsupported",
                hint=f"use one of {', '.join(ACTIVATIONS)}",
            )
        modules = sorted({name.rsplit(".", 2)[0] for name in tensors})
        if not modules:
            raise InvalidManifestError(f"cube {ref}: the adapter payload holds no tensors")
        parts: dict[str, _Adapter] = {}
        d = spec.bottleneck_dim
        for module in modules:
            _, out_f = self._target_shape(ref, module)
            names = [f"{module}.{p}" for p in ADAPTER_PARTS]
            missing = [n for n in names if n not in tensors]
            if missing:
                raise InvalidManifestError(f"cube {ref}: the payload lacks {missing[0]}")
            shapes = [tuple(tensors[n].shape) for n in names]
            if shapes != [(d, out_f), (d,), (out_f, d), (out_f,)]:
                raise IncompatibleModelError(
                    f"cube {ref}: adapter on {module} has shapes {shapes}, expected bottleneck {d} on "
                    f"{out_f} features",
                    hint="the bottleneck size or target layer does not match this model",
                )
            dw, db, uw, ub = (self._prepare(ref, n, tensors[n], checked) for n in names)
            parts[module] = _Adapter(dw, db, uw, ub, act)
        return parts

    def unload(self, ref: str) -> ResidentModule:
        """Remove a resident module from every slot table (and from the routing if it was active)."""
        with self.lock:
            module = self._resident.pop(ref, None)
            if module is None:
                raise NotFoundError(f"module {ref} is not resident on this node")
            for name in module.targets:
                layer = self._layers[name]
                layer.lora.pop(module.slot, None)
                layer.adapters.pop(module.slot, None)
            r = self._routing
            if module.slot in r.uniform:
                r.set(tuple(s for s in r.uniform if s != module.slot), r.rows)
            return module

    # -- routing -------------------------------------------------------------------------------------

    def _slots(self, refs: Sequence[str]) -> tuple[int, ...]:
        slots = []
        for ref in refs:
            module = self._resident.get(ref)
            if module is None:
                raise NotFoundError(
                    f"module {ref} is not resident on this node", hint="load it first (memfed module load)"
                )
            slots.append(module.slot)
        return tuple(slots)

    def activate(self, *refs: str) -> None:
        """Make ``refs`` the modules every forward pass runs (none = the bare model). O(1) per module."""
        with self.lock:
            self._routing.set(self._slots(refs), None)

    def deactivate(self) -> None:
        """Run the bare model."""
        with self.lock:
            self._routing.set((), None)

    @contextmanager
    def routed(
        self, rows: Sequence[Sequence[str]] | None = None, *, modules: Sequence[str] = ()
    ) -> Iterator[None]:
        """Run the block with per-row modules (``rows[i]`` for batch row i) or one module set for all
        rows, holding the lock; the previous routing comes back afterwards."""
        with self.lock:
            r = self._routing
            saved = (r.uniform, r.rows)
            if rows is not None:
                slots = tuple(self._slots(row) for row in rows)
                if len(set(slots)) == 1:  # every row the same: the cheaper shared-factor path
                    r.set(slots[0], None)
                else:
                    r.set((), slots)
            else:
                r.set(self._slots(modules), None)
            try:
                yield
            finally:
                r.set(*saved)

    def close(self) -> None:
        """Remove every hook: the model is exactly the bare base model again."""
        with self.lock:
            for layer in self._layers.values():
                layer.handle.remove()
            self._layers.clear()
            self._resident.clear()
            self._routing.set((), None)
