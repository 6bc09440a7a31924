"""Integrations with model libraries. ``diffusers``: ``enable(pipe, config)`` / ``disable(pipe)``."""
from .diffusers import disable, enable

__all__ = ["enable", "disable"]
