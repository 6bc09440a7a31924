"""duca-compile: DiT feature caching (DuCa, ToCa, FORA, TaylorSeer, ClusCa, calibrated schedules) as a
torch.compile backend."""
from .backend import DuCaBackend, duca_backend
from .calibration import Calibration, calibrate
from .policies import (AdaptiveConfig, CacheConfig, CalibratedConfig, ClusCaConfig, DuCaConfig, FORAConfig, Mode, RatioSchedule,
                       ScriptedConfig, TaylorSeerConfig, ToCaConfig)
from .dump import dump
from .integrations.diffusers import disable, enable
from .policies.presets import presets
from .report import explain, stats
from .runtime import reset, sampling
from .warmup import precompile
from .versions import warn_if_untested as _warn_if_untested

__all__ = ["duca_backend", "DuCaBackend", "CacheConfig", "DuCaConfig", "FORAConfig", "ToCaConfig",
           "TaylorSeerConfig", "ClusCaConfig", "CalibratedConfig", "AdaptiveConfig", "Calibration", "calibrate", "RatioSchedule", "ScriptedConfig", "Mode", "presets",
           "stats", "explain", "reset", "sampling", "enable", "disable", "precompile", "dump", "flops_report", "check"]
__version__ = "0.4.0"

_warn_if_untested()


def __getattr__(name):
    # loaded on first use, so `python -m duca_compile.full_size_flops` runs a module not yet imported
    if name == "flops_report":
        from .full_size_flops import flops_report
        return flops_report
    if name == "check":                     # python -m duca_compile.doctor imports it as a script
        from .doctor import check
        return check
    raise AttributeError(f"module 'duca_compile' has no attribute {name!r}")
