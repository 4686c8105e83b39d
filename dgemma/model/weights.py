"""Checkpoints in the Hugging Face layout: resolve (local dir or Hub id), stream safetensors into place,
and write them back.

The name map is declarative: each of our parameters has its canonical HF name (the decoder's, which
`save_pretrained` keeps) plus the tied aliases a checkpoint may carry instead (the encoder's copy, the
tied `lm_head`). Only safetensors are read, so loading a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dgemma.errors import CheckpointError
from dgemma.model.config import ModelConfig
from dgemma.model.diffusion_gemma import DiffusionGemma
from dgemma.model.quant import FP8_DTYPES

logger = logging.getLogger(__name__)

DECODER = "model.decoder."
ENCODER = "model.encoder.language_model."
VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
INDEX_FILE = "model.safetensors.index.json"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]


def hf_names(name: str) -> tuple[str, ...]:
    """HF names of one of our parameters: canonical first, then tied aliases."""
    if name == "embed_tokens.weight":
        return (DECODER + name, ENCODER + name, "lm_head.weight")
    if name == "norm.weight":
        return (DECODER + name, ENCODER + name)
    if name.startswith("self_conditioning."):
        return (DECODER + name.replace(".mlp.", "."),)
    # stored once per mode, not tied: the own mode's tensor, else (a checkpoint with one copy) the other's
    match = re.fullmatch(r"layers\.(\d+)\.(encoder|decoder)_layer_scalar", name)
    if match:
        own, other = (ENCODER, DECODER) if match.group(2) == "encoder" else (DECODER, ENCODER)
        return (f"{own}layers.{match.group(1)}.layer_scalar", f"{other}layers.{match.group(1)}.layer_scalar")
    match = re.fullmatch(r"layers\.(\d+)\.self_attn\.(encoder|decoder)_bias\.(\w+)", name)
    if match:
        layer, mode, proj = match.groups()
        own, other = (ENCODER, DECODER) if mode == "encoder" else (DECODER, ENCODER)
        return tuple(f"{p}layers.{layer}.self_attn.{proj}.bias" for p in (own, other))
    if name.startswith("layers."):
        return (DECODER + name, ENCODER + name)
    raise AssertionError(f"no HF name for parameter {name}")


# Below this many parameters a model keeps float32 on a GPU too: its weights cost little there, and
# bfloat16's rounding changes a small model's samples (the embedded model parses 56% of its held-out
# prompts in float32, 46% in bfloat16).
SMALL_MODEL_PARAMETERS = 10**9


def default_device_and_dtype(
    device, dtype, parameters: int | None = None
) -> tuple[torch.device, torch.dtype]:
    """CUDA when a GPU is present, else CPU; bfloat16 on CUDA (float32 for a model of fewer than
    SMALL_MODEL_PARAMETERS `parameters`), float32 on the CPU; either may be overridden."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None:
        small = parameters is not None and parameters < SMALL_MODEL_PARAMETERS
        dtype = torch.bfloat16 if device.type == "cuda" and not small else torch.float32
    return device, dtype


