"""Mean-pooled hidden states of the frozen base: what the centroid router stores and compares."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from typing import TYPE_CHECKING, Any

import torch

from crma.backbone import decoder_layers
from crma.batching import pad, pad_id

if TYPE_CHECKING:
    from crma.engine import Engine


class _Stop(Exception):
    """Raised by a forward hook once the wanted layer has run: the rest is not needed."""


# Runs the frozen base alone (no adapter, no CRMA backbone): a context manager, entered once
# per `embed` call, yielding what to call with input_ids and attention_mask.
FrozenBase = Callable[[], AbstractContextManager[Callable[..., Any]]]


def frozen_base(engine: Engine) -> FrozenBase:
    """The base alone through the engine: adapters and backbone switched off, then back on."""

    @contextmanager
    def base() -> Iterator[Callable[..., Any]]:
        with engine.inference(None, backbone=False) as model:
            yield model

    return base


@torch.no_grad()
def embed(
    engine: Engine,
    ids_list: list[list[int]],
    layer: int | None = None,
    max_length: int = 128,
    batch_size: int = 16,
    skip_first: bool = False,
    base: FrozenBase | None = None,
) -> torch.Tensor:
    """Mean-pooled hidden state `layer` of the frozen base per text, (N, d) float64; with
    `skip_first`, pooled from the second token on (a one-token text keeps its token).

    Layers after `layer` are skipped (a hook stops the forward pass there). `base` runs the
    frozen base (default: `frozen_base(engine)`).
    """
    layers = decoder_layers(engine.model)
    n = len(layers)
    index = n // 2 if layer is None else (min(layer, n // 2) if layer >= 0 else layer % (n + 1))
    device = next(engine.model.parameters()).device
    captured: list[torch.Tensor] = []

    def grab(_module, _args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop

    target = engine.base.get_input_embeddings() if index == 0 else layers[index - 1]
    handle = target.register_forward_hook(grab)
    out = []
    try:
        with (base or frozen_base(engine))() as model:
            for start in range(0, len(ids_list), batch_size):
                chunk = [
                    ids[:max_length] or [pad_id(engine.tokenizer)]
                    for ids in ids_list[start : start + batch_size]
                ]
                ids, mask = (t.to(device) for t in pad(chunk, pad_id(engine.tokenizer)))
                captured.clear()
                with suppress(_Stop):
                    model(input_ids=ids, attention_mask=mask)
                h = captured[0].double()  # (B, T, d)
                m = mask.unsqueeze(-1).double()  # (B, T, 1)
                if skip_first:
                    m[:, 0] = (mask.sum(1, keepdim=True) == 1).double()
                out.append(((h * m).sum(1) / m.sum(1)).cpu())  # (B, d)
    finally:
        handle.remove()
    return torch.cat(out)
