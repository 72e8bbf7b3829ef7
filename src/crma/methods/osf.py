from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from peft import OSFConfig
from peft.tuners.osf.layer import OSFLayer
from peft.utils.constants import TRANSFORMERS_MODELS_TO_OSF_TARGET_MODULES_MAPPING as OSF_TARGETS
from torch import nn

from crma.engine import Engine, module_name
from crma.errors import UserError
from crma.methods.base import Example, Method, Task, register
from crma.settings import Settings, setting

ADAPTER = "subspace"  # not "osf": PEFT warns when the name is inside its prefix "osf_"


@dataclass
class OsfOptions(Settings):
    """OSF: one model, fine-tuned in the orthogonal complement of its top singular directions."""

    effective_rank: float = setting(
        0.5,
        "fraction of each target matrix's smaller dimension whose top singular directions are "
        "frozen on the first domain (PEFT's default: half)",
        gt=0,
        lt=1,
    )
    total_domains: int = setting(
        5, "domains over which the frozen fraction rises from effective_rank towards 1", ge=1
    )
    lr: float | None = setting(
        1e-4, "learning rate of the singular factors (PEFT: 1e-5 to 1e-4); empty: train.lr", gt=0
    )
    target_modules: list[str] | None = setting(
        None,
        "modules to fine-tune; empty: PEFT's OSF default (Llama: all 7 projections)",
        check=module_name,
    )
    trainable_rank: int | None = setting(
        None,
        "train exactly the bottom r singular directions of every target matrix on every domain "
        "(a budget control: r·(d_out + d_in + 1) parameters per matrix, a rank-r LoRA has "
        "r·(d_out + d_in)); effective_rank and total_domains then do not apply; empty: off",
        ge=1,
    )

    def frozen_fraction(self, index: int) -> float:
        """Frozen share of each matrix on domain `index` (0-based): equal steps towards 1.

        PEFT's advice for a known sequence of n domains ("progressive budget allocation"):
        the frozen part grows by an equal share per domain, so each gets capacity and the
        last one still trains something. Domains past total_domains keep the last step.
        """
        step = min(index, self.total_domains - 1) / self.total_domains
        return self.effective_rank + (1 - self.effective_rank) * step


@register
class Osf(Method):
    """OSF: Orthogonal Subspace Fine-tuning, one shared model trained across domains.

    Nayak et al., "Sculpting Subspaces: Constrained Full Fine-Tuning in LLMs for Continual
    Learning", 2025 (arXiv 2504.07097), through PEFT's `OSFConfig` (PEFT 0.21.2). Per domain,
    each target weight W = U Σ Vᵀ is split by its SVD: the top-k singular directions
    (U_high, V_high) are frozen, the rest (U_low, S_low, V_low) train, with gradients projected
    orthogonally to U_high and V_high, so ΔW = U_low S_low V_lowᵀ − (its initial value) never
    touches the frozen directions. Between domains the update is merged into the base weights
    and the merged weights are decomposed again with a larger k (PEFT's docs: "recompute the
    SVD so the preserved subspace reflects the latest weights ... grow the preserved subspace";
    their example calls `unload()`, which would drop the update; we merge).

    Defaults: PEFT's: k = half of each matrix's smaller dimension on the first domain
    (`effective_rank=None`), PEFT's default target modules for the architecture, identity
    init; k then rises in equal steps towards the full dimension over `total_domains`
    (PEFT's progressive budget allocation); lr 1e-4 (PEFT recommends 1e-5 to 1e-4).
    The paper instead sets each layer's k from its input/output similarity (mrr/trr); PEFT
    does not implement that. AdamW's per-coordinate scaling turns a projected gradient into
    an update that leaves the subspace (PEFT 0.21.2 projects gradients only); the authors'
    trainer therefore also projects U_low and V_low back after every optimizer step, and so
    do we, before the next forward pass that uses them and at the end of the domain.

    Budget control (`trainable_rank` r): every domain trains only the bottom r singular
    directions of each target matrix (frozen rank min(d_out, d_in) − r, the same on every
    domain), r·(d_out + d_in + 1) parameters per matrix against a rank-r LoRA's
    r·(d_out + d_in). On q/v of SmolLM2-135M, r = 8 trains 461,280 parameters per domain, a
    LoRA r = 8 460,800 (configs/baselines.yaml's `osf-qv`).

    Inference uses the one model: no task id. The stack's `adapters/subspace/` holds the last
    domain's OSF adapter (PEFT format) with the merged base weights and OSF's SVD buffers
    beside it, so a reopened stack is exact.
    """

    name = "osf"
    fsdp = False  # merges each domain into the base weights, which FSDP shards
    # projects its trained factors in place after each step; ZeRO's sharded fp32 copy of
    # them, from which DeepSpeed rewrites them at the next step, would not be projected
    zero = False

    @classmethod
    def fixed_adapters(cls) -> tuple[str, ...]:
        return (ADAPTER,)

    Options = OsfOptions
    needs_task_id = False
    per_domain_adapter = False

    def __init__(self, options: OsfOptions | None = None):
        super().__init__(options)
        self._live: int | None = None  # index of the domain the live adapter learns; in the stack
        self._projector: SubspaceProjector | None = None

    def adapter_name(self, domain: str) -> str:
        return ADAPTER

    def peft_config(self, engine: Engine, index: int) -> OSFConfig:
        o = self.options
        shared = {"target_modules": o.target_modules or None, "task_type": "CAUSAL_LM"}
        if o.trainable_rank is None:
            return OSFConfig(effective_rank=o.frozen_fraction(index), **shared)
        # PEFT counts the frozen rank: all but the bottom r of each matrix, on every domain
        ranks = frozen_ranks(engine.base, self.targets(engine), o.trainable_rank)
        return OSFConfig(rank_pattern=ranks, **shared)

    def targets(self, engine: Engine) -> list[str]:
        """The target module names: the option, else PEFT's OSF default for the architecture."""
        model_type = engine.base.config.model_type
        if not (targets := self.options.target_modules or OSF_TARGETS.get(model_type)):
            raise UserError(f"osf: no default target modules for {model_type!r}; set them")
        return targets

    def begin_task(self, engine: Engine, task: Task, examples: list[Example]) -> None:
        if self._projector is not None:  # a domain left unfinished in this process
            self._projector.remove()
        self._retire_live_adapter(engine, task)
        try:
            engine.add_adapter(ADAPTER, self.peft_config(engine, task.index), task.rng_seed("osf"))
        except ValueError as exc:  # PEFT: a matrix too small for the fraction
            raise UserError(f"osf: {exc}") from exc
        self._live = task.index
        engine.activate(ADAPTER)
        self._projector = SubspaceProjector(osf_layers(engine))

    def _retire_live_adapter(self, engine: Engine, task: Task) -> None:
        """Merge the previous domain's adapter into the base; drop it to (re)train its domain."""
        if ADAPTER not in engine.adapters:
            return
        live = self._live if self._live is not None else task.index - 1
        if task.index > live:
            engine.merge_adapter(ADAPTER)
        elif task.index == live:  # --replace of the last domain: start again from its base
            engine.remove_adapter(ADAPTER)
        else:
            raise UserError(
                f"osf: cannot retrain domain {task.domain!r}: later domains are merged on top of it"
            )

    def trainable_groups(self, engine: Engine, task: Task) -> list[dict[str, Any]]:
        group: dict[str, Any] = {"name": "osf", "params": engine.adapter_parameters(ADAPTER)}
        if self.options.lr is not None:
            group["lr"] = self.options.lr
        return [group]

    def end_task(self, engine: Engine, task: Task, examples: list[Example]) -> None:
        if self._projector is not None:  # the last optimizer step's update
            self._projector.close()
            self._projector = None
        super().end_task(engine, task, examples)

    def eval_adapters(self, domain: str) -> str | None:
        return ADAPTER if self.trained else None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {} if self._live is None else {"live_index": torch.tensor([self._live])}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "live_index" in tensors:
            self._live = int(tensors["live_index"].item())