def resolve_checkpoint(path_or_repo_id: str | Path) -> Path:
    """A local checkpoint directory; a Hub repo id is fetched with huggingface_hub (when a network exists)."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: is a file; pass the checkpoint directory that holds config.json")
    text = str(path_or_repo_id)
    if not _REPO_ID.match(text):
        raise CheckpointError(f"{text}: no such checkpoint directory (and not a Hugging Face repo id)")
    try:
        from huggingface_hub import snapshot_download

        logger.info("downloading %s from the Hugging Face Hub", text)
        return Path(snapshot_download(text, allow_patterns=_DOWNLOAD_PATTERNS))
    except Exception as exc:  # network, auth, missing repo: one clear message
        raise CheckpointError(
            f"{text}: not a local directory, and fetching it from the Hugging Face Hub failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "Pass a local checkpoint directory, or check the repo id, your network and HF_TOKEN."
        ) from None


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from its index when there is one."""
    index = directory / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index}: malformed index ({type(exc).__name__}: {exc})") from None
        files = [directory / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: lists shard files that do not exist: {', '.join(missing)}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in directory.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = (
            f" (found {', '.join(pickles)}: pickle checkpoints are refused because loading them can run code;"
            " convert them to safetensors)"
            if pickles
            else ""
        )
        raise CheckpointError(f"{directory}: no *.safetensors weight files{hint}")
    return files


def _tensor_names(files: list[Path]) -> dict[str, Path]:
    """Every tensor name in the checkpoint and the file that holds it (headers only)."""
    where: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                    where.setdefault(name, file)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{file}: cannot read as safetensors ({exc})") from None
    return where


def load_model(
    directory: Path, *, device=None, dtype=None, progress: bool = False, quantization: str | None = None
) -> DiffusionGemma:
    config = ModelConfig.from_file(directory / "config.json")
    files = checkpoint_files(directory)
    where = _tensor_names(files)
    model = DiffusionGemma.empty(config, device=device, dtype=dtype, quantization=quantization)
    params = dict(model.named_parameters())

    # each parameter reads its canonical name, else the first tied alias the checkpoint has
    source = {ours: next((n for n in hf_names(ours) if n in where), None) for ours in params}
    missing = [hf_names(p)[0] for p, name in source.items() if name is None]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{directory}: checkpoint is missing {len(missing)} tensor(s): {shown}")
    known = {n for ours in params for n in hf_names(ours)}
    vision = [n for n in where if n.startswith(VISION_PREFIXES)]
    for name, file in where.items():
        if name not in known and not name.startswith(VISION_PREFIXES):
            raise CheckpointError(
                f"{file.name}: unexpected tensor {name!r} (not part of the DiffusionGemma text model)"
            )

    readers: dict[Path, list[tuple[str, str]]] = {}
    for ours, name in source.items():
        readers.setdefault(where[name], []).append((name, ours))
    bar = _progress(files, progress)
    try:
        for file in files:  # one file open at a time, one tensor in host memory at a time
            try:
                with safe_open(str(file), framework="pt", device="cpu") as handle:
                    for name, ours in readers.get(file, []):
                        tensor = handle.get_tensor(name)
                        _check_tensor(tensor, params[ours], file, name)
                        owner, attr = ours.rsplit(".", 1)
                        if params[ours].dtype in FP8_DTYPES:  # quantized as it loads
                            model.get_submodule(owner).load_weight(attr, tensor)
                        else:
                            params[ours].data.copy_(tensor)
                        if bar is not None:
                            bar.advance(tensor.numel() * tensor.element_size())
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{file}: cannot read as safetensors ({exc})") from None
    finally:
        if bar is not None:
            bar.close()
    if vision:
        logger.info("skipped %d vision-tower tensors (image input is not supported yet)", len(vision))
    return model


def _check_tensor(tensor: torch.Tensor, param: torch.nn.Parameter, file: Path, name: str) -> None:
    if tuple(tensor.shape) != tuple(param.shape):
        raise CheckpointError(
            f"{file.name}: tensor {name!r} has shape {list(tensor.shape)}, "
            f"config.json implies {list(param.shape)}"
        )
    if not tensor.is_floating_point():
        raise CheckpointError(f"{file.name}: tensor {name!r} has non-float dtype {tensor.dtype}")


def state_dict_hf(model: DiffusionGemma) -> dict[str, torch.Tensor]:
    """Our parameters under their canonical HF names (what `save_pretrained` writes)."""
    return {hf_names(name)[0]: p.detach() for name, p in model.named_parameters()}


def save_checkpoint(
    model: DiffusionGemma,
    directory: str | Path,
    *,
    max_shard_bytes: int = 5 * 2**30,
    extra_files: dict[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write config.json and safetensors shards (with an index when sharded) in the HF layout.

    `dtype` converts the weights as they are written (the model itself is left as it is).

    Files are written under temporary names and renamed into place, so a crash never leaves a
    half-written file under a real name."""
    if model.quantization is not None:
        raise ValueError(
            f"this model's experts are quantized ({model.quantization}) and there is no quantized checkpoint "
            "format: save the unquantized model (quantization happens when a checkpoint is loaded)"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = state_dict_hf(model)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for shard, fname in zip(shards, names):
        cpu = {k: v.to("cpu").contiguous() for k, v in shard.items()}
        atomic_write(directory / fname, lambda tmp, cpu=cpu: save_file(cpu, tmp, metadata={"format": "pt"}))
    files = {"config.json": json.dumps(model.config.source, indent=2) + "\n", **(extra_files or {})}
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map = {k: fname for shard, fname in zip(shards, names) for k in shard}
        files[INDEX_FILE] = json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2
        )
    for fname, text in files.items():
        atomic_write(directory / fname, lambda tmp, text=text: Path(tmp).write_text(text))
    return directory


def atomic_write(target: Path, write) -> None:
    """Call write(tmp) on a temporary file beside `target`, then rename it into place (a crash never
    leaves a half-written file under the real name; the file gets the usual umask permissions)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a checkpoint is for sharing
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class _Progress:
    def __init__(self, total: int):
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

        from dgemma.logs import stderr_console

        self._progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TimeRemainingColumn(),
            console=stderr_console(),
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task("loading weights", total=total)

    def advance(self, nbytes: int) -> None:
        self._progress.advance(self._task, nbytes)

    def close(self) -> None:
        self._progress.stop()


def _progress(files: list[Path], enabled: bool) -> _Progress | None:
    if not enabled:
        return None
    return _Progress(sum(f.stat().st_size for f in files))
