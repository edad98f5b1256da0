"""Keyed watermarks in LoRA weights: embed at export, detect by correlation with a z-score.

Scheme ``keyed-gaussian-dw-v1``. For each adapted module m with factors A (r×in) and B (out×r), the mark
lives in the product ΔW = B·A, not in A or B alone (re-factoring the product, as merges and
conversions do, would wash out a mark on one factor):

* pattern Q_m: i.i.d. N(0,1), out×in, from a PRNG seeded by HMAC-SHA256(owner secret, scheme ‖ mark id ‖
  module name ‖ shape). The owner secret derives from the owner's signing key (identity.py); the mark id
  is the recipient's id (or the id of a recipient group), so each export carries its own pattern.
* detection: z = Σ_m ⟨ΔW_m, Q_m⟩ / sqrt(Σ_m ‖ΔW_m‖²_F), correlating with the *full* pattern. For a
  ΔW that does not carry Q (an unmarked cube, or the wrong key or recipient), the Q's are independent of
  it, so z is exactly N(0,1) whatever ΔW is. The decision threshold Z_THRESHOLD = 4 (one-sided p ≈ 3e-5
  per test; with 50 candidate recipients, ≈ 1.6e-3 family-wise); the tests measure the empirical null
  over 1,000 keys. Detection needs neither the model nor the statistics below.
* strength: the mark δ = ΔW' − ΔW is scaled so that the marked cube's z is TARGET_Z = 11 exactly (a merge
  at weight 0.5 with an equal-norm module leaves z/√2 ≈ 7.8; 50 steps of further training ≈ 10).
* embedding stays in the tangent space of rank-r matrices at ΔW (U·X + Y·Vᵀ, with U, V orthonormal bases
  of ΔW's column and row spaces): what a rank-r adapter can carry without changing its rank. Each half is
  written exactly into one factor, without re-factoring: B·δA = U·X (δA = B⁺·U·X) and δB·A = Y·Vᵀ
  (δB = Y·Vᵀ·A⁺). Two ways to choose X and Y:

  host-aware (what an export does when it has the cube's base model): the mark must not change what the
  adapted model says. For small δ, KL(clean ‖ marked) ≈ ½ Σ_m E[(gᵀ·δ_m·x)²], x the layer's input and g
  the gradient of log p(y) at its output, y sampled from the model; with C_m = E[x xᵀ], G_m = E[g gᵀ]
  (the K-FAC approximation) that is ½ Σ_m tr(G_m δ_m C_m δ_mᵀ). The δ that buys the most ⟨δ, Q⟩ for that
  cost is G⁻¹·Q·C⁻¹, restricted to what each half can hold:
      Y = G⁻¹ (I − P_U) Q V (Vᵀ C V)⁻¹    (B half: any output direction, inputs within ΔW's row space)
      X = (Uᵀ G U)⁻¹ Uᵀ Q C⁻¹             (A half: any input direction, outputs within its column space)
  with every inverse damped by 1% of the mean eigenvalue. Each piece gets the coefficient s·gain/cost
  (the same marginal cost in every module), pieces are applied B half then A half, twice, with U and V
  recomputed from the current factors (the second round can combine the low-cost output directions the
  first B half added with low-energy inputs; a third round gained nothing), and one global s is solved
  for z = TARGET_Z. C and G are those of the *adapted* model (base + this LoRA at its scaling) on text
  the base model samples itself from its BOS token (256 sequences of up to 32 tokens; the labels are the
  sampled next tokens, so G is a Monte Carlo Fisher): no data set is needed, and the statistics are
  computed at export from the base model the exporter already has (a few seconds on the embedded model;
  nothing is stored). Statistics of the base model without the LoRA cost 5x more KL on the test cube:
  the LoRA changes what its own layers see. Layers wider than _FULL_DIM keep only diagonals (memory).

  model-free (fallback when the base model is not at hand): ΔW' = ΔW + α_m·P_T(Q_m), P_T(Q) =
  P_U·Q + Q·P_V − P_U·Q·P_V the tangent-space projection of the pattern, written as
  B' = B + α·Q·A⁺, A' = A + α·B⁺·Q·(I−P_V) (first order exact; the second-order term is negligible at
  these strengths), α_m = sqrt(f)·‖ΔW_m‖_F / ‖P_T(Q_m)‖_F: each module carries the same fraction f of its
  own energy (capped at MAX_ENERGY), f solved for z = TARGET_Z.

  Measured on the embedded 1.1M-parameter model (tests/test_crypto_watermark.py, a rank-8 LoRA on every
  linear layer, z = 11): KL(clean ‖ marked) on held-out prompts ≈ 2e-4 host-aware vs ≈ 5e-3 model-free
  (goal ≤ 1e-3); see the test for the attack figures.

torch is imported inside functions only (memfed.crypto must import without it).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from memfed.errors import InvalidArgumentError, NotFoundError, UnsupportedError

if TYPE_CHECKING:
    import torch

    from memfed.crypto.ledger import ExportRecord

SCHEME = "keyed-gaussian-dw-v1"
TARGET_Z = 11.0  # the marked cube's z: ≥ 7 after a merge at 0.5, ≈ 10 after 50 training steps
MAX_ENERGY = 0.02  # model-free mark: never more than 2% of a module's energy
Z_THRESHOLD = 4.0
_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.[^.]+)?\.weight$")

# Host-aware mark (see the module docstring).
_DAMPING = 0.01  # each inverse: (M + 1% of M's mean eigenvalue · I)⁻¹
_ROUNDS = 2
_FULL_DIM = 2048  # wider layers keep only the diagonal of C or G
CALIBRATION_SEQUENCES = 256
CALIBRATION_LENGTH = 32


def pattern(secret: bytes, mark_id: str, module: str, shape: tuple[int, int]) -> np.ndarray:
    """The keyed N(0,1) pattern for one module (float32, ``shape`` = (out, in))."""
    msg = f"{SCHEME}\0{mark_id}\0{module}\0{shape[0]}x{shape[1]}".encode()
    seed = int.from_bytes(hmac.new(secret, msg, hashlib.sha256).digest(), "big")
    return np.random.Generator(np.random.PCG64(seed)).standard_normal(shape, dtype=np.float32)


def lora_pairs(tensors: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Module name -> (A, B) from cube or PEFT tensor names (PEFT's prefix and adapter name dropped)."""
    parts: dict[str, dict[str, Any]] = {}
    for name, t in tensors.items():
        m = _KEY_RE.match(name)
        if m:
            parts.setdefault(m["module"], {})[m["part"]] = t
    return {mod: (p["lora_A"], p["lora_B"]) for mod, p in sorted(parts.items()) if len(p) == 2}


