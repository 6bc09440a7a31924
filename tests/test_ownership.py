"""Caching state belongs to the model instance whose weights a call carries, under one backend setting.

Dynamo serves every instance of a class with the graph compiled for the first (parameters are graph
inputs), so the state must be found from the call's weights, never from the graph that served it.
"""
import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import given, strategies as st

import duca_compile
from duca_compile import DuCaConfig, FORAConfig, ScriptedConfig, TaylorSeerConfig, duca_backend
from duca_compile.runtime import state_of
from duca_compile.models import make_inputs, make_model

from helpers import timesteps

ALL_MODES = ("full", "subset", "skip", "reuse")


def _compile(model, form, config, shared):
    """``model`` compiled the way a user would: ``form`` names the backend spelling; "shared" and
    "module.compile" use the one backend object ``shared``."""
    if form == "module.compile":
        model.compile(backend=shared, dynamic=False)
        return model
    backend = {"name": "duca", "bare": duca_backend}.get(form, shared)
    options = {"config": config, "inner": "eager"} if form == "name" else None
    return torch.compile(model, backend=backend, options=options, dynamic=False)


def _alone(seed, config, ts, family="dit"):
    """What a fresh model with ``seed`` gives for ``ts`` when nothing else shares its backend."""
    torch._dynamo.reset()
    model = make_model(family, seed=seed)
    fast = torch.compile(model, backend=duca_backend(config, inner="eager"), dynamic=False)
    outs = [fast(**make_inputs(family, model, timestep=t, seed=i))[0] for i, t in enumerate(ts)]
    torch._dynamo.reset()
    return outs


@pytest.fixture
def bare_backend_eager(monkeypatch):
    """The bare ``backend=duca_backend`` compiles ``DEFAULT_CONFIG`` with Inductor; the same path
    with eager variants, and with ``DuCaConfig()``, the config the test compares against."""
    import duca_compile.backend as backend

    monkeypatch.setattr(backend, "_DEFAULT", backend.DuCaBackend(DuCaConfig(), inner="eager"))


@pytest.mark.smoke
@pytest.mark.parametrize("form", ["bare", "name", "shared", "module.compile"])
def test_two_instances_behind_one_backend_keep_their_own_state(form, request):
    if form == "bare":
        request.getfixturevalue("bare_backend_eager")
    config = DuCaConfig()                                       # F C A F ...
    ts1, ts2 = timesteps(4), timesteps(4, start=650.0)
    ref1, ref2 = _alone(1, config, ts1), _alone(2, config, ts2)
    m1, m2 = make_model("dit", seed=1), make_model("dit", seed=2)
    shared = duca_backend(config, inner="eager")
    f1, f2 = (_compile(m, form, config, shared) for m in (m1, m2))
    for i in range(4):                                          # f1 at t=900, then f2 at t=650, ...
        kw1, kw2 = (make_inputs("dit", m, timestep=ts[i], seed=i) for m, ts in ((m1, ts1), (m2, ts2)))
        out1, out2 = f1(**kw1)[0], f2(**kw2)[0]
        if i == 0:                                              # model 2's first call is FULL
            torch.testing.assert_close(out2, m2.forward(**kw2)[0], atol=1e-6, rtol=1e-5)   # not m2(): compiled in place
        assert torch.equal(out1, ref1[i]) and torch.equal(out2, ref2[i]), f"call {i}"
    s1, s2 = duca_compile.stats(f1, flops=False), duca_compile.stats(f2, flops=False)
    assert s1["calls"] == s2["calls"] == 4 and s1["requests"] == s2["requests"] == 1
    assert s1["steps"]["skip"] == s2["steps"]["skip"] == 1       # the caches hit, per model
    assert state_of(f1) is not state_of(f2)


def test_one_module_compiled_with_two_configs_keeps_two_states():
    """An A/B test: FORA and DuCa on the same module; each wrapper reports on and drives its own."""
    ts = timesteps(6)
    fora_ref, duca_ref = _alone(0, FORAConfig(interval=2), ts), _alone(0, DuCaConfig(), ts)
    m = make_model("dit", seed=0)
    fora = torch.compile(m, backend=duca_backend(FORAConfig(interval=2), inner="eager"), dynamic=False)
    duca = torch.compile(m, backend=duca_backend(DuCaConfig(), inner="eager"), dynamic=False)
    for i, t in enumerate(ts):
        kw = make_inputs("dit", m, timestep=t, seed=i)
        assert torch.equal(fora(**kw)[0], fora_ref[i]) and torch.equal(duca(**kw)[0], duca_ref[i])
    assert duca_compile.stats(fora, flops=False)["config"] == FORAConfig(interval=2)
    assert duca_compile.stats(duca, flops=False)["steps"] == {"full": 2, "subset": 2, "skip": 2, "reuse": 0,
                                                             "partial": 0}
    with pytest.raises(ValueError, match="compiled with 2 duca settings"):
        state_of(m)                                             # the bare module does not say which
    kw = make_inputs("dit", m, timestep=500.0)
    with duca_compile.sampling(fora, num_steps=4) as st:        # the timestep never changes inside
        modes = []
        for _ in range(4):
            fora(**kw)
            modes.append(st.last_plan.mode.value)
        duca(**kw)                                              # untouched by FORA's context: its
    assert modes == ["full", "reuse", "full", "reuse"]          # timestep (500 after 100) restarts it
    assert state_of(duca).driver is None and duca_compile.stats(duca, flops=False)["requests"] == 2
    before = state_of(duca).epoch
    duca_compile.reset(fora)
    assert state_of(duca).epoch == before


