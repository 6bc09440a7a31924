"""torch's private surface: every private torch API duca_compile touches, and every version branch.

A torch.compile backend lives on APIs torch does not promise to keep. They are all named here,
each with what duca uses it for and what happens without it, so that a new torch release is
checked in this one file (``python -m duca_compile.doctor`` resolves every entry; a test fails
when the package reaches torch's private modules anywhere else).

Entries load lazily (Inductor's modules cost seconds to import): ``_torch.compile_fx`` imports
``torch._inductor.compile_fx`` on first use. A missing one raises ``MissingTorchAPI`` naming the
API, the torch version and the tested range; nothing falls back in silence.
"""
from __future__ import annotations

import contextlib
import importlib
import warnings
from dataclasses import dataclass

import torch

__all__ = ["SURFACE", "TESTED_TORCH", "MissingTorchAPI", "Private", "check_surface", "torch_version",
           "in_tested_range", "warn_if_untested", "backend_known", "original_module", "compiled_call", "set_compiled_call",
           "compile_callback", "source_name", "set_source_name", "copy_node_source", "copy_graph_sources", "compiling_frame_locals", "unlimited_recompiles"]

# The torch releases the whole test suite passed on (oldest, newest); CI runs a smoke subset on both
# ends and the full suite on the one between.
TESTED_TORCH = ((2, 11), (2, 15))


class MissingTorchAPI(ImportError):
    """A private torch API duca_compile needs is not in this torch."""


@dataclass(frozen=True)
class Private:
    module: str        # dotted module path
    attr: str          # attribute (dotted) of that module ("" = the module itself)
    use: str           # what duca uses it for
    without: str       # what duca does where it is missing

    @property
    def path(self) -> str:
        return f"{self.module}.{self.attr}" if self.attr else self.module

    def load(self):
        try:
            value = importlib.import_module(self.module)
            for name in filter(None, self.attr.split(".")):
                value = getattr(value, name)
            return value
        except (ImportError, AttributeError) as e:
            raise MissingTorchAPI(
                f"duca_compile needs {self.path} ({self.use}), which torch {torch.__version__} does not have "
                f"({type(e).__name__}: {e}). Tested on torch {_tested_text()}. Without it: {self.without}") from e


