"""Growing self-attention KV caches of next-scale transformers, one preallocated buffer per layer.

A next-scale model appends each scale's keys/values to every layer's cache and attends to all of them.
Re-concatenating the cache at every scale copies it again and again (and allocates a fresh block each
time); here every layer owns one buffer sized for the whole generation, new keys are written in place
and attention reads a view. Optionally (a KV budget, ``PruningConfig.kv_drop_ratios``) only some of a
scale's keys stay for later scales.
"""

from __future__ import annotations

import torch

from .errors import InternalError


class KVBuffer:
    """Self-attention keys/values of the previous scales of one layer, in one buffer (B, H, capacity, hd).

    ``capacity`` (token slots; the sampler gets it from ``PruningRun.kv_capacity``) sizes the buffer once
    per generation, so a scale's keys are written in place and attention reads a view: nothing is
    re-concatenated from scale to scale. Without it the buffer grows geometrically. Past a CFG cut-off
    fewer (the leading, conditional) rows run and use the leading rows of the buffer.
    """

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self.length = 0  # tokens held
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    @property
    def k(self) -> torch.Tensor | None:
        """The held keys (B, H, length, hd), or None once cleared."""
        return None if self._k is None else self._k[:, :, : self.length]

    @property
    def v(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :, : self.length]

    def extend(self, k: torch.Tensor, v: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values to attend to, (B, H, length + L, hd): the held ones and this scale's k, v (B, H, L, hd).

        ``keep`` of the L new tokens stay for later scales: all (``keep == L``), none (0: the final
        scale, whose keys nobody reads), or under a KV budget the ``keep`` whose keys lie farthest from
        the scale's mean key (the others are overwritten by the next scale).

        ``keep == 0`` is the buffer's last use: the new keys go after the held ones in place if the buffer
        has room (else into a copy), and the buffer lets go of its memory, which lives on only in the
        returned tensors. Released layer by layer, one layer's copy at a time fits where the previous
        layer's buffer was.
        """
        rows, n, new = k.shape[0], self.length, k.shape[2]
        if keep == 0:
            if self._k is None:
                return k, v
            if n + new <= self._k.shape[2]:
                self._k[:rows, :, n: n + new] = k
                self._v[:rows, :, n: n + new] = v
                held = self._k[:rows, :, : n + new], self._v[:rows, :, : n + new]
            else:
                held = torch.cat((self._k[:rows, :, :n], k), dim=2), torch.cat((self._v[:rows, :, :n], v), dim=2)
            self.clear()
            return held
        self._reserve(k, n + new)
        if keep < new:
            order = distinct_keys_first(k, keep)  # (B, L): the kept tokens first
            k, v = take_tokens(k, order), take_tokens(v, order)
        self._k[:rows, :, n: n + new] = k
        self._v[:rows, :, n: n + new] = v
        self.length = n + keep
        return self._k[:rows, :, : n + new], self._v[:rows, :, : n + new]

    def _reserve(self, k: torch.Tensor, slots: int) -> None:
        rows, heads, _, head_dim = k.shape
        if self._k is not None:
            if rows > self._k.shape[0]:
                raise InternalError(f"the KV cache holds {self._k.shape[0]} rows but a scale runs {rows}: rows may only "
                                    f"drop (at a CFG cut-off), never come back")
            if slots <= self._k.shape[2]:
                return
        size = max(slots, self.capacity or 0, 2 * self._k.shape[2] if self._k is not None else 0)
        shape = (rows if self._k is None else self._k.shape[0], heads, size, head_dim)
        grown_k, grown_v = k.new_empty(shape), k.new_empty(shape)
        if self._k is not None:
            grown_k[:, :, : self.length] = self.k
            grown_v[:, :, : self.length] = self.v
        self._k, self._v = grown_k, grown_v

    def clear(self) -> None:
        self._k = self._v = None
        self.length = 0


def distinct_keys_first(k: torch.Tensor, keep: int) -> torch.Tensor:
    """(B, L) token order per row: the ``keep`` tokens whose keys (B, H, L, hd) lie farthest from the
    row's mean key (summed over heads) first, in no particular order, then the others."""
    scores = (k - k.mean(dim=2, keepdim=True)).float().square_().sum(dim=(1, 3))  # (B, L)
    top = scores.topk(keep, dim=1, sorted=False).indices
    rest = torch.ones_like(scores, dtype=torch.bool).scatter_(1, top, False)
    others = torch.arange(k.shape[2], device=k.device).expand_as(scores)[rest].view(k.shape[0], -1)
    return torch.cat((top, others), dim=1)


def take_tokens(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """t (B, H, L, hd) reordered along L by ``order`` (B, L)."""
    return t.gather(2, order[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))
