"""Arrow (Ostapenko et al. 2024): data-free routing from the adapters' own weights."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from crma.batching import pad, pad_id
from crma.errors import UserError
from crma.methods.layouts import lora_matrices

if TYPE_CHECKING:
    from crma.engine import Engine


def arrow_vectors(
    engine: Engine, domains: list[str], adapter_name
) -> dict[str, dict[str, torch.Tensor]]:
    """Per domain, per adapted module: the top right-singular vector of B·A, (d_in,)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for domain in domains:
            adapter = adapter_name(domain)
            A = lora_matrices(engine, adapter, "lora_A")  # module -> (r, d_in)
            if not A:
                raise UserError(
                    f"adapter {adapter!r} has no LoRA matrices; arrow routing needs LoRA adapters "
                    "(use --router centroid)"
                )
            B = lora_matrices(engine, adapter, "lora_B")  # module -> (d_out, r)
            vectors = {}
            for module, a in A.items():
                _, r_b = torch.linalg.qr(B[module].double())  # B = Q·R_b, so B·A ~ R_b·A
                _, _, vh = torch.linalg.svd(r_b @ a.double(), full_matrices=False)
                vectors[module] = vh[0]  # (d_in,)
            out[domain] = vectors
    return out


@torch.no_grad()
def arrow_scores(
    engine: Engine,
    vectors: dict[str, dict[str, torch.Tensor]],
    ids_list: list[list[int]],
    domains: list[str],
    batch_size: int = 16,
) -> torch.Tensor:
    """Mean over tokens and modules of |cos(x, v_domain,module)|, x the module's input: (N, K)."""
    modules = sorted(next(iter(vectors.values())))
    captured: dict[str, torch.Tensor] = {}
    handles = [
        engine.model.get_submodule(m).register_forward_pre_hook(
            lambda _mod, args, m=m: captured.__setitem__(m, args[0])
        )
        for m in modules
    ]
    device = next(engine.model.parameters()).device
    rows = []
    try:
        for start in range(0, len(ids_list), batch_size):
            chunk = ids_list[start : start + batch_size]
            ids, mask = (t.to(device) for t in pad(chunk, pad_id(engine.tokenizer)))
            with engine.inference(None) as model:  # module inputs without any adapter
                model(input_ids=ids, attention_mask=mask)
            m = mask.double()  # (B, T)
            score = torch.zeros(len(ids), len(domains), dtype=torch.float64)
            for name in modules:
                x = torch.nn.functional.normalize(captured[name].double(), dim=-1)  # (B, T, d_in)
                V = torch.stack([vectors[d][name] for d in domains], dim=1).to(x)  # (d_in, K)
                cos = (x @ V).abs()  # (B, T, K)
                score += ((cos * m[..., None]).sum(1) / m.sum(1, keepdim=True)).cpu()
            rows.append(score / len(modules))
    finally:
        for h in handles:
            h.remove()
    return torch.cat(rows)
