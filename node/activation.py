"""Activation memory: reuse the KV cache of a conversation's prefix instead of recomputing it.

A continuing dialogue re-sends its whole history every turn. The keys and values the model computed for
that history last turn are still valid as long as (a) the tokens are the same, and (b) the same weights
produced them: a cache computed with a LoRA active is wrong for any other set of modules. So an entry is
keyed by ``(conversation_id, module_key)``, where ``module_key`` names the base model and every parameter
module that was active; a lookup under another module key never sees it.

``lookup`` finds the longest common prefix between the stored tokens and the new prompt and hands back a
*fresh* ``DynamicCache`` holding only that prefix, leaving at least one prompt token to run, since the
model must produce logits for the last position. ``prefill_with_reuse`` then runs the model on the
uncached suffix only, with explicit position ids, and stores the grown cache for the next turn.

Copies and ownership (transformers 5.x ``DynamicCache``, whose ``DynamicLayer.update`` grows its keys and
values with ``torch.cat``):

* ``put`` clones every layer's keys and values (detached, contiguous, sliced to the cached length). The
  store owns those tensors and never hands them out, so nothing the caller does to its cache afterwards
  (generation appends to it; ``crop``; in-place writes of another cache class) can reach a stored entry.
* ``lookup`` builds a new ``DynamicCache`` by ``update``-ing empty layers with slices of the stored
  tensors. ``DynamicLayer.update`` concatenates onto an empty tensor, which allocates, so the returned
  cache holds its own copy of exactly the prefix (no views into the store) and the caller may extend or
  mutate it freely. The copy is a memcpy of the prefix, far cheaper than recomputing it.
* Only plain ``DynamicCache`` objects whose layers are all full-attention ``DynamicLayer`` s can be
  stored: a sliding-window, quantized, static or linear-attention layer does not keep every position,
  so it cannot be cropped to an arbitrary prefix. ``KVCacheStore.supports`` says which; ``put`` refuses
  the others with ``UnsupportedError``. ``prefill_with_reuse`` always computes into a plain
  ``DynamicCache`` (all positions kept), so everything it makes is storable.

The store keeps entries in LRU order under a byte budget (the bytes of the stored key/value tensors, on
whatever device they live); an entry larger than the whole budget is not stored (counted as rejected).
Batch size 1 only: one entry is one conversation.
"""

from __future__ import annotations

import inspect
import math
import statistics
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from memfed.cube.fingerprint import unwrap_base_model
from memfed.errors import InvalidArgumentError, UnsupportedError

if TYPE_CHECKING:
    from transformers import DynamicCache

TokenIds = Sequence[int] | torch.Tensor


@dataclass(frozen=True)
class KVStoreStats:
    """A snapshot of a store's counters and occupancy."""

    hits: int
    misses: int
    tokens_reused: int
    puts: int
    evictions: int
    expired: int
    rejected: int  # puts not stored because the entry alone exceeds the budget
    entries: int
    bytes_used: int
    budget_bytes: int


@dataclass
class _Entry:
    tokens: torch.Tensor  # 1-D int64 on the CPU, exactly the positions the layers cover
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values): [1, heads, seq, head_dim]
    nbytes: int
    last_used: float


def _as_token_tensor(token_ids: TokenIds, what: str = "token_ids") -> torch.Tensor:
    """``token_ids`` as a 1-D int64 CPU tensor; accepts a list, a 1-D tensor or a ``[1, n]`` tensor."""
    if isinstance(token_ids, torch.Tensor):
        t = token_ids.detach()
        if t.dim() == 2:
            if t.shape[0] != 1:
                raise InvalidArgumentError(
                    f"{what} has batch size {t.shape[0]}",
                    hint="activation memory holds one conversation per entry",
                )
            t = t[0]
        if t.dim() != 1:
            raise InvalidArgumentError(f"{what} must be 1-D or [1, n], got shape {tuple(token_ids.shape)}")
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise InvalidArgumentError(f"{what} must hold integer token ids, got {t.dtype}")
        return t.to(device="cpu", dtype=torch.long)
    if isinstance(token_ids, str | bytes):
        raise InvalidArgumentError(f"{what} must be token ids, not text", hint="tokenize the prompt first")
    try:
        return torch.tensor(list(token_ids), dtype=torch.long)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidArgumentError(f"{what} must be a sequence of ints ({exc})") from exc


