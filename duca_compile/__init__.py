"""duca-compile: DiT feature caching (DuCa, FORA, …) as a torch.compile backend."""
from .backend import DuCaBackend, duca_backend
from .policies import CacheConfig, DuCaConfig, FORAConfig, Mode, ScriptedConfig
from .report import explain, stats
from .runtime import reset, sampling

__all__ = ["duca_backend", "DuCaBackend", "CacheConfig", "DuCaConfig", "FORAConfig", "ScriptedConfig", "Mode",
           "stats", "explain", "reset", "sampling"]
__version__ = "0.1.0"
