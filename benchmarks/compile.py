"""``python -m benchmarks compile``: compile cost, cold and warm, per model and preset.

Each measurement is its own process (``python -m benchmarks.compile <size> <method> <cache dir>``),
so nothing compiled earlier in the run is reused: cold runs get an empty Inductor cache directory,
warm runs a second process on the directory the cold one filled. Compile seconds: the first
50-step request minus a second one in the same process (what the first request paid beyond
running). Rows: plain ``torch.compile``, plain regional compile (``compile_repeated_blocks``), and
per preset duca whole-model (``torch.compile(model, backend=duca)``) and duca regional
(``compile_repeated_blocks(backend=duca)``, a row named ``<preset> regional``).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

__all__ = ["Row", "run"]


@dataclass
class Row:
    size: str
    method: str
    cold_s: float
    warm_s: float
    variants: int | None
    warm_hits: int
    warm_misses: int
    cold_vs_plain: float | None = None
    warm_vs_plain: float | None = None


def _measure(size: str, method: str, steps: int) -> dict:
    """In this process: compile ``method`` on ``size``, run two requests, report compile seconds."""
    import warnings

    import torch
    from torch._dynamo.utils import counters

    import duca_compile

    from .sampling import request_starter
    from .speed import _model, _request

    warnings.simplefilter("ignore")
    model = _model(size, "cpu")
    variants = None
    preset, regional = method.removesuffix(" regional"), method.endswith(" regional")
    backend = "inductor" if preset == "plain" else duca_compile.duca_backend(duca_compile.presets("dit-xl-2", preset))
    if regional:
        if not getattr(model, "_repeated_blocks", None):       # diffusers declares none for DiT
            model._repeated_blocks = [type(model.transformer_blocks[0]).__name__]
        model.compile_repeated_blocks(backend=backend, fullgraph=True, dynamic=False)
        fn = model
    else:
        fn = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    duca = preset != "plain"
    starter = request_starter(fn, steps) if duca else contextlib.nullcontext(lambda: None)
    times = []
    with torch.no_grad(), starter as before:
        for _ in range(2):
            before()
            start = time.perf_counter()
            _request(fn, model, 2, steps, "cpu")
            times.append(time.perf_counter() - start)
    if duca:
        variants = duca_compile.stats(fn, flops=False)["variants_compiled"]
    return {"compile_s": max(times[0] - times[1], 0.0), "variants": variants,
            "hits": counters["inductor"]["fxgraph_cache_hit"], "misses": counters["inductor"]["fxgraph_cache_miss"]}


def _process(size: str, method: str, cache_dir: str, steps: int) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    done = subprocess.run([sys.executable, "-m", "benchmarks.compile", size, method, str(steps)], env=env,
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{size} / {method}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(sizes, methods, steps: int = 50, progress=lambda it, **kw: it) -> list[Row]:
    rows = []
    for size in sizes:
        base = None
        every = ["plain", "plain regional", *methods, *(f"{m} regional" for m in methods)]
        for method in progress(every, desc=size):
            with tempfile.TemporaryDirectory() as cache:
                cold = _process(size, method, cache, steps)
                warm = _process(size, method, cache, steps)
            row = Row(size, method, cold["compile_s"], warm["compile_s"], cold["variants"], warm["hits"],
                      warm["misses"])
            base = base or row
            row.cold_vs_plain, row.warm_vs_plain = row.cold_s / base.cold_s, row.warm_s / base.warm_s
            rows.append(row)
    return rows


if __name__ == "__main__":
    print(json.dumps(_measure(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
