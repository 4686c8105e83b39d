"""A static KV cache: one slot (row) per sequence, each with its own length, sized once at creation.

Every layer stores K/V for the whole prefix ([rows, kv_heads, max_length + scratch, head_dim]); sliding
layers hide what lies outside their window with the attention mask, so the same storage serves both
modes. `encode` writes the prefix; `denoise` reads it. The static (CUDA-graph) denoise also writes the
canvas's own K/V just past the row's prefix, so that it attends to one tensor instead of concatenating
two: `scratch` positions after `max_length` leave room for that, and the commit's encode overwrites
those positions with the encoder's K/V.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dgemma.errors import CapacityError
from dgemma.model.config import LayerSpec


class KVCache:
    """K/V storage for `batch_size` rows of up to `max_length` prefix tokens each."""

    def __init__(
        self,
        layers: Sequence[LayerSpec],
        *,
        batch_size: int,
        max_length: int,
        device: torch.device | str,
        dtype: torch.dtype,
        scratch: int = 0,
    ):
        if batch_size <= 0 or max_length <= 0 or scratch < 0:
            raise CapacityError(
                f"cache needs batch_size > 0, max_length > 0 and scratch >= 0, got {batch_size}, "
                f"{max_length}, {scratch}"
            )
        self.batch_size = batch_size
        self.max_length = max_length  # prefix tokens a row holds
        self.scratch = scratch
        self.capacity = max_length + scratch  # positions stored per row
        self.keys = [
            torch.zeros(batch_size, s.num_kv_heads, self.capacity, s.head_dim, device=device, dtype=dtype)
            for s in layers
        ]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self._lengths = [0] * batch_size

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    def lengths(self, rows: Sequence[int] | None = None) -> list[int]:
        """Tokens encoded so far, per row (all rows when `rows` is None)."""
        return list(self._lengths) if rows is None else [self._lengths[r] for r in rows]

    def rows_or_all(self, rows: Sequence[int] | None) -> list[int]:
        if rows is None:
            return list(range(self.batch_size))
        rows = list(rows)
        bad = [r for r in rows if not 0 <= r < self.batch_size]
        if bad:
            raise IndexError(f"cache rows {bad} out of range 0..{self.batch_size - 1}")
        return rows

    def check_room(self, rows: Sequence[int], num_tokens: int) -> None:
        for r in rows:
            if self._lengths[r] + num_tokens > self.max_length:
                raise CapacityError(
                    f"cache row {r} holds {self._lengths[r]} of {self.max_length} tokens; "
                    f"{num_tokens} more do not fit (create the cache with a larger max_length)"
                )

    def write_index(self, rows: Sequence[int], num_new: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [B, 1], positions [B, T]) on the device: where `write` puts T new tokens per row.
        Built once per encode and shared by every layer (one host-to-device copy, not one a layer)."""
        index = torch.tensor([[r, n] for r, n in zip(rows, self.lengths(rows))]).to(self.device)
        return index[:, :1], index[:, 1:] + torch.arange(num_new, device=self.device)

    def write(
        self,
        layer: int,
        index: tuple[torch.Tensor, torch.Tensor],
        k_BTKE: torch.Tensor,
        v_BTKE: torch.Tensor,
    ) -> None:
        """Store new K/V [B, T, K, E] at `index` = (rows [B, 1], positions [B, T]) (see `write_index`;
        lengths advance in `advance`)."""
        rows_B1, pos_BT = index
        for store, new in ((self.keys[layer], k_BTKE), (self.values[layer], v_BTKE)):
            new = new.to(store.dtype)
            if new.requires_grad or store.requires_grad:  # training: keep the autograd graph
                store[rows_B1, :, pos_BT] = new
            else:
                _words(store)[rows_B1, :, pos_BT] = _words(new.contiguous())

    def read_rows(self, layer: int, rows: Sequence[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V [B, K, length, E] of several rows (positions past a row's end are stale: mask them)."""
        if list(rows) == list(range(self.batch_size)):
            return self.keys[layer][:, :, :length], self.values[layer][:, :, :length]
        idx = torch.tensor(rows, device=self.device)
        return self.keys[layer][idx, :, :length], self.values[layer][idx, :, :length]

    def gather(
        self, layer: int, rows_B: torch.Tensor, pos_BS: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V [B, K, S, E] at positions pos_BS of rows rows_B (device tensors: no host sync)."""
        # advanced indices around a slice put their broadcast dims first: [B, S, K, E]
        k, v = (
            _words(store)[rows_B[:, None], :, pos_BS].view(store.dtype)
            for store in (self.keys[layer], self.values[layer])
        )
        return k.transpose(1, 2), v.transpose(1, 2)

    def read_row(self, layer: int, row: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V [1, K, end - start, E] of one row's positions start..end-1 (a view, no copy)."""
        return self.keys[layer][row : row + 1, :, start:end], self.values[layer][row : row + 1, :, start:end]

    def advance(self, rows: Sequence[int], num_tokens: int) -> None:
        for r in rows:
            self._lengths[r] += num_tokens

    def reset(self, rows: Sequence[int] | None = None) -> None:
        """Forget the prefix of these rows (their slots can hold a new sequence)."""
        for r in self.rows_or_all(rows):
            self._lengths[r] = 0


def _words(t: torch.Tensor) -> torch.Tensor:
    """The same bytes seen as 8-byte words along the last dim (when it divides): index kernels move
    one element at a time, so gathering and scattering K/V rows as words moves 4x fewer bf16 elements.
    Not under autograd (training): an integer view would cut the gradient through the cache."""
    if t.requires_grad or t.shape[-1] * t.element_size() % 8 or t.element_size() >= 8:
        return t
    return t.view(torch.int64)
