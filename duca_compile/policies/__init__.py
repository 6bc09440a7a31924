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

__all__ = ["POLICIES", "CacheConfig", "CachePolicy", "Mode", "StepPlan", "make_policy", "register_policy",
           "RatioSchedule", "TokenConfig", "DuCaConfig", "DuCaPolicy", "FORAConfig", "FORAPolicy",
           "ScriptedConfig", "ScriptedPolicy", "ToCaConfig", "ToCaPolicy", "TaylorSeerConfig",
           "TaylorSeerPolicy", "ClusCaConfig", "ClusCaPolicy", "CalibratedConfig", "CalibratedPolicy", "AdaptiveConfig", "AdaptivePolicy"]
