"""Per-session KV caches under an explicit byte budget.

Rule 1: a cache is allocated once, up front, by `SessionCache.allocate`; it never grows.
Going past its token capacity or its byte budget raises `CacheExhausted`, and a cached
forward through an atom whose layer was never allocated raises `CacheNotReady`.
Rule 2: caches belong to sessions, not to modules: one hosted atom serves many sessions,
each with its own `SessionCache` (the Petals `MemoryCache` idea, without the shared pool).
Rule 3: attention atoms see a cache only through `KVCache`/`KVLayer` (`layer(index, uid)`,
`dtype`, `append`), so a host may hand them the paged pool's view instead
(`atoms.kv_pool.PagedCache`, the shared pool of a host).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .errors import CacheExhausted, CacheNotReady


@dataclass(frozen=True, slots=True)
class KVLayout:
    """What one attention atom stores per token: `kv_heads` x `head_dim` keys and values."""

    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def bytes_per_token(self, batch: int) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * batch * self.kv_heads * self.head_dim * itemsize


class KVLayer(Protocol):
    """One attention atom's keys and values in one session (or one batch of sessions)."""

    @property
    def dtype(self) -> torch.dtype: ...

    def append(
        self, k_new: torch.Tensor, v_new: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class KVCache(Protocol):
    """What an attention atom asks of `ctx.cache`: the layer of its atom index."""

    def layer(self, index: int, uid: str = "?") -> KVLayer: ...


class LayerCache:
    """Keys and values of one attention atom: (B, H_kv, max_len, D) each."""

    def __init__(self, uid: str, layout: KVLayout, batch: int, max_len: int) -> None:
        shape = (batch, layout.kv_heads, max_len, layout.head_dim)
        self.uid = uid
        self.k = torch.zeros(shape, dtype=layout.dtype)
        self.v = torch.zeros(shape, dtype=layout.dtype)
        self.length = 0
        self.max_len = max_len

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, H_kv, T, D) new keys/values; return everything cached so far.

        Raises:
            CacheExhausted: when the new tokens do not fit in `max_len`.
        """
        t = k_new.shape[2]
        end = self.length + t
        if end > self.max_len:
            raise CacheExhausted(
                f"atom {self.uid}: KV cache holds {self.max_len} tokens, "
                f"{self.length} used, {t} more requested"
            )
        self.k[:, :, self.length : end] = k_new
        self.v[:, :, self.length : end] = v_new
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def nbytes(self) -> int:
        return self.k.element_size() * self.k.nelement() * 2

    def __repr__(self) -> str:
        return f"LayerCache({self.uid}, {self.length}/{self.max_len} tokens)"


class SessionCache:
    """All KV layers of one session on one host, allocated together under a budget."""

    def __init__(self, batch: int, max_len: int, budget_bytes: int) -> None:
        if batch < 1 or max_len < 1:
            raise ValueError(f"cache needs batch >= 1 and max_len >= 1, got {batch}, {max_len}")
        self.batch = batch
        self.max_len = max_len
        self.budget_bytes = budget_bytes
        self._layers: dict[int, LayerCache] = {}

    @classmethod
    def allocate(
        cls,
        layouts: dict[int, tuple[str, KVLayout]],
        *,
        batch: int,
        max_len: int,
        budget_bytes: int,
    ) -> SessionCache:
        """Allocate one `LayerCache` per atom index in `layouts` (index -> (uid, layout)).

        Raises:
            CacheExhausted: when the total would exceed `budget_bytes`; nothing is allocated.
        """
        need = sum(lay.bytes_per_token(batch) * max_len for _, lay in layouts.values())
        if need > budget_bytes:
            raise CacheExhausted(
                f"KV cache for batch {batch} x {max_len} tokens needs {need} bytes, "
                f"budget is {budget_bytes} bytes"
            )
        cache = cls(batch, max_len, budget_bytes)
        for index, (uid, layout) in sorted(layouts.items()):
            cache._layers[index] = LayerCache(uid, layout, batch, max_len)
        return cache

    def layer(self, index: int, uid: str = "?") -> LayerCache:
        """The cache of atom `index`.

        Raises:
            CacheNotReady: when that atom's layer was never allocated.
        """
        try:
            return self._layers[index]
        except KeyError:
            raise CacheNotReady(
                f"atom {uid}: no KV cache allocated for atom index {index} in this session"
            ) from None

    @property
    def length(self) -> int:
        """Tokens cached so far (the same in every layer after a complete step)."""
        return max((lay.length for lay in self._layers.values()), default=0)

    @property
    def nbytes(self) -> int:
        return sum(lay.nbytes for lay in self._layers.values())

    def __repr__(self) -> str:
        return (
            f"SessionCache(batch={self.batch}, max_len={self.max_len}, "
            f"layers={len(self._layers)}, length={self.length}, bytes={self.nbytes})"
        )
