"""Property tests: compiled variants equal the eager oracle step by step, over random tiny
configs, random step plans and random token subsets."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from duca_compile import ScriptedConfig

from helpers import FAMILIES, compile_tiny, run_against_oracle, timesteps

MODES = ["full", "reuse", "skip", "subset"]


@pytest.mark.parametrize("family", FAMILIES)
@given(layers=st.integers(1, 3), heads=st.sampled_from([1, 2]), batch=st.integers(1, 3),
       plan=st.lists(st.sampled_from(MODES), min_size=2, max_size=6),
       ratio=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_compiled_equals_oracle(family, layers, heads, batch, plan, ratio, seed):
    import torch
    torch._dynamo.reset()
    kw = {"layers": layers, "heads": heads}
    if family == "flux":
        kw["single_layers"] = layers
    config = ScriptedConfig(modes=tuple(plan), ratio=ratio, seed=seed)
    model, fast = compile_tiny(family, config, seed=seed, **kw)
    modes = run_against_oracle(family, model, fast, timesteps(len(plan) + 1), batch=batch, input_seed=seed)
    assert modes[0] == "full"
    for got, want in zip(modes[1:], [plan[i % len(plan)] for i in range(1, len(plan) + 1)]):
        # a SUBSET step whose k rounds to 0 (or to every token) runs as REUSE (or computes those sites)
        assert got == want or (want == "subset" and got in ("reuse", "partial"))
