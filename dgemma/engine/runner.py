"""The model calls of an engine step: eager (CPU, the reference path), or replayed from CUDA graphs.

On the GPU a step's forward is thousands of small kernels; replaying a captured graph launches them all
at once. Four kinds of graph, each per batch bucket (1, 2, 4, 8 ... rows, up to the engine's rows): the
denoise forward (final hidden states), the commit (encode one canvas per row into the cache), the two
fused (commit a canvas and take the next canvas's first denoise step in one forward, reading the weights
once instead of twice; `fuse_commit=False` runs the commit and the denoise graphs instead), and the
prompts' prefill, per width in whole canvases as well. A batch is padded to its bucket with the cache's
scratch row (the last one, never given to a request), whose output is dropped. Graphs are captured on
first use and share one memory pool. Inputs go through static buffers; a denoise output is a view of the
graph's own buffer, valid until the next call.

Shape legend: B rows, C canvas tokens, D hidden.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dgemma.cache.kv_cache import KVCache
from dgemma.model.diffusion_gemma import DiffusionGemma

logger = logging.getLogger(__name__)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph | None  # None: a static runner without graphs runs `forward` each time
    forward: Callable[[], torch.Tensor | None]
    ids_BC: torch.Tensor
    rows_B: torch.Tensor
    starts_B: torch.Tensor
    soft_BCD: torch.Tensor | None = None
    commit_BC: torch.Tensor | None = None
    hidden_BCD: torch.Tensor | None = None

    def replay(self) -> None:
        if self.graph is None:
            self.hidden_BCD = self.forward()
        else:
            self.graph.replay()


def capture(
    graph: torch.cuda.CUDAGraph, fn: Callable[[], object], pool, generators: Sequence[torch.Generator] = ()
) -> object:
    """Warm fn up twice on a side stream (compiles the Triton kernels, fills lazy caches), register the
    generators it draws from (besides the default one) with `graph`, then capture it into `graph`
    (memory from `pool`, None: a new one); returns what the captured call returned."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    for generator in generators:
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph, pool=pool):
        return fn()


def buckets_for(num_rows: int) -> tuple[int, ...]:
    """Powers of two below `num_rows`, then `num_rows` itself."""
    sizes, b = [], 1
    while b < num_rows:
        sizes.append(b)
        b *= 2
    return (*sizes, num_rows)


