"""LoRA adapters for DiffusionGemma: W' = W + (alpha / r) * B @ A on chosen projections.

The adapters live beside the model, not inside it: the model's parameter names (and so its checkpoint
format) never change. Linear targets get a forward hook that adds the low-rank branch (with dropout on
its input, as PEFT does); expert weights, when asked for, get one (A, B) pair per expert, applied inside
the experts' matmuls. `merge` folds the branches into the base weights (fast inference, or a merged
checkpoint to save in the HF layout) and `unmerge` takes them out again.

Adapters are saved in the PEFT layout (`adapter_config.json` + `adapter_model.safetensors`, tensors
named `base_model.model.<HF module path>.lora_A.weight`), so PEFT tooling can read the linear targets;
expert adapters use the same naming with a leading expert dimension, which only dgemma reads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from dgemma.errors import CheckpointError, ConfigError
from dgemma.model.diffusion_gemma import DiffusionGemma
from dgemma.model.weights import atomic_write, hf_names

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
DENSE_MLP = ("gate_proj", "up_proj", "down_proj")
EXPERTS = ("experts",)
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    # module names: attention and dense-MLP projections by default; add "experts" for the MoE weights
    target_modules: tuple[str, ...] = ATTENTION + DENSE_MLP

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"lora rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ConfigError(f"lora alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        known = set(ATTENTION + DENSE_MLP + EXPERTS)
        unknown = [t for t in self.target_modules if t not in known]
        if unknown or not self.target_modules:
            raise ConfigError(
                f"lora target modules must be among {sorted(known)}, got {list(self.target_modules)}"
            )

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class _Pair(nn.Module):
    """A and B of one target. Shapes [.., r, in] and [.., out, r]; B starts at zero (W' = W at first)."""

    def __init__(self, out_features, in_features, rank, experts: int | None, like, generator):
        super().__init__()
        lead = () if experts is None else (experts,)
        # A ~ U(-1/sqrt(in), 1/sqrt(in)): PEFT's kaiming_uniform(a=sqrt(5)), drawn from our own generator
        bound = 1 / math.sqrt(in_features)
        a = (torch.rand(*lead, rank, in_features, generator=generator) * 2 - 1) * bound
        self.lora_A = nn.Parameter(a.to(like.device))
        self.lora_B = nn.Parameter(torch.zeros(*lead, out_features, rank, device=like.device))

    def delta(self, scaling: float) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * scaling


class LoraAdapters(nn.Module):
    """The adapters of one model, attached on creation; train `adapters.parameters()`. `seed` draws A."""

    def __init__(self, model: DiffusionGemma, config: LoraConfig, *, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.config = config
        self.merged = False
        self.pairs = nn.ModuleDict()
        self._targets: dict[str, nn.Module] = {}  # module path -> module (a Linear, or Experts)
        self._handles = []
        for name, module in model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(module, nn.Linear) and leaf in config.target_modules and ".router." not in name:
                self.pairs[_key(name)] = _Pair(
                    module.out_features, module.in_features, config.rank, None, module.weight, generator
                )
            elif leaf == "experts" and "experts" in config.target_modules:
                e, two_i, d = module.gate_up_proj.shape
                self.pairs[_key(name + ".down_proj")] = _Pair(
                    d, two_i // 2, config.rank, e, module.down_proj, generator
                )
                self.pairs[_key(name + ".gate_up_proj")] = _Pair(
                    two_i, d, config.rank, e, module.gate_up_proj, generator
                )
            else:
                continue
            self._targets[name] = module
        if not self.pairs:
            raise ConfigError(f"no module of the model matches lora targets {list(config.target_modules)}")
        self.attach()

    def attach(self) -> None:
        """Route the targets through their adapters (hooks on linears, a weight delta on experts)."""
        for name, module in self._targets.items():
            if isinstance(module, nn.Linear):
                self._handles.append(module.register_forward_hook(self._hook(self.pairs[_key(name)])))
            else:
                gate_up, down = (
                    self.pairs[_key(name + ".gate_up_proj")],
                    self.pairs[_key(name + ".down_proj")],
                )
                module.weight_delta = lambda g=gate_up, d=down: (
                    None if self.merged else (g.delta(self.config.scaling), d.delta(self.config.scaling))
                )

    def detach(self) -> None:
        """Remove every hook: the model runs as if it had no adapters (unless they are merged)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._targets.values():
            if not isinstance(module, nn.Linear):
                module.weight_delta = None

    def _hook(self, pair: _Pair):
        dropout = self.config.dropout
        scaling = self.config.scaling

        def hook(module, inputs, output):
            if self.merged:
                return output
            x = inputs[0].to(pair.lora_A.dtype)
            if dropout and module.training:
                x = F.dropout(x, dropout)
            return output + (F.linear(F.linear(x, pair.lora_A), pair.lora_B) * scaling).to(output.dtype)

        return hook

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapters into the base weights (W += scaling * B @ A)."""
        if not self.merged:
            self._apply_delta(+1)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take merged adapters back out of the base weights."""
        if self.merged:
            self._apply_delta(-1)
            self.merged = False

    def _apply_delta(self, sign: int) -> None:
        for param, pair in self._weights():
            param.copy_((param.float() + sign * pair.delta(self.config.scaling)).to(param.dtype))

    def _weights(self):
        """(base weight, its adapter pair) for every adapted weight."""
        for name, module in self._targets.items():
            if isinstance(module, nn.Linear):
                yield module.weight, self.pairs[_key(name)]
            else:
                yield module.gate_up_proj, self.pairs[_key(name + ".gate_up_proj")]
                yield module.down_proj, self.pairs[_key(name + ".down_proj")]

    def _peft_names(self) -> dict[str, nn.Parameter]:
        """PEFT tensor name -> our adapter parameter (`base_model.model.<HF path>.lora_A.weight`)."""
        names = {}
        for key, pair in self.pairs.items():
            prefix = "base_model.model." + _hf_module(_name(key))
            names[prefix + ".lora_A.weight"] = pair.lora_A
            names[prefix + ".lora_B.weight"] = pair.lora_B
        return names

    # -- files ---------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """adapter_config.json + adapter_model.safetensors (PEFT layout)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: param.detach().cpu().contiguous() for name, param in self._peft_names().items()}
        atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        peft = {
            "peft_type": "LORA",
            "task_type": None,
            "r": self.config.rank,
            "lora_alpha": self.config.alpha,
            "lora_dropout": self.config.dropout,
            "target_modules": sorted(t for t in self.config.target_modules if t != "experts"),
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "dgemma_expert_adapters": "experts" in self.config.target_modules,
        }
        atomic_write(
            directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(peft, indent=2) + "\n")
        )
        return directory

    @classmethod
    def load(cls, model: DiffusionGemma, directory: str | Path) -> LoraAdapters:
        """Adapters saved by `save` (or by PEFT, for the linear targets), attached to `model`."""
        directory = Path(directory)
        try:
            peft = json.loads((directory / CONFIG_FILE).read_text())
            targets = tuple(peft["target_modules"]) + (
                ("experts",) if peft.get("dgemma_expert_adapters") else ()
            )
            config = LoraConfig(
                rank=int(peft["r"]), alpha=float(peft["lora_alpha"]),
                dropout=float(peft.get("lora_dropout", 0.0)), target_modules=targets,
            )  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError, ConfigError) as exc:
            raise CheckpointError(
                f"{directory / CONFIG_FILE}: not a usable LoRA adapter config ({exc})"
            ) from None
        adapters = cls(model, config)
        tensors = load_file(directory / WEIGHTS_FILE)
        expected = adapters._peft_names()
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise CheckpointError(
                f"{directory / WEIGHTS_FILE}: missing {missing[:3]} ({len(missing)} in all)"
            )
        with torch.no_grad():
            for name, param in expected.items():
                if tuple(tensors[name].shape) != tuple(param.shape):
                    raise CheckpointError(
                        f"{directory / WEIGHTS_FILE}: {name} has shape {list(tensors[name].shape)}, "
                        f"the model needs {list(param.shape)}"
                    )
                param.copy_(tensors[name])
        return adapters


def _key(name: str) -> str:
    return name.replace(".", "__")  # ModuleDict keys may not hold dots


def _name(key: str) -> str:
    return key.replace("__", ".")


def _hf_module(name: str) -> str:
    """The HF module path of one of our modules (the decoder's canonical name, as save_pretrained writes)."""
    if name.endswith((".gate_up_proj", ".down_proj")) and ".experts." in name:
        return hf_names(name)[0]
    return hf_names(name + ".weight")[0].removesuffix(".weight")
