"""The block-diffusion training objective, as the published recipe defines it.

Facts followed (NVIDIA NeMo AutoModel, DiffusionGemma SFT guide and `BlockDiffusionStrategy` /
`dllm_loss`; transformers' `self_conditioning_mask`):

- one canvas of the response is the target of an example; the prompt and the earlier (clean) canvases
  are visible to the denoiser through the encoder's cache, exactly as at inference;
- a noise level t ~ U(eps, 1) is drawn per example, and every canvas position is independently replaced
  by a uniform random vocabulary token with probability t (linear schedule; there is no mask token);
- diffusion loss: cross-entropy of the denoise logits against the clean tokens over all supervised
  canvas positions, corrupted and uncorrupted alike;
- encoder loss: the causal next-token cross-entropy of the encoder over the clean sequence;
  total = diffusion + encoder_loss_weight * encoder (default weight 1.0);
- self-conditioning with probability 0.5 per example: a first denoise pass without gradient, whose logits
  feed the second pass (examples without it get the zero signal through the mask);
- the last canvas is padded, EOS then pad: the EOS is supervised, the pads are not, so answers shorter
  than a canvas teach the model to stop;
  `supervise_padding` (off by default, a departure from that recipe) also supervises the pads, as
  LLaDA's SFT (arXiv 2502.09992, padding with supervised |EOS| tokens) and BD3-LM's block padding do:
  at inference nothing ever fixes the positions after an EOS, so with unsupervised pads they stay
  uniform noise to the last step, which at a low noise level the model has never seen. The committed
  canvas holds pads there, so pad is the target;
- prompt tokens of chat data are masked out of both losses.

One backward runs through both modes: they share every weight.

Shape legend: B examples, T sequence positions, C canvas positions, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dgemma.model.diffusion_gemma import DiffusionGemma


@dataclass(frozen=True, kw_only=True)
class Example:
    """A tokenized training example: the clean sequence, where its response starts (canvases tile the
    response from there) and where the encoder loss starts (1 for plain text, the response for chat)."""

    token_ids: tuple[int, ...]  # prompt + response; the response ends with an EOS
    response_start: int
    loss_start: int
    # plain text: the target canvas may start anywhere after the BOS (continuation from any point)
    random_start: bool = False


@dataclass(frozen=True, kw_only=True)
class ObjectiveConfig:
    eps: float = 1e-3
    encoder_loss_weight: float = 1.0
    self_conditioning_prob: float = 0.5
    supervise_padding: bool = False  # also the pads after the EOS of the last canvas (see above)


@dataclass(frozen=True, kw_only=True)
class Batch:
    """Padded tensors for one step. Target canvas i is taken from example canvas_row_B[i] at positions
    canvas_start_B[i] .. + C - 1 (one canvas per example unless make_batch was asked for more)."""

    ids_BT: torch.Tensor  # clean sequences, pad after the end (canvas padding included)
    encoder_mask_BT: torch.Tensor  # True where position t's token is a supervised next-token target
    canvas_start_B: torch.Tensor  # where each target canvas begins (= its visible prefix)
    canvas_row_B: torch.Tensor  # the example (row of ids_BT) each target canvas comes from
    canvas_BC: torch.Tensor  # the clean target canvases
    canvas_mask_BC: torch.Tensor  # True where the canvas target is supervised (real tokens and the EOS)


def num_canvases(example: Example, canvas_length: int) -> int:
    return -(-(len(example.token_ids) - example.response_start) // canvas_length)


def make_batch(
    examples: list[Example],
    canvas_length: int,
    pad_id: int,
    generator: torch.Generator,
    *,
    pad_to: int | None = None,
    canvases_per_example: int = 1,
    supervise_padding: bool = False,
) -> Batch:
    """Pick canvases uniformly among each example's response canvases and pad to a common length (at
    least `pad_to`: fixed shapes keep GPU kernels from re-planning every step).

    With `canvases_per_example` k > 1, each example's target canvas is drawn k times independently: k
    examples of the recipe that share one encoder pass (the denoiser reads the same cache row with
    each canvas's own prefix), so the diffusion loss gets k times the signal for a fraction of the cost.
    With `supervise_padding`, the pads after the EOS are targets too (ObjectiveConfig)."""
    c = canvas_length
    starts, canvas_rows = [], []
    for b, e in enumerate(examples):
        for _ in range(canvases_per_example):
            if e.random_start:
                starts.append(int(torch.randint(1, len(e.token_ids), (1,), generator=generator)))
            else:
                k = int(torch.randint(num_canvases(e, c), (1,), generator=generator))
                starts.append(e.response_start + k * c)
            canvas_rows.append(b)
    length = max(max(len(e.token_ids) for e in examples), max(starts) + c, pad_to or 0)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    encoder_mask = torch.zeros(len(examples), length, dtype=torch.bool)
    for b, e in enumerate(examples):
        ids[b, : len(e.token_ids)] = torch.tensor(e.token_ids)
        encoder_mask[b, e.loss_start : len(e.token_ids)] = True
    rows = torch.tensor(canvas_rows)
    index = torch.tensor(starts)[:, None] + torch.arange(c)
    canvas = ids[rows].gather(1, index)
    lengths = torch.tensor([len(e.token_ids) for e in examples])[rows]
    canvas_mask = index < lengths[:, None]  # the EOS is the last real token; pads after it are not
    if supervise_padding:  # every canvas starts inside its example: all of it is supervised
        canvas_mask = torch.ones_like(canvas_mask)
    return Batch(
        ids_BT=ids,
        encoder_mask_BT=encoder_mask,
        canvas_start_B=torch.tensor(starts),
        canvas_row_B=rows,
        canvas_BC=canvas,
        canvas_mask_BC=canvas_mask,
    )


def draw_noise(batch_size: int, config: ObjectiveConfig, generator: torch.Generator):
    """Per example: the noise level t ~ U(eps, 1) and whether it gets self-conditioning."""
    t_B = config.eps + (1 - config.eps) * torch.rand(batch_size, generator=generator)
    self_conditioning_B = torch.rand(batch_size, generator=generator) < config.self_conditioning_prob
    return t_B, self_conditioning_B


def corrupt(
    canvas_BC: torch.Tensor, t_B: torch.Tensor, vocab_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each position by a uniform random token with probability t (per example)."""
    replace = torch.rand(canvas_BC.shape, generator=generator) < t_B[:, None]
    noise = torch.randint(0, vocab_size, canvas_BC.shape, generator=generator)
    return torch.where(replace, noise, canvas_BC), replace


@dataclass(frozen=True, kw_only=True)
class LossParts:
    total: torch.Tensor
    diffusion: torch.Tensor
    encoder: torch.Tensor
    diffusion_tokens: int
    encoder_tokens: int


def compute_loss(
    model: DiffusionGemma,
    batch: Batch,
    config: ObjectiveConfig,
    generator: torch.Generator,
    *,
    t_B: torch.Tensor | None = None,
    self_conditioning_B: torch.Tensor | None = None,
) -> LossParts:
    """Both losses for one batch. `t_B` and `self_conditioning_B` override the random draws (tests)."""
    device = model.device
    b = batch.ids_BT.shape[0]
    drawn_t, drawn_sc = draw_noise(batch.canvas_BC.shape[0], config, generator)
    t_B = drawn_t if t_B is None else t_B
    self_conditioning_B = drawn_sc if self_conditioning_B is None else self_conditioning_B
    noisy, _ = corrupt(batch.canvas_BC, t_B, model.config.vocab_size, generator)

    ids = batch.ids_BT.to(device)
    cache = model.new_cache(batch_size=b, max_length=ids.shape[1])
    hidden = model.encode(ids, cache)  # the clean sequence, causal; fills the cache for the denoiser
    targets = ids[:, 1:]
    encoder_mask = batch.encoder_mask_BT[:, 1:].to(device)
    encoder_logits = model.logits(hidden[:, :-1][encoder_mask])
    encoder = F.cross_entropy(encoder_logits, targets[encoder_mask], reduction="mean")

    prefix = batch.canvas_start_B.tolist()
    rows = batch.canvas_row_B.tolist()
    noisy = noisy.to(device)
    self_conditioning = None
    if bool(self_conditioning_B.any()):
        with torch.no_grad():  # the first pass: its logits condition the second, no gradient through it
            self_conditioning = model.denoise(noisy, cache, rows=rows, prefix_lengths=prefix).detach()
    hidden = model.denoise_hidden(
        noisy,
        cache,
        self_conditioning,
        rows=rows,
        prefix_lengths=prefix,
        self_conditioning_mask=None if self_conditioning is None else self_conditioning_B.to(device),
    )
    canvas_mask = batch.canvas_mask_BC.to(device)
    logits = model.logits(hidden[canvas_mask])
    diffusion = F.cross_entropy(logits, batch.canvas_BC.to(device)[canvas_mask], reduction="mean")
    return LossParts(
        total=diffusion + config.encoder_loss_weight * encoder,
        diffusion=diffusion,
        encoder=encoder,
        diffusion_tokens=int(canvas_mask.sum()),
        encoder_tokens=int(encoder_mask.sum()),
    )
