"""``duca_compile.dump(model, directory)``: what each compiled variant computes, written to disk.

    pipe(...)                                   # or any call of a model compiled with duca
    duca_compile.dump(pipe.transformer, "duca_dump")

Per graph and variant (FULL, REUSE, SKIP, SUBSET(...), PARTIAL(...)): the FX graph the passes made
(``*.fx.py``) and, with Inductor, the Python module it generated (``*.inductor.py``); the bytecode
Dynamo made for the model's (and its blocks') forward, decompiled by depyf when it is installed
(``pip install depyf``; else listed by ``dis``); ``explain.txt``. Only variants that have run are
there: variants are compiled on their first step. ``with depyf.prepare_debug(dir):`` around the
calls works too, for depyf's own per-frame view.
"""
from __future__ import annotations

import dis
import os
import re
import shutil

import torch

from . import _torch
from .report import _variant_name, count_ops, explain
from .runtime import states_of
from .settings import OUTPUT_CODE

__all__ = ["dump"]


def dump(model, directory: str) -> list[str]:
    """Write every compiled variant of ``model`` (the compiled module, the ``torch.compile``
    wrapper, or a pipeline's transformer after ``enable``) under ``directory``; returns the paths.
    ValueError when the model has no caching state yet (it has not been called)."""
    module = _torch.original_module(model)
    states = states_of(model)
    if not states:
        raise ValueError(f"duca_compile.dump: {type(module).__name__} has no duca caching state; compile it with "
                         "the duca backend and call it once first (variants are compiled on first use)")
    os.makedirs(directory, exist_ok=True)
    written: list[str] = []

    def write(name: str, text: str) -> None:
        path = os.path.join(directory, name)
        with open(path, "w") as f:
            f.write(text)
        written.append(path)

    runners = list(dict.fromkeys(r for st in states for r, _ in st.graphs()))
    for g, runner in enumerate(runners):
        for v, (key, graph) in enumerate(runner.variant_graphs.items()):
            label = _variant_name(key)
            stem = f"graph{g}_variant{v}_{_file_name(label)}"
            ops = " ".join(f"{k}={n}" for k, n in count_ops(graph).items())
            write(stem + ".fx.py", f"# {label}: {ops}\n# blocks: {', '.join(runner.sitemap.blocks)}\n"
                                   f"{graph.code}")
            for i, path in enumerate(OUTPUT_CODE.get(runner.variant_fns.get(key), ())):
                target = os.path.join(directory, f"{stem}.inductor{i or ''}.py")
                shutil.copyfile(path, target)
                written.append(target)
    for name, text in _dynamo_code(module, states):
        write(name, text)
    try:
        write("explain.txt", explain(model) + "\n")
    except ValueError as e:              # compiled with several configs: explain needs the wrapper
        write("explain.txt", f"{e}\n")
    return written


def _file_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9=,]+", "_", label).strip("_")


def _dynamo_code(module: torch.nn.Module, states) -> list[tuple[str, str]]:
    """(file name, source) of the bytecode Dynamo made for each frame it compiled: the model's
    forward and, compiled block by block, each block class's forward."""
    owners = [module] + [_submodule(module, b.name) for st in states if st.regional is not None
                         for b in st.regional.blocks]
    codes = list(dict.fromkeys(getattr(type(m).forward, "__code__", None) for m in owners))
    out = []
    for code in filter(None, codes):
        for i, entry in enumerate(_torch.cache_entries(code)):
            out.append((f"dynamo_{code.co_name}_{code.co_firstlineno}_{i}.py", _decompile(entry.code)))
    return out


def _submodule(module: torch.nn.Module, name: str) -> torch.nn.Module:
    try:
        return module.get_submodule(name)
    except AttributeError:           # a block compiled on its own: it is the module
        return module


def _decompile(code) -> str:
    try:
        import depyf
    except ImportError:
        return "# depyf is not installed (pip install depyf): Dynamo's bytecode as dis lists it\n" + \
            "\n".join("# " + line for line in dis.Bytecode(code).dis().splitlines()) + "\n"
    return depyf.decompile(code)
