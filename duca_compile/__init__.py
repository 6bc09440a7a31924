"""duca-compile: DiT feature caching (DuCa, ToCa, FORA, TaylorSeer, ClusCa) as a torch.compile backend."""
from .backend import DuCaBackend, duca_backend
from .policies import (CacheConfig, ClusCaConfig, DuCaConfig, FORAConfig, Mode, RatioSchedule, ScriptedConfig,
                       TaylorSeerConfig, ToCaConfig)
from .full_size import flops_report
from .integrations.diffusers import disable, enable
from .policies.presets import presets
from .report import explain, stats
from .runtime import reset, sampling

__all__ = ["duca_backend", "DuCaBackend", "CacheConfig", "DuCaConfig", "FORAConfig", "ToCaConfig",
           "TaylorSeerConfig", "ClusCaConfig", "RatioSchedule", "ScriptedConfig", "Mode", "presets",
           "stats", "explain", "reset", "sampling", "enable", "disable", "flops_report"]
__version__ = "0.2.0"
