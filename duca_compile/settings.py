"""What a caching state is keyed by (``Settings``), and how a variant is compiled (``inner_compiler``)."""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from . import _torch
from .policies import CacheConfig

__all__ = ["Settings", "TensorSpec", "INNER_COMPILERS", "OWN_OPTIONS", "OUTPUT_CODE", "check_inductor_settings",
           "inner_compiler"]

INNER_COMPILERS = ("inductor", "eager", "aot_eager")
OWN_OPTIONS = ("config", "inner")          # options keys that are duca's, not Inductor's
# compiled variant -> paths of the Python modules Inductor generated for it (``duca_compile.dump``)
OUTPUT_CODE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


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
    if mode is not None:
        try:
            _torch.list_mode_options(mode)
        except RuntimeError as e:
            raise ValueError(f"mode: {e}") from None
    unknown = sorted(set(options) - set(_torch.list_options()))
    if unknown:
        raise ValueError(f"options {unknown} are neither duca's {OWN_OPTIONS} nor Inductor config keys "
                         "(Inductor's list_options())")


@dataclass(frozen=True)
class TensorSpec:
    """An example input known only by its metadata: the compiler gets a fake tensor for it, so a
    compile allocates no memory for it (caches for FLUX at 1024² are gigabytes)."""

    shape: tuple
    dtype: torch.dtype
    device: torch.device


class InnerCompiler:
    """Compiles a variant graph with ``inner``. Called as ``compiler(gm, inputs)`` it gives a
    callable for those input shapes; ``compile_generic(gm, inputs, token_inputs)`` one whose inputs at ``token_inputs``
    (SUBSET token indices, [batch, k]) may have any k, with ``accepts(index_tensors)`` saying
    whether a k-tuple meets what the compiler assumed (k >= 2, say). Example inputs may be
    ``TensorSpec``s."""

    def __init__(self, inner: str, mode: str | None, options: dict):
        self.inner = inner
        self.patches = {}
        if inner == "inductor":
            self.patches = {**_torch.list_mode_options(mode or "default"), **options}

    def __call__(self, gm, example_inputs):
        return self.compile_generic(gm, example_inputs, ())[0]

    def compile_generic(self, gm, example_inputs, token_inputs):
        if self.inner == "eager":              # the graph names no k: it runs on any
            return gm.forward, _accept_any
        # Compiled lazily, outside Dynamo: give the compiler a tracing context of its own, with a
        # shape environment (without one Inductor's FX-graph and AOT caches are bypassed), static
        # fake inputs (tensors Dynamo never saw would otherwise get symbolic sizes) except k.
        shape_env = _torch.ShapeEnv(duck_shape=False)     # two sites' k may differ whatever the first ones were
        fake_mode = _torch.FakeTensorMode(shape_env=shape_env)
        token_inputs = set(token_inputs)
        fakes = []
        for i, x in enumerate(example_inputs):
            if i in token_inputs:
                context = _torch.StatelessSymbolicContext(dynamic_sizes=[_torch.DimDynamic.STATIC, _torch.DimDynamic.DYNAMIC])
                fakes.append(fake_mode.from_tensor(x, source=_torch.ConstantSource(f"duca_index_{i}"),
                                                   symbolic_context=context))
            elif isinstance(x, TensorSpec):
                with fake_mode:
                    fakes.append(torch.empty(x.shape, dtype=x.dtype, device=x.device))
            else:
                fakes.append(fake_mode.from_tensor(x, static_shapes=True) if isinstance(x, torch.Tensor) else x)
        with _torch.tracing(_torch.TracingContext(fake_mode)):
            if self.inner == "aot_eager":
                fn = _torch.aot_eager(gm, fakes)
            else:
                modules = getattr(_torch.PyCodeCache, "modules", [])
                loaded = len(modules)
                fn = _torch.compile_fx(gm, fakes, config_patches=self.patches)
                # the output code modules this compile loaded (none when Inductor's in-process cache
                # already held them)
                _remember_output_code(fn, [getattr(m, "__file__", None) for m in modules[loaded:]])
        if not token_inputs:
            return fn, _accept_any
        index_fakes = [fakes[i] for i in sorted(token_inputs)]
        return fn, lambda indices: shape_env.evaluate_guards_for_args(index_fakes, list(indices))


def _remember_output_code(fn, paths) -> None:
    try:
        OUTPUT_CODE[fn] = [p for p in paths if p]
    except TypeError:        # not weak-referenceable: the dump says the code was not recorded
        pass


def _accept_any(indices) -> bool:
    return True


def inner_compiler(inner: str, mode: str | None, options: dict) -> InnerCompiler:
    return InnerCompiler(inner, mode, options)