_REQUIRED = "duca cannot compile variants; this torch is not supported"
SURFACE: dict[str, Private] = {
    # Dynamo's graph and its fake tensors
    "detect_fake_mode": Private("torch._guards", "detect_fake_mode",
                                "the fake mode of the example inputs Dynamo hands the backend", _REQUIRED),
    "TracingContext": Private("torch._guards", "TracingContext",
                              "a tracing context for a variant compiled lazily, outside Dynamo", _REQUIRED),
    "tracing": Private("torch._guards", "tracing", "enters that tracing context", _REQUIRED),
    "FakeTensor": Private("torch._subclasses.fake_tensor", "FakeTensor",
                          "tells Dynamo's example values apart (their fake mode)", _REQUIRED),
    "FakeTensorMode": Private("torch._subclasses.fake_tensor", "FakeTensorMode",
                              "runs passes, dry runs and FLOP counts on fake tensors", _REQUIRED),
    "ShapeEnv": Private("torch.fx.experimental.symbolic_shapes", "ShapeEnv",
                        "the symbolic token count k of a SUBSET variant, and its guards", _REQUIRED),
    "DimDynamic": Private("torch.fx.experimental.symbolic_shapes", "DimDynamic",
                          "marks the k axis of index inputs dynamic, everything else static", _REQUIRED),
    "StatelessSymbolicContext": Private("torch.fx.experimental.symbolic_shapes", "StatelessSymbolicContext",
                                        "the same, per input", _REQUIRED),
    "ConstantSource": Private("torch._dynamo.source", "ConstantSource",
                              "names the inputs and symbols duca adds to a graph", _REQUIRED),
    "OpOverload": Private("torch._ops", "OpOverload", "reads an op's schema (is it in place?) in dead-code removal",
                          _REQUIRED),
    "linear_op": Private("torch._C._nn", "linear", "counts F.linear calls in explain()'s op counts",
                         "explain() cannot count linears"),
    # Inner compilers
    "compile_fx": Private("torch._inductor.compile_fx", "compile_fx", "compiles each variant with Inductor",
                          "inner='inductor' fails; inner='eager' and 'aot_eager' still work"),
    "list_mode_options": Private("torch._inductor", "list_mode_options",
                                 "validates and applies torch.compile's mode= for the variants",
                                 "inner='inductor' fails"),
    "list_options": Private("torch._inductor", "list_options", "validates options= keys",
                            "options= cannot be validated: inner='inductor' with options fails"),
    "PyCodeCache": Private("torch._inductor.codecache", "PyCodeCache",
                           "which output-code modules a compile loaded (duca_compile.dump)",
                           "inner='inductor' fails"),
    "aot_eager": Private("torch._dynamo.backends.debugging", "aot_eager", "inner='aot_eager'",
                         "inner='aot_eager' fails"),
    # Dynamo's front end
    "backend_registry": Private("torch._dynamo.backends.registry", "",
                                "registers backend='duca' when the package runs without pip install",
                                "backend='duca' needs the installed entry point"),
    "OptimizedModule": Private("torch._dynamo.eval_frame", "OptimizedModule",
                               "tells what torch.compile(module) returned", _REQUIRED),
    "innermost_backend": Private("torch._dynamo.eval_frame", "innermost_backend",
                                 "the backend behind a compiled module (settings_of, enable(pipe))", _REQUIRED),
    "current_tx": Private("torch._dynamo.symbolic_convert", "InstructionTranslator.current_tx",
                                     "the module whose forward Dynamo is compiling (owner of a graph)",
                                     "the owner is found at run time by walking the call stack "
                                     "(a counted fallback: stats()['fallbacks'])"),
    "cache_entries": Private("torch._C._dynamo.eval_frame", "_debug_get_cache_entry_list",
                             "Dynamo's compiled bytecode of a frame (duca_compile.dump)",
                             "dump() writes no dynamo_*.py files"),
    "dynamo_counters": Private("torch._dynamo.utils", "counters", "graph breaks in the conformance checks",
                               "the conformance checks fail"),
    "dynamo_config": Private("torch._dynamo", "config", "recompile limits while counting full-size FLOPs",
                             "flops_report fails"),
}


def __getattr__(name: str):
    entry = SURFACE.get(name)
    if entry is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = entry.load()
    globals()[name] = value             # loaded once
    return value


def check_surface() -> list[tuple[str, Private, str]]:
    """(name, entry, error or "") for every entry, each loaded now."""
    out = []
    for name, entry in SURFACE.items():
        try:
            entry.load()
            out.append((name, entry, ""))
        except MissingTorchAPI as e:
            out.append((name, entry, str(e)))
    return out


# -- versions ------------------------------------------------------------------------------------

def torch_version(version: str | None = None) -> tuple[int, int]:
    """(major, minor) of ``version`` (default: the running torch), e.g. "2.13.0+cpu" -> (2, 13)."""
    parts = ((version or torch.__version__).split("+")[0].split(".") + ["0"])[:2]
    return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)


def in_tested_range(version: str | None = None) -> bool:
    return TESTED_TORCH[0] <= torch_version(version) <= TESTED_TORCH[1]


def _tested_text() -> str:
    (a, b), (c, d) = TESTED_TORCH
    return f"{a}.{b} to {c}.{d}"


def warn_if_untested() -> None:
    """One warning, at import, for a torch outside the tested range; duca still runs on it."""
    if not in_tested_range():
        warnings.warn(f"duca_compile is tested on torch {_tested_text()}; this is torch {torch.__version__}. "
                      "It may work; `python -m duca_compile.doctor` checks the private APIs it needs.",
                      stacklevel=3)