def _tangent(q: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """P_T(Q) = P_U Q + Q P_V − P_U Q P_V, with U, V orthonormal bases of ΔW's column and row spaces."""
    uq = u @ (u.T @ q)
    return uq + (q - uq) @ v @ v.T


# -- host statistics --------------------------------------------------------------------------------


@dataclass
class HostStats:
    """What a change of each adapted layer costs on the adapted model (see the module docstring).

    ``inputs[m]`` = C_m = E[x xᵀ] of layer m's input, ``grads[m]`` = G_m = E[g gᵀ] of the gradient of
    log p(y) at its output (y sampled from the model); float64, a 1-D array is a diagonal.
    """

    inputs: dict[str, np.ndarray]
    grads: dict[str, np.ndarray]
    tokens: int


def host_stats(
    model: Any,
    tensors: dict[str, Any],
    *,
    scaling: float | dict[str, float] = 1.0,
    sequences: int = CALIBRATION_SEQUENCES,
    length: int = CALIBRATION_LENGTH,
    seed: int = 0,
    batch_size: int = 64,
) -> HostStats:
    """C and G of every layer the LoRA ``tensors`` adapts, measured on ``model`` (the base model, a
    Hugging Face causal LM) running that LoRA at ``scaling`` (alpha/r; one value or one per module), on
    text the base model samples from its BOS token. Deterministic for a given ``seed``."""
    pairs = lora_pairs(tensors)
    if not pairs:
        raise UnsupportedError("no LoRA factor pairs (lora_A / lora_B) found")
    layers = dict(model.named_modules())
    missing = [m for m in pairs if m not in layers]
    if missing:
        raise InvalidArgumentError(
            f"the host model has no layer {missing[0]!r} that the LoRA adapts",
            hint="pass the base model the cube was made for",
        )
    was_training = model.training
    model.eval()
    try:
        ids, valid = _sample_text(model, sequences, length, seed, batch_size)
        return _layer_moments(model, layers, pairs, scaling, ids, valid, batch_size)
    finally:
        model.train(was_training)


def _token_id(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return None


def _sample_text(model: Any, n: int, length: int, seed: int, batch_size: int) -> tuple[Any, Any]:
    """(ids, valid): n sequences sampled at temperature 1 from BOS; valid marks tokens up to the first EOS."""
    import torch

    device = next(model.parameters()).device
    bos = _token_id(model.config, "bos_token_id", "eos_token_id") or 0
    eos = _token_id(model.config, "eos_token_id")
    pad = _token_id(model.config, "pad_token_id", "eos_token_id") or 0
    rows = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        for start in range(0, n, batch_size):
            cur = torch.full((min(batch_size, n - start), 1), bos, dtype=torch.long, device=device)
            out = model.generate(
                input_ids=cur, attention_mask=torch.ones_like(cur), do_sample=True, temperature=1.0, top_k=0,
                top_p=1.0, max_new_tokens=length, min_new_tokens=1, pad_token_id=pad,
            )  # fmt: skip
            rows.append(torch.nn.functional.pad(out, (0, length + 1 - out.shape[1]), value=pad))
    ids = torch.cat(rows)
    valid = torch.ones_like(ids, dtype=torch.bool)
    if eos is not None:
        hit = (ids[:, 1:] == eos).long()
        valid[:, 1:] = (torch.cumsum(hit, 1) - hit) == 0  # up to and including the first EOS
    return ids, valid


def _layer_moments(
    model: Any,
    layers: dict[str, Any],
    pairs: dict[str, tuple[Any, Any]],
    scaling: float | dict[str, float],
    ids: Any,
    valid: Any,
    batch_size: int,
) -> HostStats:
    import torch

    device = next(model.parameters()).device
    sums_c: dict[str, Any] = {}
    sums_g: dict[str, Any] = {}
    outputs: dict[str, Any] = {}
    masks: dict[str, Any] = {}

    def accumulate(store: dict[str, Any], mod: str, rows: Any, mask: str) -> None:
        rows = rows.detach().to(torch.float64).reshape(-1, rows.shape[-1])
        if rows.shape[0] == masks[mask].numel():
            rows = rows[masks[mask].to(rows.device)]
        add = rows.T @ rows if rows.shape[1] <= _FULL_DIM else (rows * rows).sum(0)
        store[mod] = add if mod not in store else store[mod] + add

    def hook_for(mod: str, a: Any, b: Any, scale: float) -> Any:
        def hook(_module: Any, args: tuple[Any, ...], out: Any) -> Any:
            x = args[0]
            accumulate(sums_c, mod, x, "in")
            out = out + (scale * ((x.to(a.dtype) @ a.T) @ b.T)).to(out.dtype)  # the LoRA, applied
            outputs[mod] = out
            return out

        return hook

    hooks = []
    try:
        for mod, (a, b) in pairs.items():
            scale = scaling.get(mod, 1.0) if isinstance(scaling, dict) else scaling
            dtype = next(layers[mod].parameters()).dtype
            a_t = a.detach().to(device=device, dtype=dtype)
            b_t = b.detach().to(device=device, dtype=dtype)
            hooks.append(layers[mod].register_forward_hook(hook_for(mod, a_t, b_t, float(scale))))
        embed = model.get_input_embeddings()
        with torch.enable_grad():
            for start in range(0, ids.shape[0], batch_size):
                x_ids, ok = ids[start : start + batch_size], valid[start : start + batch_size]
                has_label = torch.zeros_like(ok)
                has_label[:, :-1] = ok[:, 1:]  # position t predicts token t+1 (a sample from the model)
                masks["in"], masks["label"] = ok.reshape(-1).cpu(), has_label.reshape(-1).cpu()
                outputs.clear()
                emb = embed(x_ids).detach().requires_grad_(True)  # so every layer output takes a gradient
                logits = model(inputs_embeds=emb, use_cache=False).logits[:, :-1].float()
                logp = torch.log_softmax(logits, -1).gather(-1, x_ids[:, 1:, None])[..., 0]
                total = (logp * has_label[:, :-1].to(logp.dtype)).sum()
                mods = list(outputs)
                for mod, g in zip(mods, torch.autograd.grad(total, [outputs[m] for m in mods]), strict=True):
                    accumulate(sums_g, mod, g, "label")
    finally:
        for h in hooks:
            h.remove()
    n_in = int(valid.sum())
    n_label = int(valid[:, 1:].sum())
    return HostStats(
        inputs={m: (v / n_in).cpu().numpy() for m, v in sums_c.items()},
        grads={m: (v / n_label).cpu().numpy() for m, v in sums_g.items()},
        tokens=n_in,
    )


# -- embedding --------------------------------------------------------------------------------------


def _damped_inv(m: np.ndarray) -> np.ndarray:
    """(M + λ·mean eigenvalue·I)⁻¹ (λ = _DAMPING); a 1-D M is a diagonal and so is the result."""
    scale = _DAMPING * max(float(np.trace(m) if m.ndim == 2 else m.sum()) / m.shape[0], 1e-30)
    if m.ndim == 1:
        return 1.0 / (m + scale)
    return np.linalg.inv(m + scale * np.eye(m.shape[0]))


def _lmul(m: np.ndarray, x: np.ndarray) -> np.ndarray:
    return m[:, None] * x if m.ndim == 1 else m @ x


def _rmul(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    return x * m[None, :] if m.ndim == 1 else x @ m


def _sandwich(u: np.ndarray, m: np.ndarray) -> np.ndarray:
    """uᵀ·M·u."""
    return (u.T * m) @ u if m.ndim == 1 else u.T @ (m @ u)


@dataclass
class _Module:
    a: np.ndarray  # r×in, float64
    b: np.ndarray  # out×r
    q: np.ndarray  # out×in pattern
    c: np.ndarray | None = None  # C, G and their damped inverses (host-aware only)
    g: np.ndarray | None = None
    c_inv: np.ndarray | None = None
    g_inv: np.ndarray | None = None


def _z(factors: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> float:
    """z of (a, b, q) triples, as Correlator computes it (in float64, from the factors)."""
    num = den = 0.0
    for a, b, q in factors:
        num += float(np.sum((b.T @ q) * a))  # ⟨B·A, Q⟩
        den += float(np.sum((b.T @ b) * (a @ a.T)))  # ‖B·A‖²
    return num / math.sqrt(den) if den > 0 else 0.0


def _b_piece(m: _Module, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(δB for a unit piece, its gain ⟨δ, Q⟩, its cost tr(G δ C δᵀ)): δ = Y·Vᵀ, Y = G⁻¹(I−P_U)QV(VᵀCV)⁻¹."""
    assert m.c is not None and m.g is not None and m.g_inv is not None
    u = np.linalg.qr(b)[0]
    v = np.linalg.qr(a.T)[0]
    qv = m.q @ v
    y = _lmul(m.g_inv, qv - u @ (u.T @ qv)) @ _damped_inv(_sandwich(v, m.c))
    gain = float(np.sum(y * qv))
    cost = float(np.sum((y.T @ _lmul(m.g, y)) * _sandwich(v, m.c)))
    return y @ (v.T @ np.linalg.pinv(a)), gain, cost


def _a_piece(m: _Module, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(δA for a unit piece, gain, cost): δ = U·X, X = (UᵀGU)⁻¹ UᵀQ C⁻¹."""
    assert m.c is not None and m.g is not None and m.c_inv is not None
    u = np.linalg.qr(b)[0]
    uq = u.T @ m.q
    ugu = _sandwich(u, m.g)
    x = _rmul(_damped_inv(ugu) @ uq, m.c_inv)
    gain = float(np.sum(x * uq))
    cost = float(np.sum((ugu @ x) * _rmul(x, m.c)))
    return np.linalg.pinv(b) @ (u @ x), gain, cost


def _host_aware(mods: dict[str, _Module], s: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Factors after _ROUNDS rounds of (B half, A half), each piece at coefficient s·gain/cost/_ROUNDS."""
    out = {}
    for name, m in mods.items():
        a, b = m.a, m.b
        for _ in range(_ROUNDS):
            d_b, gain, cost = _b_piece(m, a, b)
            if cost > 0:
                b = b + (s / _ROUNDS) * (gain / cost) * d_b
            d_a, gain, cost = _a_piece(m, a, b)
            if cost > 0:
                a = a + (s / _ROUNDS) * (gain / cost) * d_a
        out[name] = (a, b)
    return out


def _model_free(mods: dict[str, _Module], energy: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """ΔW + α_m·P_T(Q_m), each module carrying the fraction ``energy`` of its own energy."""
    out = {}
    for name, m in mods.items():
        u = np.linalg.qr(m.b)[0]
        v = np.linalg.qr(m.a.T)[0]
        dw_norm = float(np.linalg.norm(m.b @ m.a))
        alpha = math.sqrt(energy) * dw_norm / float(np.linalg.norm(_tangent(m.q, u, v)))
        new_b = m.b + alpha * (m.q @ np.linalg.pinv(m.a))  # δB·A = α·Q·P_V
        new_a = m.a + alpha * (np.linalg.pinv(m.b) @ (m.q - (m.q @ v) @ v.T))  # B·δA = α·P_U·Q·(I − P_V)
        out[name] = (new_a, new_b)
    return out


def _solve(z_of: Any, target: float, guess: float, upper: float = math.inf) -> float:
    """The smallest strength s ≤ upper with z_of(s) ≥ target, to 1e-4 relative (in z or in s).

    z grows smoothly and almost linearly with s, so after bracketing the root, regula falsi with the
    Illinois fix takes a handful of evaluations where bisection took ~20 (each evaluation re-embeds every
    module: the cost of a host-aware mark is this count).
    """
    z_lo = z_of(0.0)
    if z_lo >= target:
        return 0.0
    lo, hi = 0.0, min(guess, upper)
    z_hi = z_of(hi)
    while z_hi < target:
        if hi >= upper:
            return upper  # capped: the mark stays below target
        lo, z_lo = hi, z_hi
        hi = min(hi * 2.0, upper)
        if hi > 1e12 * max(guess, 1e-300):
            raise UnsupportedError("cannot reach the watermark strength on this LoRA")
        z_hi = z_of(hi)
    tol = 1e-4 * target
    side = 0
    for _ in range(60):
        if z_hi - target <= tol or hi - lo <= 1e-4 * hi:
            break
        mid = hi - (z_hi - target) * (hi - lo) / (z_hi - z_lo)
        if not lo < mid < hi:
            mid = 0.5 * (lo + hi)
        z_mid = z_of(mid)
        if z_mid >= target:
            hi, z_hi = mid, z_mid
            if side == 1:
                z_lo = target + 0.5 * (z_lo - target)
            side = 1
        else:
            lo, z_lo = mid, z_mid
            if side == -1:
                z_hi = target + 0.5 * (z_hi - target)
            side = -1
    return hi


def mark_tensors(
    tensors: dict[str, torch.Tensor],
    secret: bytes,
    mark_id: str,
    *,
    target_z: float = TARGET_Z,
    stats: HostStats | None = None,
) -> dict[str, torch.Tensor]:
    """Return a copy of the LoRA tensors with the mark for ``mark_id`` embedded (same names, dtypes).

    With ``stats`` (from :func:`host_stats` on the cube's base model) the mark is host-aware, else
    model-free (see the module docstring)."""
    import torch

    pairs = lora_pairs(tensors)
    if not pairs:
        raise UnsupportedError("no LoRA factor pairs (lora_A / lora_B) found to watermark")
    mods: dict[str, _Module] = {}
    for name, (a_t, b_t) in pairs.items():
        a = a_t.detach().to(torch.float64).cpu().numpy()
        b = b_t.detach().to(torch.float64).cpu().numpy()
        dw_norm = float(np.linalg.norm(b @ a))
        if dw_norm == 0.0 or not math.isfinite(dw_norm):
            continue  # an untrained module (B = 0 at init) carries no signal and could not hide one
        q = pattern(secret, mark_id, name, (b.shape[0], a.shape[1])).astype(np.float64)
        mods[name] = _Module(a=a, b=b, q=q)
    if not mods:
        raise UnsupportedError("every LoRA module is zero: nothing to watermark")

    def z_of(new: dict[str, tuple[np.ndarray, np.ndarray]]) -> float:
        return _z((a, b, mods[n].q) for n, (a, b) in new.items())

    if stats is not None:
        for name, m in mods.items():
            c, g = stats.inputs.get(name), stats.grads.get(name)
            if c is None or g is None or c.shape[0] != m.a.shape[1] or g.shape[0] != m.b.shape[0]:
                raise InvalidArgumentError(
                    f"the host statistics do not cover module {name!r} as the LoRA has it"
                )
            m.c, m.g, m.c_inv, m.g_inv = c, g, _damped_inv(c), _damped_inv(g)
        # First guess: the first B half alone, linearized (z grows by s·Σ gain²/cost / ‖ΔW‖).
        first = [_b_piece(m, m.a, m.b) for m in mods.values()]
        slope = sum(gain * gain / cost for _, gain, cost in first if cost > 0)
        norm = math.sqrt(sum(float(np.sum((m.b @ m.a) ** 2)) for m in mods.values()))
        s = _solve(
            lambda x: z_of(_host_aware(mods, x)), target_z, max(target_z * norm / max(slope, 1e-300), 1e-300)
        )
        new = _host_aware(mods, s)
    else:
        total_t = sum(m.a.shape[0] * (m.a.shape[1] + m.b.shape[0] - m.a.shape[0]) for m in mods.values())
        energy = _solve(lambda e: z_of(_model_free(mods, e)), target_z, target_z**2 / total_t, MAX_ENERGY)
        new = _model_free(mods, energy)
    out = dict(tensors)
    for name, (a, b) in new.items():
        a_name, b_name = _names_of(tensors, name)
        out[a_name] = torch.from_numpy(a).to(tensors[a_name].dtype)
        out[b_name] = torch.from_numpy(b).to(tensors[b_name].dtype)
    return out


def _names_of(tensors: dict[str, Any], module: str) -> tuple[str, str]:
    found: dict[str, str] = {}
    for name in tensors:
        m = _KEY_RE.match(name)
        if m and m["module"] == module:
            found[m["part"]] = name
    return found["lora_A"], found["lora_B"]


def mark_payload(payload: bytes, secret: bytes, mark_id: str, *, stats: HostStats | None = None) -> bytes:
    """Watermark a LoRA cube's safetensors payload; return the new payload (metadata kept)."""
    from safetensors import safe_open  # noqa: F401  (import check: safetensors is a dependency)

    from memfed.cube.payload import decode_tensors, encode_tensors, read_header

    metadata = read_header(payload).get("__metadata__")
    marked = mark_tensors(decode_tensors(payload), secret, mark_id, stats=stats)
    return encode_tensors(marked, metadata=metadata)


# -- detection ------------------------------------------------------------------------------------


class Correlator:
    """The suspect's ΔW per module, computed once, correlated with any number of keyed patterns."""

    def __init__(self, tensors: dict[str, Any]) -> None:
        import torch

        self.deltas: dict[str, np.ndarray] = {}
        for mod, (a, b) in lora_pairs(tensors).items():
            if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
                continue
            dw = b.detach().to(torch.float32).cpu() @ a.detach().to(torch.float32).cpu()
            self.deltas[mod] = np.ascontiguousarray(dw.numpy(), dtype=np.float32)
        if not self.deltas:
            raise UnsupportedError("the file holds no LoRA factor pairs (lora_A / lora_B) to test")
        self.norm = math.sqrt(sum(float(np.square(d, dtype=np.float64).sum()) for d in self.deltas.values()))

    def z(self, secret: bytes, mark_id: str) -> float:
        if self.norm == 0.0:
            return 0.0
        num = 0.0
        for mod, dw in self.deltas.items():
            q = pattern(secret, mark_id, mod, dw.shape)  # type: ignore[arg-type]
            # float32 dot: each term's rounding error is ~1e-7 relative, far below z's resolution.
            num += float(np.vdot(dw, q))
        return num / self.norm


@dataclass
class Detection:
    best_mark_id: str | None
    best_z: float
    threshold: float
    candidates: list[dict[str, Any]] = field(default_factory=list)

    @property
    def detected(self) -> bool:
        return self.best_z >= self.threshold

    def to_dict(self) -> dict[str, Any]:
        best = self.candidates[0] if self.candidates else {}
        return {
            "scheme": SCHEME,
            "detected": self.detected,
            "z": self.best_z,
            "threshold": self.threshold,
            "most_likely_recipient": best.get("recipient_fingerprints") if self.detected else None,
            "mark_id": self.best_mark_id if self.detected else None,
            "candidates": self.candidates,
        }

    def summary(self) -> str:
        if not self.candidates:
            return "no recorded exports to test against (the owner's ledger is empty)"
        best = self.candidates[0]
        verdict = "WATERMARK FOUND" if self.detected else "no watermark found"
        who = ", ".join(best["recipient_fingerprints"]) or best["mark_id"]
        return (
            f"{verdict}: z = {self.best_z:.2f} (threshold {self.threshold}); most likely recipient {who} "
            f"({best['cube_ref']}); {len(self.candidates)} candidates tested"
        )


def detect(
    tensors: dict[str, Any],
    secret: bytes,
    candidates: Sequence[tuple[str, dict[str, Any]]],
    *,
    threshold: float = Z_THRESHOLD,
) -> Detection:
    """z for each candidate (mark id, info) and the most likely one."""
    corr = Correlator(tensors)
    seen: dict[str, dict[str, Any]] = {}
    for mark_id, info in candidates:
        if mark_id not in seen:
            seen[mark_id] = {"mark_id": mark_id, "z": corr.z(secret, mark_id), **info}
    ranked = sorted(seen.values(), key=lambda c: -c["z"])
    best = ranked[0] if ranked else None
    return Detection(best["mark_id"] if best else None, best["z"] if best else 0.0, threshold, ranked)


def load_lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a cube payload (.safetensors) or a PEFT folder. Never reads pickles."""
    from memfed.cube.payload import decode_tensors

    path = Path(path)
    if path.is_dir():
        path = path / "adapter_model.safetensors"
    if path.suffix == ".mcube":
        raise InvalidArgumentError(
            "a sealed .mcube cannot be tested without opening it",
            hint="import it (memfed cube import) and test the payload, or pass the leaked weights file",
        )
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"no file {path}") from None
    return decode_tensors(data)


def detect_file(path: Path, secret: bytes, records: Iterable[ExportRecord]) -> Detection:
    """Test a weights file against every export the owner recorded."""
    cands = [
        (
            r.mark_id,
            {"cube_ref": r.cube_ref, "recipient_fingerprints": r.fingerprints, "recipients": r.recipients},
        )
        for r in records
        if r.scheme == SCHEME
    ]
    return detect(load_lora_tensors(path), secret, cands)
