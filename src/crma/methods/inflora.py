from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from crma.engine import Engine
from crma.methods.base import Example, Task, register
from crma.methods.layouts import SummedLoras, batches, lora_matrices
from crma.settings import Settings, setting

STATS_BATCH = 8  # examples per forward pass when measuring input statistics
Variant = Literal["code", "paper"]


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
    variant: Variant = setting(
        "code",
        "code: the authors' code (energies σ⁴ of the inputs, from the SVD of their covariance C; "
        "A from the one-sided projection (I − M Mᵀ) C); paper: GPM on the inputs themselves "
        "(energies σ², A from (I − M Mᵀ) C (I − M Mᵀ))",
    )


@register
class Inflora(SummedLoras):
    """InfLoRA: each new LoRA can only change the model along inputs earlier domains never used.

    Liang & Li, "InfLoRA: Interference-Free Low-Rank Adaptation for Continual Learning",
    CVPR 2024; thresholds from the authors' code (lamb 0.95, lame 1.0). Per adapted layer,
    with H the layer's inputs over a domain (d_in × n) and C = H Hᵀ/n their uncentred
    covariance:

    - memory M (d_in × k, orthonormal): the gradient projection memory (GPM/DualGPM) of
      earlier domains' inputs. After each domain, add the fewest leading directions of the
      new inputs with M projected out so that M holds ε_t of their energy,
      ε_t = lamb + (lame − lamb)·t/total_domains (t = domains learnt before);
    - before a domain: the new LoRA's down-projection (PEFT lora_A, r × d_in) is set to the
      top-r such directions, divided by √3 (as in the authors' code), and frozen;
    - only the up-projection (lora_B) trains, so ΔW = B A has its rows orthogonal to M:
      ΔW x ≈ 0 for earlier domains' inputs. Earlier LoRAs stay frozen and active (the forward
      pass sums them); inference sums all of them (no task id).

    Two variants of "directions" and "energy" (`variant`):

    - `code` (default), the authors' `update_DualGPM` and initialisation: GPM's rule applied
      to C in place of the representation matrix. Energies are the squared singular values
      of C, i.e. λ² for C's eigenvalues λ = σ²/n (σ: singular values of H), so σ⁴; the
      total is ‖C‖²_F and the share already held is ‖M Mᵀ C‖²_F / ‖C‖²_F. New directions, and
      the new A, are the left singular vectors of the one-sided projection (I − M Mᵀ) C. On
      the first domain the code keeps only the directions whose cumulative share stays below
      the threshold (at least one); later domains add up to and including the one that
      crosses it.
    - `paper`, GPM on H itself (Saha et al.'s definition, which the paper cites): energies σ²
      (C's eigenvalues), total ‖H‖²_F = n·trace(C), directions the eigenvectors of the
      two-sided projection (I − M Mᵀ) C (I − M Mᵀ), i.e. the left singular vectors of
      (I − M Mᵀ) H; the crossing direction is included on every domain.

    σ⁴ concentrates the energy in fewer directions, so `code` keeps a smaller memory for the
    same threshold (more plasticity, less protection).

    Adaptation from ViT classification to causal LMs: the adapted layers are the run's LoRA
    targets (ViT: k and v of each attention block); H holds every non-padding token position
    of the examples the domain trains on, run through the current model (ViT: every patch
    token of the task's training set, which the authors train on for several epochs);
    there are no per-task class heads. M itself is stored (d_in × k floats per layer), not
    DualGPM's complement when k > d_in/2, a storage saving only.
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
        covariances = input_covariances(engine, list(self._down), task.trained_examples(examples))
        with torch.no_grad():
            for module, down in self._down.items():
                cov = covariances[module]
                memory = self._memory(module, cov.device)
                down.copy_(interference_free_down(cov, memory, down.shape[0], self.options.variant))

    def trainable_groups(self, engine: Engine, task: Task) -> list[dict[str, Any]]:
        ups = lora_matrices(engine, self.adapter_name(task.domain), "lora_B")
        return [{"name": "lora", "params": list(ups.values())}]

    def end_task(self, engine: Engine, task: Task, examples: list[Example]) -> None:
        covariances = input_covariances(engine, list(self._down), task.trained_examples(examples))
        threshold = self.threshold(learnt=len(self.earlier_adapters(task)))
        for module, cov in covariances.items():
            memory = self._memory(module, cov.device)
            self.memory[module] = grow_memory(memory, cov, threshold, self.options.variant)
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
        with torch.no_grad(), engine.eval_mode():
            for batch in batches(engine, examples, STATS_BATCH):
                current["mask"] = batch["attention_mask"].bool()
                engine.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                tokens += int(current["mask"].sum())
    finally:
        for handle in handles:
            handle.remove()
    return {m: s / max(1, tokens) for m, s in sums.items()}


def interference_free_down(
    cov: torch.Tensor, memory: torch.Tensor | None, rank: int, variant: Variant
) -> torch.Tensor:
    """Top-`rank` directions of the new inputs off the memory, / √3: (rank, d_in)."""
    directions, _, _ = decompose(cov, memory, variant)
    return directions[:, :rank].T / math.sqrt(3)


def grow_memory(
    memory: torch.Tensor | None, cov: torch.Tensor, threshold: float, variant: Variant
) -> torch.Tensor:
    """GPM's rule: add the fewest new directions so M holds `threshold` of the inputs' energy.

    memory: (d_in, k) orthonormal or None; cov: (d_in, d_in) = H Hᵀ / n for the domain's
    inputs H. Energy and directions as `decompose` defines them for `variant`.
    """
    directions, values, energies = decompose(cov, memory, variant)
    ratio = energies / total_energy(cov, variant)
    if memory is None and variant == "code":  # the authors' first domain: below the threshold
        r = max(1, int((ratio.cumsum(0) < threshold).sum()))
    else:
        captured = 1 - ratio.sum()  # share of this domain's energy already inside the memory
        r = int((captured + ratio.cumsum(0) - ratio < threshold).sum())
    new = directions[:, :r][:, values[:r] > values[0] * 1e-6]  # zero singular value: not inputs
    return new if memory is None else torch.cat([memory, new], dim=1)[:, : cov.shape[0]]


def decompose(
    cov: torch.Tensor, memory: torch.Tensor | None, variant: Variant
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(directions as columns, singular values, energies), largest first, of the new inputs
    with the memory's span removed: `code` the SVD of (I − M Mᵀ) C, energies its squared
    singular values; `paper` the eigendecomposition of (I − M Mᵀ) C (I − M Mᵀ), energies its
    eigenvalues."""
    if variant == "code":
        off = cov if memory is None else cov - memory @ (memory.T @ cov)
        u, s, _ = torch.linalg.svd(off)
        return u, s, s.square()
    values, vectors = torch.linalg.eigh(project_out(cov, memory))
    values = values.flip(0).clamp(min=0)
    return vectors.flip(-1), values, values


def total_energy(cov: torch.Tensor, variant: Variant) -> torch.Tensor:
    """The domain's whole input energy: ‖C‖²_F (Σλ², `code`) or trace(C) (Σλ, `paper`)."""
    return cov.square().sum() if variant == "code" else cov.trace()


def project_out(cov: torch.Tensor, memory: torch.Tensor | None) -> torch.Tensor:
    """(I − M Mᵀ) C (I − M Mᵀ): the covariance of the inputs with the memory's span removed."""
    if memory is None:
        return cov
    off = cov - memory @ (memory.T @ cov)
    return off - (off @ memory) @ memory.T
