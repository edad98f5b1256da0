"""The GRACE-style codebook (Hartvigsen et al., 2023) and the forward hook that applies it.

A codebook lives at one layer's MLP down-projection. Each entry holds a *key* (the down-projection's
inputs at a subject's last few tokens), a *radius* and a *value*. When the model runs, the hook compares
the input at every token, together with the tokens before it, to every key; where an entry matches, the
layer's output at that token is replaced by the entry's value (``mode="replace"``, GRACE's rule) or has it
added (``mode="add"``). Base weights never change, and an input far from every key passes through
untouched, so thousands of edits do not erode what the model knew; removing the hook is removing the
whole codebook.

Why a window of tokens: a key read at one token is not specific enough. In a small model a multi-token
name's last token ("… Lutir") is shared by many names and its input vector mostly says "the token
Lutir"; matching the subject's last ``window`` tokens at once (every one within the radius) tells
"Zeistorn Lutir" from "Kaben Lutir". On the embedded model, with 100 keys, a 3-token window keeps every
other subject's prompts out of a relative radius of 0.7, where single-token keys let 58% in.

Distances are relative: ‖x − k‖ / ‖k‖ per window position, the largest over the window is compared with
the entry's radius, so one radius suits layers of any scale.

Generation with a KV cache feeds one token per call; the hook keeps the last ``window − 1`` inputs of
the previous call and, for a one-token call with the same batch size, reads the window across the call
boundary. A call with more than one token starts afresh.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from memfed.errors import InvalidArgumentError

Mode = Literal["replace", "add"]


@dataclass
class Codebook:
    """Keys, values and radii at one layer, plus the edit records (what each entry says).

    ``keys[i, w]`` is the input at the subject's last token minus ``w``; rows past ``key_len[i]`` are
    zero and ignored. ``edit_index[i]`` names the record an entry belongs to (a subject edited for two
    relations shares one entry, one value and two records).
    """

    layer: int
    module: str
    keys: torch.Tensor  # (n, window, key_dim)
    key_len: torch.Tensor  # (n,) int64
    values: torch.Tensor  # (n, value_dim)
    radii: torch.Tensor  # (n,) relative radius
    mode: Mode = "add"
    records: list[dict[str, Any]] = field(default_factory=list)  # one per edit (prompt, subject, target, ...)
    entry_records: list[list[int]] = field(default_factory=list)  # per entry: indices into records
    version: int = 0  # bumped on every change, so hooks refresh their device copies

    def touch(self) -> None:
        """Say that tensors were changed in place (values or radii of existing entries)."""
        self.version += 1

    @classmethod
    def empty(
        cls, layer: int, module: str, key_dim: int, value_dim: int, window: int, mode: Mode = "add"
    ) -> Codebook:
        if window < 1:
            raise InvalidArgumentError(f"the key window must be at least 1 token, got {window}")
        if mode not in ("replace", "add"):
            raise InvalidArgumentError(f"codebook mode must be 'replace' or 'add', got {mode!r}")
        return cls(
            layer=layer,
            module=module,
            keys=torch.zeros(0, window, key_dim),
            key_len=torch.zeros(0, dtype=torch.long),
            values=torch.zeros(0, value_dim),
            radii=torch.zeros(0),
            mode=mode,
        )

    @property
    def size(self) -> int:
        return int(self.keys.shape[0])

    @property
    def window(self) -> int:
        return int(self.keys.shape[1])

    def add_entry(self, key: torch.Tensor, value: torch.Tensor, radius: float, record_ids: list[int]) -> int:
        """Append an entry; ``key`` is (w, key_dim) with w ≤ window, last token first."""
        w = min(int(key.shape[0]), self.window)
        row = torch.zeros(1, self.window, self.keys.shape[2], dtype=self.keys.dtype)
        row[0, :w] = key[:w].to(self.keys.dtype)
        self.keys = torch.cat([self.keys, row])
        self.key_len = torch.cat([self.key_len, torch.tensor([w])])
        self.values = torch.cat([self.values, value.reshape(1, -1).to(self.values.dtype)])
        self.radii = torch.cat([self.radii, torch.tensor([float(radius)])])
        self.entry_records.append(list(record_ids))
        self.touch()
        return self.size - 1

    def distances(self, keys: torch.Tensor) -> torch.Tensor:
        """Window distance from entry-shaped ``keys`` (m, window, d) (with their lengths as in this
        codebook's convention: zero rows unused) to every entry: (m, n)."""
        out = torch.zeros(keys.shape[0], self.size)
        if not self.size or not keys.shape[0]:
            return out
        norms = self.keys.norm(dim=-1).clamp_min(1e-6)  # (n, window)
        for w in range(self.window):
            d = torch.cdist(keys[:, w].float(), self.keys[:, w].float()) / norms[:, w]
            used = (self.key_len > w).unsqueeze(0) & (keys[:, w].abs().sum(-1) > 0).unsqueeze(1)
            out = torch.where(used, torch.maximum(out, d), out)
        return out

    # -- serialization ----------------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "keys": self.keys.float().contiguous(),
            "key_len": self.key_len.to(torch.int32).contiguous(),
            "values": self.values.float().contiguous(),
            "radii": self.radii.float().contiguous(),
        }

    def metadata(self) -> dict[str, str]:
        """What goes into the payload's safetensors header (covered by the payload digest)."""
        return {
            "memfed.codebook": "1",
            "layer": str(self.layer),
            "module": self.module,
            "mode": self.mode,
            "records": json.dumps(self.records, ensure_ascii=False, separators=(",", ":")),
            "entry_records": json.dumps(self.entry_records, separators=(",", ":")),
        }

    @classmethod
    def from_parts(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Codebook:
        """Rebuild from payload tensors and header metadata; malformed input raises InvalidArgumentError."""
        try:
            keys, key_len, values, radii = (tensors[k] for k in ("keys", "key_len", "values", "radii"))
            layer, module, mode = int(meta["layer"]), meta["module"], meta.get("mode", "add")
            records = json.loads(meta.get("records", "[]"))
            entry_records = json.loads(meta.get("entry_records", "[]"))
        except (KeyError, ValueError) as exc:
            raise InvalidArgumentError(f"not a codebook payload: {exc}") from exc
        n = int(keys.shape[0]) if keys.dim() == 3 else -1
        if (
            n < 0
            or tuple(key_len.shape) != (n,)
            or values.dim() != 2
            or values.shape[0] != n
            or tuple(radii.shape) != (n,)
        ):
            raise InvalidArgumentError(
                f"codebook tensors do not agree: keys {tuple(keys.shape)}, key_len {tuple(key_len.shape)}, "
                f"values {tuple(values.shape)}, radii {tuple(radii.shape)}"
            )
        if mode not in ("replace", "add"):
            raise InvalidArgumentError(f"codebook mode {mode!r} is unknown")
        if len(entry_records) != n:
            entry_records = [[] for _ in range(n)]
        return cls(layer, module, keys.float().clone(), key_len.long().clone(), values.float().clone(),
                   radii.float().clone(), mode, records, entry_records)  # fmt: skip


class CodebookHook:
    """Runs a codebook on its layer: ``attach`` installs the forward hook, ``remove`` takes it away.

    ``enabled`` can be switched off without removing the hook (used to read the unedited outputs).
    Statistics of the last forward (how many tokens matched) help debugging and tests.
    """

    def __init__(self, model: torch.nn.Module, codebook: Codebook) -> None:
        self.model = model
        self.codebook = codebook
        self.enabled = True
        self.last_matches = 0
        self._tail: torch.Tensor | None = None
        self._handle: Any = None
        self._cache: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def attach(self) -> CodebookHook:
        if self._handle is None:
            module = self.model.get_submodule(self.codebook.module)
            self._handle = module.register_forward_hook(self._hook)
        return self

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._tail = None

    def __enter__(self) -> CodebookHook:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _tensors(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        cb = self.codebook
        stamp = cb.version
        if self._cache is None or self._cache[0] != stamp:
            keys = cb.keys.to(device=device, dtype=torch.float32)
            self._cache = (
                stamp,
                keys,
                keys.norm(dim=-1).clamp_min(1e-6),
                cb.values.to(device=device, dtype=dtype),
                cb.radii.to(device=device),
            )
        return self._cache[1:]

    @torch.no_grad()
    def _hook(self, module: torch.nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
        cb = self.codebook
        x = args[0]
        if not self.enabled or cb.size == 0:
            self.last_matches = 0
            return None
        if x.dim() != 3:  # only (batch, tokens, features) inputs come from a language model's forward
            return None
        keys, norms, values, radii = self._tensors(x.device, out.dtype)
        b, t, d = x.shape
        win = cb.window
        ctx = x
        if t == 1 and self._tail is not None and self._tail.shape[0] == b and win > 1:
            ctx = torch.cat([self._tail, x], dim=1)
        self._tail = ctx[:, -(win - 1) :].detach() if win > 1 else None
        offset = ctx.shape[1] - t  # positions of x inside ctx
        flat = x.reshape(-1, d).float()
        # Offset 0 for every (token, entry); the other window positions only for the candidates.
        dist = torch.cdist(flat, keys[:, 0]) / norms[:, 0]
        cand = (dist <= radii).nonzero()
        if cand.numel() == 0:
            self.last_matches = 0
            return None
        tok, ent = cand[:, 0], cand[:, 1]
        worst = dist[tok, ent]
        row, pos = tok // t, tok % t + offset
        klen = cb.key_len.to(x.device)[ent]
        for w in range(1, win):
            needs = klen > w
            if not bool(needs.any()):
                break
            p = pos - w
            ok = p >= 0
            prev = ctx[row, p.clamp_min(0)].float()
            dw = (prev - keys[ent, w]).norm(dim=-1) / norms[ent, w]
            dw = torch.where(ok, dw, torch.full_like(dw, float("inf")))
            worst = torch.where(needs, torch.maximum(worst, dw), worst)
        hit = worst <= radii[ent]
        if not bool(hit.any()):
            self.last_matches = 0
            return None
        tok, ent, score = tok[hit], ent[hit], (worst / radii[ent].clamp_min(1e-9))[hit]
        # The closest entry (relative to its radius) wins where several match one token.
        best = torch.full((b * t,), float("inf"), device=x.device).scatter_reduce(0, tok, score, "amin")
        keep = score <= best[tok]
        tok, ent = tok[keep], ent[keep]
        flat_out = out.reshape(b * t, -1).clone()
        if cb.mode == "replace":
            flat_out[tok] = values[ent]
        else:
            flat_out[tok] = flat_out[tok] + values[ent]
        self.last_matches = int(tok.numel())
        return flat_out.view_as(out)
