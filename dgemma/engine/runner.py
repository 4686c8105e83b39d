"""The denoise forward as the engine runs it: eager (CPU, the reference path), or replayed from CUDA graphs.

On the GPU a step's forward is thousands of small kernels; replaying a captured graph launches them all
at once. One graph per batch bucket (1, 2, 4, 8 ... rows, up to the cache's rows): a batch is padded to
its bucket (padding rows read cache row 0 with an empty prefix, and their output is dropped). Graphs are
captured on first use and share one memory pool. Inputs go through static buffers; the output is a view
of the graph's own buffer, valid until the next call.

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
    canvas_BC: torch.Tensor
    soft_BCD: torch.Tensor
    rows_B: torch.Tensor
    starts_B: torch.Tensor
    hidden_BCD: torch.Tensor


def buckets_for(num_rows: int) -> tuple[int, ...]:
    """Powers of two below `num_rows`, then `num_rows` itself."""
    sizes, b = [], 1
    while b < num_rows:
        sizes.append(b)
        b *= 2
    return (*sizes, num_rows)


class DenoiseRunner:
    """`hidden(...)`: the denoiser's final hidden states for a batch of canvases."""

    def __init__(self, model: DiffusionGemma, cache: KVCache, *, graphs: bool | None = None):
        self.model = model
        self.cache = cache
        self.graphs = model.device.type == "cuda" if graphs is None else graphs
        if self.graphs and model.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.buckets = buckets_for(cache.batch_size)
        self._captured: dict[int, _Graph] = {}
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
        b = len(rows)
        graph = self._graph(next(size for size in self.buckets if size >= b))
        graph.canvas_BC[:b].copy_(torch.cat(list(canvases)))
        graph.canvas_BC[b:].zero_()
        for i, s in enumerate(soft):
            if s is None:
                graph.soft_BCD[i].zero_()
            else:
                graph.soft_BCD[i].copy_(s[0])
        pad = len(graph.rows_B) - b
        graph.rows_B.copy_(torch.tensor([*rows, *[0] * pad]), non_blocking=True)
        graph.starts_B.copy_(torch.tensor([*starts, *[0] * pad]), non_blocking=True)
        graph.graph.replay()
        return graph.hidden_BCD[:b]

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

    def _graph(self, size: int) -> _Graph:
        if size in self._captured:
            return self._captured[size]
        model, device = self.model, self.model.device
        c, d = model.config.canvas_length, model.config.hidden_size
        canvas = torch.zeros(size, c, dtype=torch.long, device=device)
        soft = torch.zeros(size, c, d, dtype=model.dtype, device=device)
        rows = torch.zeros(size, dtype=torch.long, device=device)
        starts = torch.zeros(size, dtype=torch.long, device=device)

        def forward():
            return model.denoise_static(canvas, soft, self.cache, rows, starts)

        began = time.perf_counter()
        # warm up on a side stream (compiles the Triton kernels, fills lazy caches), then capture
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            hidden = forward()
        self._pool = graph.pool()
        captured = _Graph(graph, canvas, soft, rows, starts, hidden)
        self._captured[size] = captured
        logger.info("captured the denoise graph for %d rows in %.1f s", size, time.perf_counter() - began)
        return captured
