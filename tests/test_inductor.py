"""True Inductor end-to-end runs (C++ kernels on CPU): DiT, PixArt, Flux, and from the conformance
families Wan (video, RoPE written by setitem), HunyuanDiT (RoPE gathered on SUBSET) and Lumina2
(graph breaks: the block piece follows the timestep piece); plus plain-compile parity."""
import pytest
import torch

import duca_compile
from duca_compile import FORAConfig, ScriptedConfig
from duca_compile.runtime import state_of
from duca_compile.settings import inner_compiler as _inner_compiler
from duca_compile.models import make_inputs, make_model

from helpers import FAMILIES, compile_tiny, run_against_oracle, timesteps

pytestmark = pytest.mark.inductor


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("family", FAMILIES + ["wan", "hunyuan-dit", "lumina2"])
def test_inductor_variants_equal_oracle(family):
    model, fast = compile_tiny(family, ScriptedConfig(modes=("full", "subset", "skip", "reuse"), ratio=0.5),
                               inner="inductor")
    modes = run_against_oracle(family, model, fast, timesteps(5), atol=1e-4)
    assert modes == ["full", "subset", "skip", "reuse", "full"]
    assert duca_compile.stats(fast)["variants_compiled"] == 4


def test_full_only_equals_plain_torch_compile():
    model = make_model("dit")
    plain = torch.compile(model, fullgraph=True)
    fast = torch.compile(model, backend=duca_compile.duca_backend(FORAConfig(interval=1)), fullgraph=True)
    for i, t in enumerate(timesteps(3)):
        kw = make_inputs("dit", model, timestep=t, seed=i)
        torch.testing.assert_close(fast(**kw)[0], plain(**kw)[0], atol=1e-5, rtol=1e-4)


def test_mode_and_options_reach_inductor(monkeypatch):
    seen = {}
    from duca_compile import _torch
    monkeypatch.setattr(_torch, "compile_fx", lambda gm, ex, config_patches=None: seen.update(config_patches),
                        raising=False)
    _inner_compiler("inductor", "max-autotune", {"freezing": True})(None, [])
    assert seen["max_autotune"] is True and seen["freezing"] is True


@pytest.mark.parametrize("family, config", [
    ("dit", duca_compile.ClusCaConfig(interval=3, clusters=4, propagation=0.2, max_order=2, first_enhance=2)),
    ("pixart", duca_compile.DuCaConfig(interval=3, ratio=0.5, selection="kv-norm", soft_fresh_weight=0.25,
                                       compute_first=1, ratio_schedule=duca_compile.RatioSchedule(step_weight=0.9))),
])
def test_inductor_method_variants_equal_oracle(family, config):
    """Taylor forecasts, cluster propagation, value-norm caches and per-site plans through Inductor;
    PixArt's step-dependent ratio runs a new k each SUBSET step through its one symbolic compile."""
    model, fast = compile_tiny(family, config, inner="inductor")
    with duca_compile.sampling(fast, num_steps=7):
        modes = run_against_oracle(family, model, fast, timesteps(7), atol=1e-4)
    assert len(set(modes)) >= 2 and duca_compile.stats(fast)["cache_hits"] > 0
    runner, piece = state_of(fast).graphs()[0]
    sized = [k for k in piece.variant_calls if runner.pattern(k) != k]
    assert runner.compiles == len({runner.pattern(k) for k in piece.variant_calls})
    if family == "pixart":
        assert len(sized) == 2 and len({runner.pattern(k) for k in sized}) == 1       # 2 k, 1 compile


# DuCa with a step-dependent ratio: F C A F C over 5 steps, the two C steps at different k
_DUCA_TWO_K = duca_compile.DuCaConfig(interval=3, ratio=0.5, ratio_schedule=duca_compile.RatioSchedule(step_weight=0.9))