def _common_prefix_len(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(a.numel(), b.numel())
    if n == 0:
        return 0
    mismatch = torch.nonzero(a[:n] != b[:n])
    return int(mismatch[0, 0]) if mismatch.numel() else n


def _plain_layers(cache: Any) -> list[Any] | None:
    """The cache's layers when it is a plain, croppable, full-attention ``DynamicCache``; else None."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if type(cache) is not DynamicCache:
        return None
    layers = list(cache.layers)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    return layers


def cache_nbytes(cache: Any) -> int:
    """Bytes of the key and value tensors a cache holds (0 for uninitialized layers)."""
    total = 0
    for layer in getattr(cache, "layers", ()):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


class KVCacheStore:
    """Stored KV caches of conversation prefixes, keyed by ``(conversation_id, module_key)``, LRU under a
    byte budget. Thread-safe.

    ``ttl_s``: an entry not used (put or hit) for that long is dropped at the next access of the store.
    ``min_reuse_tokens``: a shorter common prefix counts as a miss (copying a tiny prefix saves nothing).
    ``clock``: seconds, monotonic; injectable for tests.
    """

    def __init__(
        self,
        budget_bytes: int,
        *,
        ttl_s: float | None = None,
        min_reuse_tokens: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(budget_bytes, int) or isinstance(budget_bytes, bool) or budget_bytes < 0:
            raise InvalidArgumentError(f"budget_bytes must be an int >= 0, not {budget_bytes!r}")
        if ttl_s is not None and not (ttl_s > 0 and math.isfinite(ttl_s)):
            raise InvalidArgumentError(f"ttl_s must be a positive number of seconds or None, not {ttl_s!r}")
        if min_reuse_tokens < 1:
            raise InvalidArgumentError(f"min_reuse_tokens must be >= 1, not {min_reuse_tokens}")
        self.budget_bytes = budget_bytes
        self.ttl_s = ttl_s
        self.min_reuse_tokens = min_reuse_tokens
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()  # LRU first
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.tokens_reused = 0
        self.puts = 0
        self.evictions = 0
        self.expired = 0
        self.rejected = 0

    # -- queries ----------------------------------------------------------------------------------------

    @staticmethod
    def supports(cache: Any) -> bool:
        """Whether ``put`` can store this cache (a plain ``DynamicCache`` of full-attention layers)."""
        layers = _plain_layers(cache)
        return layers is not None and all(layer.is_initialized for layer in layers)

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def stats(self) -> KVStoreStats:
        with self._lock:
            return KVStoreStats(
                hits=self.hits,
                misses=self.misses,
                tokens_reused=self.tokens_reused,
                puts=self.puts,
                evictions=self.evictions,
                expired=self.expired,
                rejected=self.rejected,
                entries=len(self._entries),
                bytes_used=self._bytes,
                budget_bytes=self.budget_bytes,
            )

    def stored_tokens(self, conversation_id: str, module_key: str) -> list[int] | None:
        """The token ids the entry covers, or None; does not count as a use."""
        with self._lock:
            entry = self._entries.get((conversation_id, module_key))
            return None if entry is None else entry.tokens.tolist()

    # -- writes -----------------------------------------------------------------------------------------

    def put(self, conversation_id: str, module_key: str, token_ids: TokenIds, cache: Any) -> bool:
        """Store a copy of ``cache`` as the KV cache of ``token_ids`` for this conversation and module set.

        The cache may cover fewer positions than ``token_ids`` (after ``generate`` the last sampled token
        was never fed back): the entry records the first ``cache.get_seq_length()`` tokens. It replaces
        the conversation's previous entry under the same module key. Returns False, counting it in
        ``rejected``, when the entry alone exceeds the budget; the previous entry, if any, is kept.
        """
        key = _check_key(conversation_id, module_key)
        tokens = _as_token_tensor(token_ids)
        layers = _plain_layers(cache)
        if layers is None:
            raise UnsupportedError(
                f"cannot store a {type(cache).__name__} with layers "
                f"{sorted({type(layer).__name__ for layer in getattr(cache, 'layers', [])})}",
                hint="activation memory stores a plain DynamicCache of full-attention DynamicLayers; "
                "use prefill_with_reuse, or pass cache=DynamicCache() to generate",
            )
        if not all(layer.is_initialized for layer in layers):
            raise UnsupportedError("cannot store a cache with uninitialized (e.g. KV-shared) layers")
        seq = layers[0].keys.shape[-2]
        for layer in layers:
            if layer.keys.shape[0] != 1:
                raise InvalidArgumentError(
                    f"cache has batch size {layer.keys.shape[0]}",
                    hint="activation memory holds one conversation per entry: batch size 1",
                )
            if layer.keys.shape[-2] != seq or layer.values.shape[-2] != seq:
                raise InvalidArgumentError("cache layers cover different numbers of positions")
        if seq == 0:
            raise InvalidArgumentError("cache is empty: nothing to store")
        if tokens.numel() < seq:
            raise InvalidArgumentError(
                f"cache covers {seq} positions but only {tokens.numel()} token ids were given",
                hint="pass the token ids the cache was computed from (prompt plus generated tokens)",
            )
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in _kv(layers))
        now = self._clock()
        with self._lock:
            self._expire_locked(now)
            if nbytes > self.budget_bytes:
                self.rejected += 1
                return False
        # Copy outside the lock: the tensors are the caller's, the store's own state is not touched.
        with torch.no_grad():
            copies = [(_owned_copy(k), _owned_copy(v)) for k, v in _kv(layers)]
        entry = _Entry(tokens=tokens[:seq].clone(), layers=copies, nbytes=nbytes, last_used=now)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[key] = entry
            self._bytes += nbytes
            self.puts += 1
            while self._bytes > self.budget_bytes:
                _, victim = self._entries.popitem(last=False)  # never the new entry: it alone fits
                self._bytes -= victim.nbytes
                self.evictions += 1
        return True

    def drop(self, conversation_id: str, module_key: str | None = None) -> int:
        """Forget a conversation's entries (all module keys, or one). Returns how many were dropped."""
        with self._lock:
            keys = [
                k
                for k in self._entries
                if k[0] == conversation_id and (module_key is None or k[1] == module_key)
            ]
            for k in keys:
                self._bytes -= self._entries.pop(k).nbytes
            return len(keys)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def evict_expired(self) -> int:
        """Drop entries past their TTL now; returns how many."""
        with self._lock:
            return self._expire_locked(self._clock())

    # -- reads ------------------------------------------------------------------------------------------

    def lookup(
        self, conversation_id: str, module_key: str, token_ids: TokenIds
    ) -> tuple[int, DynamicCache | None]:
        """The longest reusable prefix of ``token_ids`` and a fresh cache holding exactly that prefix.

        ``prefix_len`` is at most ``len(token_ids) - 1``, so at least one token is left to compute the
        next-token logits from. Returns ``(0, None)`` on a miss (no entry, entry under another module
        key, or a common prefix shorter than ``min_reuse_tokens``). The returned cache is the caller's:
        it shares no memory with the store.
        """
        key = _check_key(conversation_id, module_key)
        tokens = _as_token_tensor(token_ids)
        now = self._clock()
        with self._lock:
            self._expire_locked(now)
            entry = self._entries.get(key)
            prefix = 0
            if entry is not None:
                prefix = min(_common_prefix_len(entry.tokens, tokens), tokens.numel() - 1)
            if entry is None or prefix < self.min_reuse_tokens:
                self.misses += 1
                return 0, None
            self.hits += 1
            self.tokens_reused += prefix
            entry.last_used = now
            self._entries.move_to_end(key)
            layers = entry.layers  # immutable once stored; safe to read outside the lock
        return prefix, _fresh_cache(layers, prefix)

    # -- internals --------------------------------------------------------------------------------------

    def _expire_locked(self, now: float) -> int:
        if self.ttl_s is None:
            return 0
        stale = [k for k, e in self._entries.items() if now - e.last_used > self.ttl_s]
        for k in stale:
            self._bytes -= self._entries.pop(k).nbytes
        self.expired += len(stale)
        return len(stale)


def _owned_copy(t: torch.Tensor) -> torch.Tensor:
    """A detached, contiguous copy sharing no memory with ``t`` (a cropped layer is a strided view)."""
    return t.detach().clone(memory_format=torch.contiguous_format)


def _kv(layers: list[Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in layers]


def _check_key(conversation_id: str, module_key: str) -> tuple[str, str]:
    if not isinstance(conversation_id, str) or not conversation_id:
        raise InvalidArgumentError(f"conversation_id must be a non-empty string, not {conversation_id!r}")
    if not isinstance(module_key, str) or not module_key:
        raise InvalidArgumentError(
            f"module_key must be a non-empty string, not {module_key!r}",
            hint="name the base model and every active module, e.g. 'base:<fingerprint>+lora:legal@1.2'",
        )
    return conversation_id, module_key


def _fresh_cache(layers: list[tuple[torch.Tensor, torch.Tensor]], prefix: int) -> DynamicCache:
    """A new ``DynamicCache`` holding its own copy of the first ``prefix`` positions of ``layers``."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        for idx, (k, v) in enumerate(layers):
            # DynamicLayer.update concatenates onto an empty tensor: that allocates, so this is a copy.
            cache.update(k[..., :prefix, :], v[..., :prefix, :], idx)
    return cache


# -- running the model with reuse -------------------------------------------------------------------------


@dataclass(frozen=True)
class _ForwardArgs:
    cache_kwarg: str  # "cache" in transformers >= 5.2x, "past_key_values" before
    positions: bool
    cache_position: bool
    logits_to_keep: bool


def _forward_args(model: torch.nn.Module) -> _ForwardArgs:
    params = inspect.signature(unwrap_base_model(model).forward).parameters
    return _ForwardArgs(
        cache_kwarg="cache" if "cache" in params else "past_key_values",
        positions="position_ids" in params,
        cache_position="cache_position" in params,
        logits_to_keep="logits_to_keep" in params,
    )


def cache_kwarg_name(model: torch.nn.Module) -> str:
    """The keyword this model's ``forward`` / ``generate`` take the KV cache under."""
    return _forward_args(model).cache_kwarg


def _output_cache(outputs: Any) -> Any:
    cache = outputs.get("cache") if hasattr(outputs, "get") else None
    return cache if cache is not None else getattr(outputs, "past_key_values", None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _forward(
    model: torch.nn.Module, tokens: torch.Tensor, start: int, cache: Any, args: _ForwardArgs
) -> tuple[torch.Tensor, Any]:
    """Run ``tokens`` (positions ``start..``) on top of ``cache``; (last position's logits, grown cache)."""
    device = _model_device(model)
    n = tokens.numel()
    kwargs: dict[str, Any] = {
        "input_ids": tokens.to(device)[None, :],
        args.cache_kwarg: cache,
        "use_cache": True,
    }
    positions = torch.arange(start, start + n, device=device, dtype=torch.long)
    if args.positions:
        kwargs["position_ids"] = positions[None, :]
    if args.cache_position:
        kwargs["cache_position"] = positions
    if args.logits_to_keep:
        kwargs["logits_to_keep"] = 1
    with torch.no_grad():
        out = model(**kwargs)
    return out.logits[0, -1], _output_cache(out)


def prefill_with_reuse(
    model: torch.nn.Module,
    input_ids: TokenIds,
    store: KVCacheStore,
    conversation_id: str,
    module_key: str,
) -> tuple[torch.Tensor, DynamicCache, int, float]:
    """Prefill ``input_ids`` reusing the conversation's stored prefix; store the grown cache for next turn.

    Returns ``(logits_last, cache, reused_tokens, seconds)``: the next-token logits at the last prompt
    position (1-D, vocabulary size), the cache covering every prompt token (the caller's, e.g. to
    continue with ``generate``; the store keeps its own copy), how many positions came from the store,
    and the wall time of lookup plus forward (time to first token's logits; storing is not included).
    """
    from transformers import DynamicCache

    tokens = _as_token_tensor(input_ids, "input_ids")
    if tokens.numel() == 0:
        raise InvalidArgumentError("input_ids is empty", hint="a prompt needs at least one token")
    args = _forward_args(model)
    device = _model_device(model)
    _sync(device)
    start = time.perf_counter()
    reused, cache = store.lookup(conversation_id, module_key, tokens)
    if cache is None:
        cache = DynamicCache()  # plain full-attention layers: always storable and croppable
    logits, cache = _forward(model, tokens[reused:], reused, cache, args)
    _sync(device)
    seconds = time.perf_counter() - start
    store.put(conversation_id, module_key, tokens, cache)
    return logits, cache, reused, seconds


def generate_with_reuse(
    model: torch.nn.Module,
    input_ids: TokenIds,
    store: KVCacheStore,
    conversation_id: str,
    module_key: str,
    **generate_kwargs: Any,
) -> torch.Tensor:
    """``model.generate`` on ``input_ids`` starting from the conversation's stored prefix cache.

    After generating, the cache of prompt plus reply is stored, so the next turn (which re-sends both)
    reuses all of it. Returns the generated sequences (``[1, prompt + new]``), as ``generate`` does.
    """
    from transformers import DynamicCache

    tokens = _as_token_tensor(input_ids, "input_ids")
    if tokens.numel() == 0:
        raise InvalidArgumentError("input_ids is empty", hint="a prompt needs at least one token")
    args = _forward_args(model)
    _, cache = store.lookup(conversation_id, module_key, tokens)
    if cache is None:
        cache = DynamicCache()
    with torch.no_grad():
        sequences = model.generate(
            input_ids=tokens.to(_model_device(model))[None, :], **{args.cache_kwarg: cache}, **generate_kwargs
        )
    # generate grew `cache` in place; it covers every position but the last sampled token.
    if KVCacheStore.supports(cache) and cache.get_seq_length() > 0:
        store.put(conversation_id, module_key, sequences[0], cache)
    return sequences


# -- measurement ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TTFTResult:
    """Time to the first token's logits for a prompt whose prefix is cached, against a full prefill."""

    prefix_len: int
    suffix_len: int
    recompute_ms: float  # median full prefill of prefix + suffix
    reuse_ms: float  # median lookup (copy of the cached prefix) + prefill of the suffix only
    max_abs_logit_diff: float  # between the two ways, last position

    @property
    def speedup(self) -> float:
        return self.recompute_ms / self.reuse_ms if self.reuse_ms > 0 else math.inf


def _position_limit(model: torch.nn.Module) -> int | None:
    config = getattr(unwrap_base_model(model), "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def ttft_reuse_vs_recompute(
    model: torch.nn.Module,
    prefix_len: int = 1024,
    suffix_len: int = 32,
    *,
    repeats: int = 5,
    seed: int = 0,
    module_key: str = "bench",
) -> TTFTResult:
    """Measure time to first token with and without reusing a cached ``prefix_len``-token prefix.

    Random token ids (seeded), one warm-up of each path, then the median of ``repeats`` runs; each reuse
    run starts from a store holding only the prefix (storing it is not timed). Times in milliseconds.
    """
    from transformers import DynamicCache

    if prefix_len < 1 or suffix_len < 1 or repeats < 1:
        raise InvalidArgumentError("prefix_len, suffix_len and repeats must each be >= 1")
    limit = _position_limit(model)
    if limit is not None and prefix_len + suffix_len > limit:
        raise InvalidArgumentError(
            f"prefix_len + suffix_len = {prefix_len + suffix_len} exceeds the model's {limit} positions",
            hint="use a shorter prefix, or a model configured for longer contexts",
        )
    config = unwrap_base_model(model).config
    vocab = int(config.get_text_config().vocab_size)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (prefix_len + suffix_len,), generator=generator)
    args = _forward_args(model)
    device = _model_device(model)

    _, prefix_cache = _forward(model, tokens[:prefix_len], 0, DynamicCache(), args)

    def recompute() -> tuple[float, torch.Tensor]:
        _sync(device)
        t0 = time.perf_counter()
        logits, _ = _forward(model, tokens, 0, DynamicCache(), args)
        _sync(device)
        return (time.perf_counter() - t0) * 1000.0, logits

    def reuse() -> tuple[float, torch.Tensor]:
        store = KVCacheStore(budget_bytes=2 * cache_nbytes(prefix_cache) + (1 << 20))
        store.put("ttft", module_key, tokens[:prefix_len], prefix_cache)
        logits, _, reused, seconds = prefill_with_reuse(model, tokens, store, "ttft", module_key)
        if reused != prefix_len:  # pragma: no cover - would be a bug in lookup
            raise RuntimeError(f"expected to reuse {prefix_len} tokens, reused {reused}")
        return seconds * 1000.0, logits

    recompute()
    reuse()
    full_runs = [recompute() for _ in range(repeats)]
    reuse_runs = [reuse() for _ in range(repeats)]
    diff = (full_runs[-1][1].float() - reuse_runs[-1][1].float()).abs().max().item()
    return TTFTResult(
        prefix_len=prefix_len,
        suffix_len=suffix_len,
        recompute_ms=statistics.median(t for t, _ in full_runs),
        reuse_ms=statistics.median(t for t, _ in reuse_runs),
        max_abs_logit_diff=diff,
    )
