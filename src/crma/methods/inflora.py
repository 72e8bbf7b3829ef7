from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from crma.engine import Engine
from crma.methods.base import Example, Task
from crma.methods.layouts import SummedLoras, batches, eval_mode, lora_matrices
from crma.settings import Settings, setting

STATS_BATCH = 8  # examples per forward pass when measuring input statistics


@dataclass
class InfloraOptions(Settings):
    """InfLoRA: interference-free LoRA per domain."""

    threshold_start: float = setting(
        0.95,
        "energy kept in the memory of earlier inputs after the first domain (lamb)",
        gt=0,
        le=1,
    )
    threshold_end: float = setting(
        1.0, "energy threshold reached after total_domains (lame)", gt=0, le=1
    )
    total_domains: int = setting(5, "domains over which the threshold rises (total_sessions)", ge=1)


class Inflora(SummedLoras):
    """InfLoRA: each new LoRA can only change the model along inputs earlier domains never used.

    Liang & Li, "InfLoRA: Interference-Free Low-Rank Adaptation for Continual Learning",
    CVPR 2024; thresholds from the authors' code (lamb 0.95, lame 1.0). Per adapted layer,
    with C = H Hᵀ/n the uncentred covariance of the layer's inputs H over a domain:

    - memory M (d_in × k, orthonormal): the gradient projection memory (GPM/DualGPM) of
      earlier domains' inputs. After each domain, add the fewest principal directions of
      (I − M Mᵀ) H so that M holds ε_t of ‖H‖²_F, ε_t = lamb + (lame − lamb)·t/total_domains
      (t = domains learnt before);
    - before a domain: the new LoRA's down-projection (PEFT lora_A, r × d_in) is set to the
      top-r principal directions of the new domain's inputs with M projected out,
      (I − M Mᵀ) H, divided by √3 (as in the authors' code), and frozen;
    - only the up-projection (lora_B) trains, so ΔW = B A has its rows orthogonal to M:
      ΔW x ≈ 0 for earlier domains' inputs. Earlier LoRAs stay frozen and active (the forward
      pass sums them); inference sums all of them (no task id).

    Adaptation from ViT classification to causal LMs: the adapted layers are the run's LoRA
    targets (ViT: k and v of each attention block); H holds every non-padding token position
    of the domain's training examples, run through the current model (ViT: every patch token);
    there are no per-task class heads. The authors' code takes SVDs of C itself, which makes
    its energies σ⁴ instead of GPM's σ² and its directions those of C² rather than of H; we
    follow the paper's definitions (eigenvectors and eigenvalues of C). On the tiny test
    domains the code's variant forgets more than naive. M itself is stored (d_in × k floats
    per layer), not DualGPM's complement when k > d_in/2, a storage saving only.
    """

    name = "inflora"
    Options = InfloraOptions

    def __init__(self, options: InfloraOptions | None = None):
        super().__init__(options)
        self.memory: dict[str, torch.Tensor] = {}  # module -> M (d_in, k), orthonormal columns
        self._down: dict[str, torch.nn.Parameter] = {}  # module -> this domain's frozen A

    def begin_task(self, engine: Engine, task: Task, examples: list[Example]) -> None:
        super().begin_task(engine, task, examples)
        self._down = lora_matrices(engine, self.adapter_name(task.domain), "lora_A")
        covariances = input_covariances(engine, list(self._down), examples)
        with torch.no_grad():
            for module, down in self._down.items():
                cov = covariances[module]
                memory = self._memory(module, cov.device)
                down.copy_(interference_free_down(cov, memory, rank=down.shape[0]))

    def trainable_groups(self, engine: Engine, task: Task) -> list[dict[str, Any]]:
        ups = lora_matrices(engine, self.adapter_name(task.domain), "lora_B")
        return [{"name": "lora", "params": list(ups.values())}]

    def end_task(self, engine: Engine, task: Task, examples: list[Example]) -> None:
        covariances = input_covariances(engine, list(self._down), examples)
        threshold = self.threshold(learnt=len(self.earlier_adapters(task)))
        for module, cov in covariances.items():
            self.memory[module] = grow_memory(self._memory(module, cov.device), cov, threshold)
        self._down = {}
        super().end_task(engine, task, examples)

    def threshold(self, learnt: int) -> float:
        """ε_t, the share of a domain's input energy the memory keeps, `learnt` domains in."""
        o = self.options
        rise = min(1.0, learnt / o.total_domains)
        return o.threshold_start + (o.threshold_end - o.threshold_start) * rise

    def _memory(self, module: str, device: torch.device) -> torch.Tensor | None:
        memory = self.memory.get(module)
        return None if memory is None else memory.to(device)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        # While a domain trains, its frozen down-projections go into checkpoints too, so a
        # resumed run continues with exactly the initialisation it started with.
        return {
            **{f"memory/{m}": t for m, t in self.memory.items()},
            **{f"down/{m}": p.detach() for m, p in self._down.items()},
        }

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.memory = {
            k.removeprefix("memory/"): t for k, t in tensors.items() if k.startswith("memory/")
        }
        with torch.no_grad():
            for key, tensor in tensors.items():
                if key.startswith("down/") and key.removeprefix("down/") in self._down:
                    self._down[key.removeprefix("down/")].copy_(tensor)


