"""`crma check STACK`: verify a stack's files against its manifest and each other.

Opening a stack already checks that every committed file is there with its recorded size
(crma.stack). This goes further without loading the base model's weights: the sha256 of every
file, the router's tensors and domains, the backbone's shape (against the base model's config
where it can be read locally) and every adapter's config and tensor shapes. The first problem
is a one-line `UserError` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open

from crma.errors import UserError
from crma.methods import METHODS
from crma.routing.index import SERVING_PREFIX
from crma.stack import DAMAGED, MANIFEST, Stack


def check_stack(path: str | Path, base: str | None = None) -> list[str]:
    """Check the stack at `path`; return what was verified, one line each."""
    stack = Stack.open(path)
    stack.verify(hashes=True)
    files = stack.manifest["files"]
    hashed = sum("sha256" in entry for entry in files.values())
    recorded = (
        "sizes and sha256 match the manifest"
        if hashed == len(files)
        else f"present; {len(files) - hashed} without recorded sha256 (format 1, until a commit)"
    )
    lines = [
        f"files      {len(files)} files, {stack.size() / 2**20:.1f} MiB: {recorded} "
        f"(generation {stack.generation})"
    ]
    lines.append(_check_router(stack))
    method = METHODS.get(stack.manifest["method"])
    if method is None:
        raise UserError(f"{stack.path / MANIFEST}: unknown method {stack.manifest['method']!r}")
    if method.uses_crma:
        lines.append(_check_backbone(stack, base))
    lines += [_check_adapter(stack, d) for d in _one_domain_per_adapter(stack)]
    return lines


def _check_router(stack: Stack) -> str:
    file = stack.component("router")
    if file is None:
        raise UserError(
            f"{stack.path}: no router (a stack from before routing); "
            "generate with --router arrow, or retrain a domain"
        )
    shapes = _shapes(file)
    with safe_open(str(file), framework="pt") as fh:
        domains = json.loads(fh.metadata()["domains"])
    serving = "serving" in (stack.manifest.get("router") or {})
    prefixes = ("", SERVING_PREFIX) if serving else ("",)
    widths = [_router_width(file, shapes, p, len(domains)) for p in prefixes]
    for prefix, width in zip(prefixes, widths):
        if width is None:
            raise UserError(f"{file}: {prefix}router tensors do not fit together; {DAMAGED}")
    missing = [name for name in stack.domains if name not in domains]
    if missing:
        raise UserError(f"{file}: router lacks domain {missing[0]!r}; {DAMAGED}")
    return f"router     {file.name}: {len(domains)} domains, {widths[0]}-dim embeddings" + (
        f", serving router {widths[1]}-dim" if serving else ""
    )


def _router_width(file: Path, shapes: dict, prefix: str, k: int) -> int | None:
    """The embedding width of the router stored under `prefix` for k domains; None if its
    tensors do not fit together."""
    total = shapes.get(prefix + "sum", ())
    d = total[1] if len(total) == 2 else None
    labels = None
    if prefix + "labels" in shapes:
        with safe_open(str(file), framework="pt") as fh:
            labels = fh.get_tensor(prefix + "labels")
    fits = (
        shapes.get(prefix + "count") == (k,)
        and total == (k, d)
        and shapes.get(prefix + "sumsq") == (k, d)
        and (
            labels is None
            or (shapes[prefix + "embeddings"] == (len(labels), d) and labels.max() < k)
        )
    )
    return d if fits else None


def _check_backbone(stack: Stack, base: str | None) -> str:
    from crma.backbone import read_backbone_meta

    weights, config = stack.component("backbone"), stack.component("backbone_config")
    if weights is None or config is None:
        raise UserError(
            f"{stack.path}: method {stack.manifest['method']} needs a CRMA backbone; none committed"
        )
    meta = read_backbone_meta(config)
    L, d = meta["n_layers"], meta["hidden_size"]
    crma = stack.manifest["configs"]["crma"]
    n, tied = crma["n_streams"], crma["variant"] == "tied"
    if (meta["config"].get("n_streams"), meta["config"].get("variant")) != (n, crma["variant"]):
        raise UserError(
            f"{config}: n_streams/variant differ from the manifest's {n}/{crma['variant']}; {DAMAGED}"
        )
    expected = {"read_weights": (L, n, d), "log_mix": (L, n, n), "log_alpha": (L,)}
    if not tied:
        expected["write_weights"] = (L, d, n)
    if _shapes(weights) != expected:
        raise UserError(f"{weights}: tensors do not fit {L} layers x {d} hidden, n={n}; {DAMAGED}")
    model = _base_shape(base or stack.manifest["base_model"]["name"])
    if model is not None and model != (L, d):
        raise UserError(
            f"{config}: backbone for {L} layers x {d} hidden; the base model has {model[0]} x {model[1]}"
        )
    checked = "matches the base model" if model else "base model config not read"
    return (
        f"backbone   {weights.name}: {L} layers x {d} hidden, n={n}, {crma['variant']} ({checked})"
    )


def _check_adapter(stack: Stack, domain: str) -> str:
    folder = stack.adapter_dir(domain)
    config_file = folder / "adapter_config.json"
    try:
        config = json.loads(config_file.read_bytes())
        kind = config["peft_type"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"{config_file}: not a PEFT adapter config ({type(exc).__name__}); {DAMAGED}"
        ) from None
    shapes = _shapes(folder / "adapter_model.safetensors")
    if kind == "LORA":
        lora = stack.manifest["configs"]["lora"]
        r = config.get("r")
        fits = all(s[0] == r for k, s in shapes.items() if ".lora_A." in k) and all(
            s[-1] == r for k, s in shapes.items() if ".lora_B." in k
        )
        if r != lora["r"] or config.get("lora_alpha") != lora["alpha"] or not fits or not shapes:
            raise UserError(
                f"{folder}: a LoRA of rank {r}, alpha {config.get('lora_alpha')} ({len(shapes)} "
                f"tensors); the stack's is rank {lora['r']}, alpha {lora['alpha']}: foreign or damaged"
            )
    elif kind != "OSF" or not shapes:
        raise UserError(f"{config_file}: a {kind} adapter; this stack holds LoRA or OSF adapters")
    return f"adapter    {folder.relative_to(stack.path)}: {kind}, {len(shapes)} tensors"


def _one_domain_per_adapter(stack: Stack) -> list[str]:
    """One domain per adapter folder (methods with a shared adapter list it under every one)."""
    return list({stack.adapter_dir(d): d for d in stack.domains}.values())


def _shapes(file: Path) -> dict[str, tuple[int, ...]]:
    try:
        with safe_open(str(file), framework="pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118 - not a dict
    except Exception as exc:  # safetensors raises several kinds on damaged headers
        raise UserError(
            f"{file}: not a readable safetensors file ({type(exc).__name__}); {DAMAGED}"
        ) from None


def _base_shape(name: str) -> tuple[int, int] | None:
    """(layers, hidden size) from the base model's config when it is on disk, else None."""
    from transformers import AutoConfig

    from crma.model import EMBEDDED, embedded_cache_dir

    folder = embedded_cache_dir() if name == EMBEDDED else Path(name)
    if folder is None or not (folder / "config.json").is_file():
        return None
    config: Any = AutoConfig.from_pretrained(folder)
    return config.num_hidden_layers, config.hidden_size
