"""Caching methods: one file each, a validated config dataclass and a registered policy."""
from .adaptive import AdaptiveConfig, AdaptivePolicy
from .base import POLICIES, CacheConfig, CachePolicy, Mode, StepPlan, make_policy, register_policy
from .calibrated import CalibratedConfig, CalibratedPolicy
from .clusca import ClusCaConfig, ClusCaPolicy
from .duca import DuCaConfig, DuCaPolicy
from .fora import FORAConfig, FORAPolicy
from .schedules import RatioSchedule, TokenConfig
from .scripted import ScriptedConfig, ScriptedPolicy
from .taylorseer import TaylorSeerConfig, TaylorSeerPolicy
from .toca import ToCaConfig, ToCaPolicy

# What enable(pipe) and a backend given no config use: on both trained benchmark models, the best
# PSNR of the rows near 2x over plain torch.compile, at 20 and at 50 steps (README "Which method")
DEFAULT_CONFIG = TaylorSeerConfig(interval=3, max_order=1, first_enhance=6)

__all__ = ["DEFAULT_CONFIG", "POLICIES", "CacheConfig", "CachePolicy", "Mode", "StepPlan", "make_policy", "register_policy",
           "RatioSchedule", "TokenConfig", "DuCaConfig", "DuCaPolicy", "FORAConfig", "FORAPolicy",
           "ScriptedConfig", "ScriptedPolicy", "ToCaConfig", "ToCaPolicy", "TaylorSeerConfig",
           "TaylorSeerPolicy", "ClusCaConfig", "ClusCaPolicy", "CalibratedConfig", "CalibratedPolicy", "AdaptiveConfig", "AdaptivePolicy"]