def input_covariances(
    engine: Engine, modules: list[str], examples: list[Example]
) -> dict[str, torch.Tensor]:
    """E[x xᵀ] of each module's input x over all non-padding tokens: {module: (d_in, d_in)}."""
    sums: dict[str, torch.Tensor] = {}
    current: dict[str, torch.Tensor] = {}  # the batch's attention mask, for the hooks

    def hook(module_name: str):
        def record(_module, args) -> None:
            x = args[0].detach()[current["mask"]].float()  # (tokens, d_in)
            sums[module_name] = sums.get(module_name, 0) + x.T @ x

        return record

    handles = [engine.peft.get_submodule(m).register_forward_pre_hook(hook(m)) for m in modules]
    tokens = 0
    try:
        with torch.no_grad(), eval_mode(engine.model):
            for batch in batches(engine, examples, STATS_BATCH):
                current["mask"] = batch["attention_mask"].bool()
                engine.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                tokens += int(current["mask"].sum())
    finally:
        for handle in handles:
            handle.remove()
    return {m: s / max(1, tokens) for m, s in sums.items()}


def interference_free_down(
    cov: torch.Tensor, memory: torch.Tensor | None, rank: int
) -> torch.Tensor:
    """Top-`rank` principal directions of the new inputs off the memory, / √3: (rank, d_in)."""
    directions, _ = principal_directions(project_out(cov, memory))
    return directions[:, :rank].T / math.sqrt(3)


def grow_memory(memory: torch.Tensor | None, cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """GPM's rule: add the fewest new directions so M holds `threshold` of C's input energy.

    memory: (d_in, k) orthonormal or None; cov: (d_in, d_in) = H Hᵀ / n for the domain's
    inputs H. Energy is ‖H‖²_F = trace(C); the energy outside M is that of (I − M Mᵀ) H.
    """
    directions, energies = principal_directions(project_out(cov, memory))
    ratio = energies / cov.trace()
    captured = 1 - ratio.sum()  # share of this domain's energy already inside the memory
    r = int((captured + ratio.cumsum(0) - ratio < threshold).sum())
    new = directions[:, :r][:, energies[:r] > energies[0] * 1e-6]  # zero energy: not inputs
    return new if memory is None else torch.cat([memory, new], dim=1)[:, : cov.shape[0]]


def project_out(cov: torch.Tensor, memory: torch.Tensor | None) -> torch.Tensor:
    """(I − M Mᵀ) C (I − M Mᵀ): the covariance of the inputs with the memory's span removed."""
    if memory is None:
        return cov
    off = cov - memory @ (memory.T @ cov)
    return off - (off @ memory) @ memory.T


def principal_directions(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors (columns) and eigenvalues of a PSD matrix, largest first."""
    values, vectors = torch.linalg.eigh(cov)
    return vectors.flip(-1), values.flip(0).clamp(min=0)
