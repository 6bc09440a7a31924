"""Caching methods: one file each, a validated config dataclass and a registered policy."""
from .base import POLICIES, CacheConfig, CachePolicy, Mode, StepPlan, make_policy, register_policy
from .duca import DuCaConfig, DuCaPolicy
from .fora import FORAConfig, FORAPolicy
from .scripted import ScriptedConfig, ScriptedPolicy

__all__ = ["POLICIES", "CacheConfig", "CachePolicy", "Mode", "StepPlan", "make_policy", "register_policy",
           "DuCaConfig", "DuCaPolicy", "FORAConfig", "FORAPolicy", "ScriptedConfig", "ScriptedPolicy"]