class DenoiseRunner:
    """`hidden(...)`: the denoiser's hidden states for a batch of canvases; `commit(...)`: encode them;
    `commit_and_hidden(...)`: both, for a finished canvas and the next one's first step; `prefill(...)`:
    encode prompts into empty rows.

    `static` runs the graphs' forwards (static shapes, padded batches) without capturing them: on the
    CPU, tests check the fused and padded paths through the engine. With graphs or `static`, the cache's
    last row is scratch (padding); requests use rows 0 .. batch_size - 2."""

    def __init__(
        self,
        model: DiffusionGemma,
        cache: KVCache,
        *,
        graphs: bool | None = None,
        static: bool | None = None,
        fuse_commit: bool = True,
    ):
        self.model = model
        self.cache = cache
        self.graphs = model.device.type == "cuda" if graphs is None else graphs
        self.static = self.graphs if static is None else static
        self.fuse_commit = fuse_commit
        if self.graphs and model.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        if self.graphs and not self.static:
            raise ValueError("CUDA graphs capture the static forwards: graphs=True needs static")
        if self.static and cache.batch_size < 2:
            raise ValueError("the static forwards need a scratch row in the cache beside the request rows")
        self.scratch_row = cache.batch_size - 1
        model.pack_projections()  # one GEMM for q|k|v and one for gate|up (CUDA)
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
        if not self.static:
            return self._eager(canvases, soft, rows)
        graph = self._load("denoise", canvases, rows, starts)
        for i, s in enumerate(soft):
            if s is None:
                graph.soft_BCD[i].zero_()
            else:
                graph.soft_BCD[i].copy_(s[0])
        graph.replay()
        return graph.hidden_BCD[: len(rows)]

    def commit(self, canvases: Sequence[torch.Tensor], rows: Sequence[int]) -> None:
        """Encode one canvas [1, C] per row at the end of its prefix (the cache's lengths advance)."""
        if not self.static:
            self.model.encode(torch.cat(list(canvases)), self.cache, rows=list(rows))
            return
        self.cache.check_room(rows, canvases[0].shape[-1])
        self._load("commit", canvases, rows, self.cache.lengths(rows)).replay()
        self.cache.advance(rows, canvases[0].shape[-1])

    def commit_and_hidden(
        self, commits: Sequence[torch.Tensor], canvases: Sequence[torch.Tensor], rows: Sequence[int]
    ) -> torch.Tensor:
        """`commit(commits, rows)`, then `hidden` of each row's next canvas on its first step (no
        self-conditioning signal): with the static forwards and `fuse_commit`, one forward for both.
        Returns [B, C, D]."""
        if not (self.static and self.fuse_commit):
            self.commit(commits, rows)
            return self.hidden(canvases, [None] * len(rows), rows, self.cache.lengths(rows))
        self.cache.check_room(rows, commits[0].shape[-1])
        graph = self._load("commit_denoise", canvases, rows, self.cache.lengths(rows))
        graph.commit_BC[: len(rows)].copy_(torch.cat(list(commits)))
        graph.replay()
        self.cache.advance(rows, commits[0].shape[-1])
        return graph.hidden_BCD[: len(rows)]

    def _load(self, kind: str, canvases, rows, starts, width: int | None = None) -> _Graph:
        b = len(rows)
        graph = self._graph(kind, next(size for size in self.buckets if size >= b), width)
        ids = torch.cat(list(canvases))
        graph.ids_BC[:b, : ids.shape[1]].copy_(ids)
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

    def prefill(self, ids_BT: torch.Tensor, rows: Sequence[int], lengths: Sequence[int]) -> None:
        """Encode prompts into empty cache rows: ids [B, T] (CPU or device), each row right-padded past
        its real length in `lengths` (the row's cache advances by that). With the static forwards, one
        forward per batch bucket and width in whole canvases, padded with the scratch row and with
        more padding tokens, whose K/V land past each prompt where the canvas's K/V replace them
        before anything reads them: replayed from a CUDA graph, a 512-token prompt's encode costs the
        GPU's time, not the host's launches (bench/prefill_graph_probe.py). Rows that hold tokens
        already, or a width past the rows' storage, take `model.encode`."""
        rows = list(rows)
        c = self.model.config.canvas_length
        width = -(-ids_BT.shape[-1] // c) * c
        if not self.static or width > self.cache.max_length or any(self.cache.lengths(rows)):
            self.model.encode(ids_BT, self.cache, rows=rows, lengths=lengths)
            return
        ids_BT, lengths = self.model.check_encode(ids_BT, self.cache, rows, lengths)
        graph = self._load(f"prefill{width}", [ids_BT], rows, [0] * len(rows), width)
        graph.replay()
        for row, n in zip(rows, lengths):
            self.cache.advance([row], n)

    def _graph(self, kind: str, size: int, width: int | None = None) -> _Graph:
        if (kind, size) in self._captured:
            return self._captured[kind, size]
        # the forwards hold the model and the cache, never the runner: a cycle back to it would keep a
        # dropped engine's graphs alive until the garbage collector runs, which may be during a capture
        # (destroying a graph then invalidates the capture)
        model, cache, device = self.model, self.cache, self.model.device
        c, d = model.config.canvas_length, model.config.hidden_size
        ids = torch.zeros(size, width or c, dtype=torch.long, device=device)
        rows = torch.full((size,), self.scratch_row, dtype=torch.long, device=device)
        starts = torch.zeros(size, dtype=torch.long, device=device)
        soft = commit = None
        if kind == "denoise":
            soft = torch.zeros(size, c, d, dtype=model.dtype, device=device)

            def forward():
                return model.denoise_static(ids, soft, cache, rows, starts)
        elif kind == "commit_denoise":
            commit = torch.zeros_like(ids)

            def forward():
                return model.commit_denoise_static(commit, ids, cache, rows, starts)
        else:  # warm-up and capture write only the scratch row (every row index is the scratch row)

            def forward():
                return model.encode_static(ids, cache, rows, starts)

        g = _Graph(
            graph=torch.cuda.CUDAGraph() if self.graphs else None,
            forward=forward,
            ids_BC=ids,
            rows_B=rows,
            starts_B=starts,
            soft_BCD=soft,
            commit_BC=commit,
        )
        if not self.graphs:
            self._captured[kind, size] = g
            return g
        began = time.perf_counter()
        g.hidden_BCD = capture(g.graph, forward, self._pool)
        self._pool = g.graph.pool()
        self._captured[kind, size] = g
        logger.info("captured the %s graph for %d rows in %.1f s", kind, size, time.perf_counter() - began)
        return g
