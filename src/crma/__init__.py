"""crma: continual learning for language models.

One LoRA per domain, composed on a shared CRMA backbone whose mixing matrices are kept
doubly stochastic by Sinkhorn normalisation (spectral norm 1), plus a router and a protocol
that measures forgetting against the published baselines.
"""

from crma.backbone import CRMABackbone, CRMAConfig, attach_crma, sinkhorn
from crma.errors import UserError
from crma.model import load_base
from crma.zclip import ZClip

__all__ = [
    "CRMABackbone",
    "CRMAConfig",
    "UserError",
    "ZClip",
    "attach_crma",
    "load_base",
    "sinkhorn",
]
__version__ = "0.1.0"