def frozen_ranks(model: nn.Module, targets: list[str], trainable: int) -> dict[str, int]:
    """PEFT rank_pattern freezing all but the bottom `trainable` directions of each target.

    One exact pattern per target matrix path, since their smaller dimensions differ (Llama:
    q_proj 576 × 576 but v_proj 192 × 576 in SmolLM2-135M).
    """
    return {
        rf"(^|\.){re.escape(path)}$": min(module.weight.shape) - trainable
        for path, module in model.named_modules()
        if isinstance(module, nn.Linear) and path.rsplit(".", 1)[-1] in targets
    }


def osf_layers(engine: Engine) -> dict[str, OSFLayer]:
    """The OSF layers holding the live adapter, by module path."""
    return {
        path: module
        for path, module in engine.model.named_modules()
        if isinstance(module, OSFLayer) and ADAPTER in module.osf_svd_params
    }


class SubspaceProjector:
    """Keeps U_low and V_low orthogonal to the frozen U_high and V_high of every OSF layer.

    A forward pre-hook projects a layer's factors whenever they changed since its last
    projection (an optimizer step, a checkpoint restore), so every forward pass sees exactly
    the weights the authors' trainer would after its post-step projection. `close` projects
    once more (the domain's last step) and removes the hooks.
    """

    def __init__(self, layers: dict[str, OSFLayer]):
        self.layers = layers
        self._versions: dict[int, int] = {}  # id(parameter) -> its version when last projected
        self._hooks = [m.register_forward_pre_hook(self._hook) for m in layers.values()]

    def _hook(self, module: OSFLayer, args) -> None:
        self.project(module)

    @torch.no_grad()
    def project(self, layer: OSFLayer) -> None:
        params = layer.osf_svd_params[ADAPTER]
        for key in ("U_low", "V_low"):
            param = params[key]
            if self._versions.get(id(param)) == param._version:
                continue
            param.copy_(project_factor(layer, key, param))
            self._versions[id(param)] = param._version

    def close(self) -> None:
        for layer in self.layers.values():
            self.project(layer)
        self.remove()

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def project_factor(layer: OSFLayer, key: str, value: torch.Tensor) -> torch.Tensor:
    """U_low (out × r) or V_low (r × in) with its frozen-subspace component removed.

    Mirrors PEFT's gradient hook: where PEFT keeps U_high / V_high it subtracts the projection
    on them; where the factor is square it keeps only the projection on the initial low part,
    which spans exactly the complement of the high part.
    """
    if key == "U_low":
        if ADAPTER in layer._osf_U_high:
            high = layer._osf_U_high[ADAPTER]
            return value - high @ (high.T @ value)
        low = layer._osf_U_low_init[ADAPTER]
        return low @ (low.T @ value)
    if ADAPTER in layer._osf_V_high:
        high = layer._osf_V_high[ADAPTER]
        return value - (value @ high.T) @ high
    low = layer._osf_V_low_init[ADAPTER]
    return (value @ low.T) @ low