class _BreakingWrapper(torch.nn.Module):
    """A user wrapper whose own code breaks the graph between two pieces that hold parameters."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.scale = inner, torch.nn.Linear(4, 4)

    def forward(self, hidden_states, timestep, class_labels):
        t = timestep * torch.sigmoid(self.scale.weight).mean()    # a first piece with parameters
        print("host-side logging", end="\r")                      # a graph break
        return self.inner(hidden_states, timestep=t, class_labels=class_labels, return_dict=False)


def test_graph_broken_instances_share_a_backend_and_keep_their_own_state():
    config = ScriptedConfig(modes=ALL_MODES, ratio=0.5)
    ts = timesteps(5)

    def run(wrappers, fasts):
        outs = {id(w): [] for w in wrappers}
        for i, t in enumerate(ts):
            for w, f in zip(wrappers, fasts):
                kw = make_inputs("dit", w.inner, timestep=t, seed=i)
                kw.pop("return_dict")
                outs[id(w)].append(f(**kw)[0])
        return [outs[id(w)] for w in wrappers]

    def wrapper(seed):
        torch.manual_seed(seed)
        return _BreakingWrapper(make_model("dit", seed=seed)).eval()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alone = [run([w], [torch.compile(w, backend=duca_backend(config, inner="eager"))])[0]
                 for w in (wrapper(1), wrapper(2))]
        torch._dynamo.reset()
        w1, w2 = wrapper(1), wrapper(2)
        shared = duca_backend(config, inner="eager")
        f1, f2 = torch.compile(w1, backend=shared), torch.compile(w2, backend=shared)
        together = run([w1, w2], [f1, f2])
    for a, b in zip(alone, together):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    for f in (f1, f2):
        s = duca_compile.stats(f, flops=False)
        assert s["calls"] == 5 and all(s["steps"][m] > 0 for m in ALL_MODES) and s["fallback_calls"] == 0


CONFIGS = st.one_of(
    st.builds(FORAConfig, interval=st.integers(1, 3)),
    st.builds(DuCaConfig, interval=st.integers(2, 4), ratio=st.sampled_from([0.25, 0.5]), seed=st.integers(0, 3)),
    st.builds(ScriptedConfig, modes=st.lists(st.sampled_from(ALL_MODES), min_size=1, max_size=4).map(tuple),
              ratio=st.sampled_from([0.25, 0.5])),
    st.builds(TaylorSeerConfig, interval=st.integers(2, 3), max_order=st.integers(0, 2)),
)


@given(c1=CONFIGS, c2=CONFIGS, same_module=st.booleans(), share=st.booleans(),
       order=st.lists(st.sampled_from([0, 1]), min_size=4, max_size=10))
def test_any_two_models_any_interleaving_give_what_each_gives_alone(c1, c2, same_module, share, order):
    """Two models (or one module compiled twice), any configs, one backend object or two, calls in
    any order: each call's output is exactly what that model gives when it runs alone."""
    share = share and c1 == c2 and not same_module   # one backend object serves one setting
    seeds = (0, 0) if same_module else (1, 2)
    ts = [timesteps(order.count(k), start=900.0 - 100 * k) for k in (0, 1)]
    alone = [_alone(seeds[k], c, ts[k]) for k, c in enumerate((c1, c2))]
    models = [make_model("dit", seed=seeds[0])]
    models.append(models[0] if same_module else make_model("dit", seed=seeds[1]))
    backends = [duca_backend(c1, inner="eager")] * 2 if share else [duca_backend(c, inner="eager") for c in (c1, c2)]
    fasts = [torch.compile(m, backend=b, dynamic=False) for m, b in zip(models, backends)]
    done = [0, 0]
    for k in order:
        i = done[k]
        out = fasts[k](**make_inputs("dit", models[k], timestep=ts[k][i], seed=i))[0]
        assert torch.equal(out, alone[k][i]), f"model {k}, its call {i}"
        done[k] += 1
    for k in (0, 1):
        if done[k]:
            assert duca_compile.stats(fasts[k], flops=False)["calls"] == done[k]
    torch._dynamo.reset()


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("import_first", [False, True])
def test_backend_name_works_in_a_fresh_process(import_first):
    """``backend="duca"`` through the entry point, whether or not the package was imported first."""
    code = ("import torch\n" + ("import duca_compile\n" if import_first else "") +
            "f = torch.compile(torch.nn.Linear(2, 2), backend='duca', options={'inner': 'eager'})\n"
            "import warnings; warnings.simplefilter('ignore')\n"
            "with torch.no_grad(): f(torch.randn(3, 2))\n"
            "import sys; print('imported' if 'duca_compile' in sys.modules else 'not imported')\n")
    done = _fresh_python(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "imported"


def test_caches_are_freed_with_the_graphs_dynamo_drops():
    import gc
    import weakref

    model = make_model("dit")
    fast = torch.compile(model, backend=duca_backend(FORAConfig(interval=2), inner="eager"), dynamic=False)
    for t in timesteps(2):
        fast(**make_inputs("dit", model, timestep=t))
    (runner, piece), = state_of(fast).graphs()
    cache = weakref.ref(piece.slots[0].caches[0])
    del runner, piece
    torch._dynamo.reset()
    gc.collect()
    assert cache() is None and state_of(fast).graphs() == []
