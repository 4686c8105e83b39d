"""The model calls of an engine step: eager (CPU, the reference path), or replayed from CUDA graphs.

On the GPU a step's forward is thousands of small kernels; replaying a captured graph launches them all
at once. Two kinds of graph, each per batch bucket (1, 2, 4, 8 ... rows, up to the engine's rows): the
denoise forward (final hidden states) and the commit (encode one canvas per row into the cache). A batch
is padded to its bucket with the cache's scratch row (the last one, never given to a request), whose
output is dropped. Graphs are captured on first use and share one memory pool. Inputs go through
static buffers; a denoise output is a view of the graph's own buffer, valid until the next call.

Shape legend: B rows, C canvas tokens, D hidden.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dgemma.cache.kv_cache import KVCache
from dgemma.model.diffusion_gemma import DiffusionGemma

logger = logging.getLogger(__name__)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    ids_BC: torch.Tensor
    rows_B: torch.Tensor
    starts_B: torch.Tensor
    soft_BCD: torch.Tensor | None = None
    hidden_BCD: torch.Tensor | None = None


def buckets_for(num_rows: int) -> tuple[int, ...]:
    """Powers of two below `num_rows`, then `num_rows` itself."""
    sizes, b = [], 1
    while b < num_rows:
        sizes.append(b)
        b *= 2
    return (*sizes, num_rows)


class DenoiseRunner:
    """`hidden(...)`: the denoiser's hidden states for a batch of canvases; `commit(...)`: encode them.

    With graphs, the cache's last row is scratch (padding); requests use rows 0 .. batch_size - 2."""

    def __init__(self, model: DiffusionGemma, cache: KVCache, *, graphs: bool | None = None):
        self.model = model
        self.cache = cache
        self.graphs = model.device.type == "cuda" if graphs is None else graphs
        if self.graphs and model.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        if self.graphs and cache.batch_size < 2:
            raise ValueError("with CUDA graphs the cache needs a scratch row beside the request rows")
        self.scratch_row = cache.batch_size - 1
        self.buckets = buckets_for(max(1, cache.batch_size - 1))
        self._captured: dict[tuple[str, int], _Graph] = {}
        self._pool = None

    def hidden(
        self,
        canvases: Sequence[torch.Tensor],
        soft: Sequence[torch.Tensor | None],
        rows: Sequence[int],
        starts: Sequence[int],
    ) -> torch.Tensor:
        """canvases: [1, C] token ids per row; soft: [1, C, D] self-conditioning embeddings (None on a
        canvas's first step); rows and starts: cache rows and prefix lengths. Returns [B, C, D]."""
        if not self.graphs:
            return self._eager(canvases, soft, rows)
        graph = self._load("denoise", canvases, rows, starts)
        for i, s in enumerate(soft):
            if s is None:
                graph.soft_BCD[i].zero_()
            else:
                graph.soft_BCD[i].copy_(s[0])
        graph.graph.replay()
        return graph.hidden_BCD[: len(rows)]

    def commit(self, canvases: Sequence[torch.Tensor], rows: Sequence[int]) -> None:
        """Encode one canvas [1, C] per row at the end of its prefix (the cache's lengths advance)."""
        if not self.graphs:
            self.model.encode(torch.cat(list(canvases)), self.cache, rows=list(rows))
            return
        self.cache.check_room(rows, canvases[0].shape[-1])
        self._load("commit", canvases, rows, self.cache.lengths(rows)).graph.replay()
        self.cache.advance(rows, canvases[0].shape[-1])

    def _load(self, kind: str, canvases, rows, starts) -> _Graph:
        b = len(rows)
        graph = self._graph(kind, next(size for size in self.buckets if size >= b))
        graph.ids_BC[:b].copy_(torch.cat(list(canvases)))
        pad = len(graph.rows_B) - b
        graph.rows_B.copy_(torch.tensor([*rows, *[self.scratch_row] * pad]), non_blocking=True)
        graph.starts_B.copy_(torch.tensor([*starts, *[0] * pad]), non_blocking=True)
        return graph

    def _eager(self, canvases, soft, rows) -> torch.Tensor:
        sc = mask = None
        with_sc = [s is not None for s in soft]
        if any(with_sc):
            template = next(s for s in soft if s is not None)
            # rows on their first step get zeros with mask 0: exactly the no-signal path for them
            sc = torch.cat([s if s is not None else torch.zeros_like(template) for s in soft])
            mask = None if all(with_sc) else torch.tensor(with_sc, device=sc.device)
        return self.model.denoise_hidden(
            torch.cat(list(canvases)),
            self.cache,
            rows=list(rows),
            self_conditioning_embeds=sc,
            self_conditioning_mask=mask,
        )

    def _graph(self, kind: str, size: int) -> _Graph:
        if (kind, size) in self._captured:
            return self._captured[kind, size]
        model, device = self.model, self.model.device
        c, d = model.config.canvas_length, model.config.hidden_size
        g = _Graph(
            graph=torch.cuda.CUDAGraph(),
            ids_BC=torch.zeros(size, c, dtype=torch.long, device=device),
            rows_B=torch.full((size,), self.scratch_row, dtype=torch.long, device=device),
            starts_B=torch.zeros(size, dtype=torch.long, device=device),
        )
        if kind == "denoise":
            g.soft_BCD = torch.zeros(size, c, d, dtype=model.dtype, device=device)

            def forward():
                return model.denoise_static(g.ids_BC, g.soft_BCD, self.cache, g.rows_B, g.starts_B)
        else:  # warm-up and capture write only the scratch row (every row index is the scratch row)

            def forward():
                return model.encode_static(g.ids_BC, self.cache, g.rows_B, g.starts_B)

        began = time.perf_counter()
        # warm up on a side stream (compiles the Triton kernels, fills lazy caches), then capture
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                forward()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(g.graph, pool=self._pool):
            g.hidden_BCD = forward()
        self._pool = g.graph.pool()
        self._captured[kind, size] = g
        logger.info("captured the %s graph for %d rows in %.1f s", kind, size, time.perf_counter() - began)
        return g