@contextlib.contextmanager
def unlimited_recompiles():
    """Dynamo's recompile limits raised out of the way (renamed from ``cache_size_limit`` in torch 2.6)."""
    config = __getattr__("dynamo_config")
    names = [n for n in ("recompile_limit", "accumulated_recompile_limit", "cache_size_limit",
                         "accumulated_cache_size_limit") if hasattr(config, n)][:2]
    with config.patch(**{n: 1 << 16 for n in names}):
        yield


# -- private attributes of torch objects ------------------------------------------------------

def backend_known(name: str) -> bool:
    """Whether Dynamo's backend registry has ``name`` (registered, or listed from an entry point)."""
    registry = __getattr__("backend_registry")
    return name in getattr(registry, "_BACKENDS", {}) or name in getattr(registry, "_COMPILER_FNS", {})


def original_module(model):
    """The module ``torch.compile(module)`` wrapped (``OptimizedModule._orig_mod``), else ``model``."""
    return getattr(model, "_orig_mod", model)


def compiled_call(module: torch.nn.Module):
    """What ``module.compile(...)`` installed (``nn.Module._compiled_call_impl``), or None."""
    return module.__dict__.get("_compiled_call_impl")


def set_compiled_call(module: torch.nn.Module, fn) -> None:
    module.__dict__["_compiled_call_impl"] = fn


def compile_callback(model):
    """The backend callback Dynamo runs for a compiled wrapper or a module compiled in place, or None:
    ``OptimizedModule.dynamo_ctx.callback``, or the ``callback`` cell of ``_compiled_call_impl``."""
    if isinstance(model, __getattr__("OptimizedModule")):
        return getattr(getattr(model, "dynamo_ctx", None), "callback", None)
    fn = compiled_call(model) if isinstance(model, torch.nn.Module) else None
    code = getattr(fn, "__code__", None)
    if code is None or "callback" not in code.co_freevars or fn.__closure__ is None:
        return None
    return fn.__closure__[code.co_freevars.index("callback")].cell_contents


def source_name(node) -> str:
    """Dynamo's name for a graph input's source (``node._dynamo_source``), e.g. ``L['timestep']``;
    the node's name when it has none."""
    src = getattr(node, "_dynamo_source", None)
    if src is None:
        return node.name
    name = getattr(src, "name", None)
    return name() if callable(name) else str(name)


def set_source_name(node, name: str) -> None:
    """Give a graph input duca adds a Dynamo source of that name (what ``source_name`` reads)."""
    node._dynamo_source = __getattr__("ConstantSource")(name)


def copy_node_source(old, new) -> None:
    """Carry a node's Dynamo source over to its copy (AOTAutograd finds static inputs by it)."""
    if hasattr(old, "_dynamo_source"):
        new._dynamo_source = old._dynamo_source


def copy_graph_sources(old, new) -> None:
    """Carry a GraphModule's parameter-name -> source map (``_param_name_to_source``) over to its copy."""
    if hasattr(old, "_param_name_to_source"):
        new._param_name_to_source = old._param_name_to_source


def view_base(t: torch.Tensor):
    """The tensor ``t`` is a view of (``Tensor._base``), or None; ``version(t)``: its in-place write
    counter (``Tensor._version``), shared by a view and its base."""
    return t._base


def version(t: torch.Tensor) -> int | None:
    """None for an inference tensor: it counts no writes."""
    try:
        return t._version
    except RuntimeError:
        return None


def compiling_frame_locals() -> dict | None:
    """The locals of the frame Dynamo is compiling right now, or None outside a compile."""
    current_tx = __getattr__("current_tx")
    try:
        tx = current_tx()
    except AttributeError:          # its thread-local is only set while Dynamo compiles
        return None
    return tx.f_locals if tx is not None else None