@pytest.mark.smoke
@pytest.mark.parametrize("family", ["dit", "flux"])
def test_inductor_duca_one_subset_compile_serves_two_k(family):
    """The private surface end to end (fake inputs, a shape environment with symbolic k, a
    tracing context, compile_fx): DuCa through Inductor equals the oracle at every step, and one
    SUBSET compile runs two k. Runs in CI under the oldest and newest supported torch too."""
    model, fast = compile_tiny(family, _DUCA_TWO_K, inner="inductor")
    with duca_compile.sampling(fast, num_steps=5):
        modes = run_against_oracle(family, model, fast, timesteps(5), atol=1e-4)
    assert modes == ["full", "subset", "skip", "full", "subset"]
    runner, piece = state_of(fast).graphs()[0]
    sized = [k for k in piece.variant_calls if runner.pattern(k) != k]
    assert len(sized) == 2 and len({runner.pattern(k) for k in sized}) == 1 and runner.compiles == 3
    s = duca_compile.stats(fast)
    assert s["cache_hits"] > 0 and s["fallbacks"] == {} and s["flop_ratio"] < 1


def test_inductor_two_instances_one_backend_and_a_batch_change():
    """Two models behind one Inductor-compiled backend, compiled without dynamic=False and then
    given another batch size (Dynamo goes dynamic; duca specialises per shape): every call equals
    the same sequence run with eager variants, and each model's caches hit."""
    def run(inner):
        torch._dynamo.reset()
        models = [make_model("dit", seed=s) for s in (1, 2)]
        backend = duca_compile.duca_backend(FORAConfig(interval=2), inner=inner)
        fasts = [torch.compile(m, backend=backend) for m in models]
        outs = []
        for batch in (2, 3):
            for i, t in enumerate(timesteps(3)):
                for m, f in zip(models, fasts):
                    outs.append(f(**make_inputs("dit", m, batch=batch, timestep=t, seed=i))[0])
        return outs, [duca_compile.stats(f, flops=False) for f in fasts]

    reference, _ = run("eager")
    outs, stats = run("inductor")
    for i, (a, b) in enumerate(zip(outs, reference)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"call {i}: {m}")
    for s in stats:
        assert s["calls"] == 6 and s["steps"]["reuse"] == 2 and s["uncached"] == []


_WARM_START = """
import json, sys, torch
from torch._dynamo.utils import counters
import duca_compile
from duca_compile.models import make_inputs, make_model
step, artifacts = sys.argv[1], sys.argv[2]
if step == "load":
    torch.compiler.load_cache_artifacts(open(artifacts, "rb").read())
model = make_model("dit")
fast = torch.compile(model, backend=duca_compile.duca_backend(duca_compile.DuCaConfig()), dynamic=False)
with torch.no_grad():
    outs = [fast(**make_inputs("dit", model, timestep=t, seed=i))[0].sum().item()
            for i, t in enumerate((900.0, 800.0, 700.0))]
if step == "save":
    open(artifacts, "wb").write(torch.compiler.save_cache_artifacts()[0])
print(json.dumps({"variants": duca_compile.stats(fast, flops=False)["variants_compiled"], "outs": outs,
                  "hits": counters["inductor"]["fxgraph_cache_hit"], "misses": counters["inductor"]["fxgraph_cache_miss"]}))
"""


@pytest.mark.smoke
def test_warm_starts_load_every_variant_from_inductors_caches(tmp_path):
    """A second process with the same cache directory, and one that loads the artifacts saved by
    torch.compiler.save_cache_artifacts() into an empty one, compile no variant again."""
    import json
    import os
    import subprocess
    import sys

    def process(step, cache_dir):
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / cache_dir)}
        done = subprocess.run([sys.executable, "-c", _WARM_START, step, str(tmp_path / "artifacts.bin")],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    cold = process("save", "cache")
    assert cold["variants"] == 3 and cold["misses"] == 3 and cold["hits"] == 0      # F, C, A
    for warm in (process("warm", "cache"), process("load", "empty")):
        assert warm["hits"] == 3 and warm["misses"] == 0 and warm["outs"] == cold["outs"]
