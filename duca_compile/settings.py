"""What a caching state is keyed by (``Settings``), and how a variant is compiled (``inner_compiler``)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .policies import CacheConfig

__all__ = ["Settings", "INNER_COMPILERS", "OWN_OPTIONS", "check_inductor_settings", "inner_compiler"]

INNER_COMPILERS = ("inductor", "eager", "aot_eager")
OWN_OPTIONS = ("config", "inner")          # options keys that are duca's, not Inductor's


@dataclass(frozen=True)
class Settings:
    """What a model's caching state is keyed by, with the model instance: a configured backend
    object is its own setting (two ``duca_backend(cfg)`` objects give two states, as Dynamo gives
    them two graphs); the bare ``duca_backend`` and ``backend="duca"`` are keyed by their values."""

    config: CacheConfig
    inner: str = "inductor"
    mode: str | None = None
    options: tuple = ()          # Inductor options as sorted (key, repr(value)) pairs
    backend: object = None       # the DuCaBackend object; None for the bare function / the name


def check_inductor_settings(inner: str, mode, options: dict) -> None:
    """ValueError for an unknown inner compiler, Inductor mode or option, or Inductor settings given
    to an inner compiler that is not Inductor."""
    if not isinstance(inner, str) or inner not in INNER_COMPILERS:
        raise ValueError(f"inner must be one of {INNER_COMPILERS}, got {inner!r}")
    if inner != "inductor":
        if options or mode not in (None, "default"):
            raise ValueError(f"mode and options are Inductor's, but inner={inner!r} compiles nothing with "
                             f"Inductor (got mode={mode!r}, options={sorted(options)}); "
                             f"duca's own options are {OWN_OPTIONS}")
        return
    if mode is None and not options:
        return
    from torch._inductor import list_mode_options, list_options

    if mode is not None:
        try:
            list_mode_options(mode)
        except RuntimeError as e:
            raise ValueError(f"mode: {e}") from None
    unknown = sorted(set(options) - set(list_options()))
    if unknown:
        raise ValueError(f"options {unknown} are neither duca's {OWN_OPTIONS} nor Inductor config keys "
                         "(torch._inductor.list_options())")


def inner_compiler(inner: str, mode: str | None, options: dict):
    if inner == "eager":
        return lambda gm, example_inputs: gm.forward
    if inner == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return lambda gm, example_inputs: aot_eager(gm, example_inputs)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = {**list_mode_options(mode or "default"), **options}

    def compile_inductor(gm, example_inputs):
        # Compiled lazily, outside Dynamo: give Inductor a tracing context of its own, with a shape
        # environment (without one its FX-graph and AOT caches are bypassed) and static fake inputs
        # (tensors Dynamo never saw would otherwise get symbolic sizes).
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        fake_mode = FakeTensorMode(shape_env=ShapeEnv())
        fakes = [fake_mode.from_tensor(x, static_shapes=True) if isinstance(x, torch.Tensor) else x
                 for x in example_inputs]
        with torch._guards.tracing(torch._guards.TracingContext(fake_mode)):
            return compile_fx(gm, fakes, config_patches=patches)
    return compile_inductor
