"""Backend behaviour: exactness, no recompiles, caches that hit, request/shape tracking, bad input."""
import math
import warnings

import pytest
import torch

import duca_compile
from duca_compile import DuCaConfig, FORAConfig, ScriptedConfig, TaylorSeerConfig, duca_backend
from duca_compile.runtime import state_of
from duca_compile.models import make_inputs, make_model

from helpers import FAMILIES, compile_tiny, timesteps

ALL_MODES = ("full", "subset", "skip", "reuse")


@pytest.mark.parametrize("family", FAMILIES)
def test_full_only_equals_plain_model(family):
    model, fast = compile_tiny(family, FORAConfig(interval=1))
    for i, t in enumerate(timesteps(4)):
        kw = make_inputs(family, model, timestep=t, seed=i)
        torch.testing.assert_close(fast(**kw)[0], model(**kw)[0], atol=1e-6, rtol=1e-5)
    assert duca_compile.stats(fast)["steps"] == {"full": 4, "reuse": 0, "skip": 0, "subset": 0, "partial": 0}


@pytest.mark.parametrize("family", FAMILIES)
def test_no_recompiles_across_requests_and_modes(family):
    model, fast = compile_tiny(family, ScriptedConfig(modes=ALL_MODES, ratio=0.3))
    ts = timesteps(10)
    fast(**make_inputs(family, model, timestep=ts[0]))          # the one compile
    with torch.compiler.set_stance("fail_on_recompile"):
        for request in range(2):
            for t in ts[1 - request:]:
                fast(**make_inputs(family, model, timestep=t, seed=request))
    s = duca_compile.stats(fast)
    assert s["requests"] == 2 and s["calls"] == 20
    assert all(s["steps"][m] > 0 for m in ALL_MODES)


@pytest.mark.parametrize("family", FAMILIES)
def test_caches_hit_and_change_the_output(family):
    model, fast = compile_tiny(family, DuCaConfig(interval=3, ratio=0.25))
    outs = []
    for t in timesteps(6):
        kw = make_inputs(family, model, timestep=t)
        outs.append((fast(**kw)[0], model(**kw)[0]))
    s = duca_compile.stats(fast)
    assert s["steps"] == {"full": 2, "reuse": 0, "skip": 2, "subset": 2, "partial": 0}   # F C A F C A
    assert s["cache_hits"] > 0 and s["tokens_computed"] < s["tokens_total"]
    layout = state_of(fast).graphs()[0][0].layout                 # one slot: every cache once
    assert s["cache_bytes"] == sum(math.prod(c.shape) * c.dtype.itemsize for c in layout.caches) > 0
    for step, (out, plain) in enumerate(outs):
        same = torch.allclose(out, plain, atol=1e-6)
        assert same == (step % 3 == 0), f"step {step}: cached output {'equals' if same else 'differs from'} FULL"


def test_same_seed_same_outputs_across_requests():
    model, fast = compile_tiny("pixart", DuCaConfig(interval=3, ratio=0.3, seed=7))
    runs = [[fast(**make_inputs("pixart", model, timestep=t))[0] for t in timesteps(5)] for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    assert duca_compile.stats(fast)["requests"] == 2


def test_seed_changes_the_selected_tokens():
    picks = []
    for seed in (0, 1):
        torch._dynamo.reset()
        model, fast = compile_tiny("dit", DuCaConfig(interval=3, ratio=0.25, seed=seed))
        for t in timesteps(2):
            fast(**make_inputs("dit", model, timestep=t))
        picks.append(state_of(fast).last_indices["transformer_blocks.0.ff"])
    assert not torch.equal(*picks)


@pytest.mark.parametrize("share", [True, False])
def test_cfg_halves_share_indices(share):
    model, fast = compile_tiny("dit", DuCaConfig(interval=3, ratio=0.5, share_cfg_indices=share, seed=3))
    for t in timesteps(2):
        fast(**make_inputs("dit", model, batch=4, timestep=t))
    idx = state_of(fast).last_indices["transformer_blocks.1.ff"]
    assert idx.shape == (4, 8)
    assert torch.equal(idx[:2], idx[2:]) == share


def test_separate_cond_uncond_passes_get_their_own_slots():
    model, fast = compile_tiny("pixart", ScriptedConfig(modes=ALL_MODES, ratio=0.4))
    from duca_compile.reference import ReferenceCache
    oracle = None
    for i, t in enumerate(timesteps(5)):
        for slot in range(2):  # cond then uncond, same timestep
            kw = make_inputs("pixart", model, timestep=t, seed=10 * i + slot)
            out = fast(**kw)[0]
            st = state_of(fast)
            assert st.slot == slot and st.step == i
            oracle = oracle or ReferenceCache.from_compiled(model, fast)
            ref = oracle(st.last_plan.mode, st.last_indices, slot=slot, **kw)[0]
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert duca_compile.stats(fast)["requests"] == 1


def test_explicit_sampling_context_does_not_read_timesteps():
    model, fast = compile_tiny("dit", FORAConfig(interval=2))
    kw = make_inputs("dit", model, timestep=500.0)
    fast(**kw)
    with duca_compile.sampling(fast, num_steps=4) as st:
        modes = []
        for _ in range(4):
            fast(**kw)                                     # same timestep every call: still 4 steps
            modes.append(st.last_plan.mode.value)
    assert modes == ["full", "reuse", "full", "reuse"]
    with pytest.raises(ValueError, match="calls_per_step"):
        with duca_compile.sampling(fast, calls_per_step=0):
            pass


def test_sampling_context_may_open_before_the_first_call():
    """The natural first request: the context is entered before Dynamo has compiled anything."""
    model, fast = compile_tiny("dit", FORAConfig(interval=2))
    kw = make_inputs("dit", model, timestep=500.0)
    with duca_compile.sampling(fast, num_steps=4):
        modes = []
        for _ in range(4):
            fast(**kw)                                     # same timestep every call: still 4 steps
            modes.append(state_of(fast).last_plan.mode.value)
    assert modes == ["full", "reuse", "full", "reuse"]
    assert state_of(fast).driver is None                   # the context is gone afterwards
    # the same module recompiled with another config inside a context: the new state follows it
    torch._dynamo.reset()
    other = torch.compile(model, backend=duca_backend(DuCaConfig(interval=3, count_down=True), inner="eager"),
                          fullgraph=True, dynamic=False)
    with duca_compile.sampling(other, num_steps=3):         # count_down needs num_steps
        for _ in range(3):
            other(**kw)
    steps = duca_compile.stats(other, flops=False)["steps"]          # x = 2, 1, 0 counting down: F C F
    assert (steps["full"], steps["subset"]) == (2, 1) and state_of(other).driver is None


def test_restarting_timesteps_start_a_new_request_and_reset():
    model, fast = compile_tiny("dit", FORAConfig(interval=10))
    first = [fast(**make_inputs("dit", model, timestep=t))[0] for t in timesteps(3)]
    second = [fast(**make_inputs("dit", model, timestep=t))[0] for t in timesteps(3)]
    assert duca_compile.stats(fast)["requests"] == 2
    assert duca_compile.stats(fast)["steps"]["full"] == 2
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    duca_compile.reset(fast)
    fast(**make_inputs("dit", model, timestep=100.0))
    assert duca_compile.stats(fast)["steps"]["full"] == 3


@pytest.mark.parametrize("change", ["batch", "resolution", "dtype"])
def test_shape_or_dtype_change_mid_request_resets_caches(change):
    model, fast = compile_tiny("dit", FORAConfig(interval=100))
    ts = timesteps(6)
    fast(**make_inputs("dit", model, timestep=ts[0]))
    fast(**make_inputs("dit", model, timestep=ts[1]))                        # REUSE
    kw = make_inputs("dit", model, timestep=ts[2], batch=3 if change == "batch" else 2)
    if change == "resolution":
        kw["hidden_states"] = torch.randn(2, 4, 4, 4)
    if change == "dtype":
        model.double()
        kw = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kw.items()}
    out = fast(**kw)[0]
    torch.testing.assert_close(out, model(**kw)[0], atol=1e-6, rtol=1e-5)   # ran FULL, nothing mixed
    s = duca_compile.stats(fast)
    assert s["shape_resets"] == 1 and s["steps"] == {"full": 2, "reuse": 1, "skip": 0, "subset": 0, "partial": 0}
    if change == "dtype":
        model.float()
    back = make_inputs("dit", model, timestep=ts[3])
    torch.testing.assert_close(fast(**back)[0], model(**back)[0], atol=1e-6, rtol=1e-5)  # old caches dropped
    assert duca_compile.stats(fast)["shape_resets"] == 2


def test_string_backend_with_options_and_entry_point():
    from importlib.metadata import entry_points

    assert any(ep.name == "duca" for ep in entry_points(group="torch_dynamo_backends"))
    model = make_model("dit")
    fast = torch.compile(model, backend="duca", options={"config": FORAConfig(interval=2), "inner": "eager"})
    for t in timesteps(2):
        fast(**make_inputs("dit", model, timestep=t))
    s = duca_compile.stats(fast)
    assert s["config"] == FORAConfig(interval=2) and s["steps"]["reuse"] == 1


def test_bare_backend_uses_the_default_config():
    model = make_model("dit")
    fast = torch.compile(model, backend=lambda gm, ex: duca_backend(gm, ex, options={"inner": "eager"}))
    fast(**make_inputs("dit", model))
    assert duca_compile.stats(fast)["config"] == TaylorSeerConfig(interval=3, max_order=1, first_enhance=6)


def test_two_compiled_models_never_share_caches():
    m1, f1 = compile_tiny("dit", FORAConfig(interval=3), seed=1)
    m2, f2 = compile_tiny("dit", FORAConfig(interval=3), seed=2)
    for t in timesteps(3):
        kw = make_inputs("dit", m1, timestep=t)
        f1(**kw)
        f2(**kw)
    assert state_of(f1) is not state_of(f2)
    assert duca_compile.stats(f1)["calls"] == duca_compile.stats(f2)["calls"] == 3


@pytest.mark.parametrize("bad, field", [
    (lambda: FORAConfig(interval=0), "interval"),
    (lambda: DuCaConfig(ratio=1.5), "ratio"),
    (lambda: DuCaConfig(interval=-2), "interval"),
    (lambda: DuCaConfig(selection="attention-map"), "selection"),
    (lambda: ScriptedConfig(modes=("full", "fast")), "modes"),
    (lambda: duca_backend("fora"), "config"),
    (lambda: duca_backend(FORAConfig(), inner="tensorrt"), "inner"),
])
def test_bad_config_raises_value_error_naming_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        bad()


class _PlainMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8))

    def forward(self, x):
        return self.net(x)


def test_model_without_blocks_warns_and_runs_plainly():
    model = _PlainMLP().eval()
    fast = torch.compile(model, backend=duca_backend(inner="eager"))
    x = torch.randn(3, 8)
    with pytest.warns(UserWarning, match="no caching for this graph.*no residual branch"):
        out = fast(x)
    torch.testing.assert_close(out, model(x))


def test_grad_mode_falls_back_with_a_warning():
    model = make_model("dit")
    kw = make_inputs("dit", model)
    with torch.enable_grad():
        fast = torch.compile(model, backend=duca_backend(inner="eager"))
        with pytest.warns(UserWarning, match="grad mode"):
            torch.testing.assert_close(fast(**kw)[0], model(**kw)[0])


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic", "dynamic=True"])
def test_graphs_dynamo_made_dynamic_are_specialised_per_shape_and_cached(dynamic):
    """Without dynamic=False a batch change makes Dynamo trace symbolic sizes, and that graph then
    serves every shape, the first included: each concrete shape gets a static, cached copy."""
    model = make_model("dit")
    fast = torch.compile(model, backend=duca_backend(ScriptedConfig(modes=ALL_MODES, ratio=0.5), inner="eager"),
                         dynamic=dynamic)
    from duca_compile.reference import ReferenceCache

    with warnings.catch_warnings():
        warnings.simplefilter("error")                          # no "no caching" warning
        for request, batch in enumerate((2, 3, 2)):
            oracle = None
            for i, t in enumerate(timesteps(4)):
                kw = make_inputs("dit", model, batch=batch, timestep=t, seed=10 * request + i)
                out = fast(**kw)[0]
                oracle = oracle or ReferenceCache.from_compiled(model, fast)
                torch.testing.assert_close(out, oracle.replay(fast, **kw)[0], atol=1e-5, rtol=1e-4)
    s = duca_compile.stats(fast, flops=False)
    assert s["requests"] == 3 and s["uncached"] == [] and s["fallback_calls"] == 0
    assert {m: s["steps"][m] for m in ALL_MODES} == {"full": 3, "subset": 3, "skip": 3, "reuse": 3}


class _WithGraphBreak(torch.nn.Module):
    """A user wrapper whose own code breaks the graph before calling the transformer."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, hidden_states, timestep, class_labels):
        print("host-side logging")        # a graph break
        return self.inner(hidden_states, timestep=timestep, class_labels=class_labels, return_dict=False)


def test_graph_breaks_still_cache_per_piece():
    inner = make_model("dit")
    wrapper = _WithGraphBreak(inner).eval()
    fast = torch.compile(wrapper, backend=duca_backend(ScriptedConfig(modes=ALL_MODES), inner="eager"))
    from duca_compile.reference import ReferenceCache
    oracle = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, t in enumerate(timesteps(5)):
            kw = make_inputs("dit", inner, timestep=t, seed=i)
            kw.pop("return_dict")
            out = fast(**kw)[0]
            st = state_of(fast)
            oracle = oracle or ReferenceCache.from_compiled(wrapper, fast)
            ref = oracle(st.last_plan.mode, st.last_indices, **kw)[0]
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert all(duca_compile.stats(fast)["steps"][m] > 0 for m in ALL_MODES)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_positional_timestep_is_found_through_the_forward_signature(family):
    """diffusers decorates Flux's and SD3's forward (``*args``), so Dynamo names a positional
    timestep ``L['args'][3]``; the signature of the forward says it is the timestep."""
    import inspect

    ts = timesteps(4)
    by_name = []
    model, fast = compile_tiny(family, FORAConfig(interval=2))
    for i, t in enumerate(ts):
        by_name.append(fast(**make_inputs(family, model, timestep=t, seed=i))[0])
    torch._dynamo.reset()
    model, fast = compile_tiny(family, FORAConfig(interval=2))
    names = list(inspect.signature(model.forward).parameters)
    for i, t in enumerate(ts):
        kw = make_inputs(family, model, timestep=t, seed=i)
        positional = [kw.pop(n) for n in names[:names.index("timestep") + 1]]
        assert torch.equal(fast(*positional, **kw)[0], by_name[i])
    s = duca_compile.stats(fast, flops=False)
    assert s["fallback_calls"] == 0 and s["steps"]["reuse"] == 2


def test_a_timestep_jump_starts_a_new_request():
    """An early-stopped request, then an img2img-style one starting lower: the jump (300 after
    steps of 20) is no step of the same request, so the first call of the new one runs FULL."""
    model, fast = compile_tiny("dit", FORAConfig(interval=10))
    for i, t in enumerate((900.0, 880.0, 860.0)):
        fast(**make_inputs("dit", model, timestep=t, seed=i))
    kw = make_inputs("dit", model, timestep=560.0, seed=7)
    torch.testing.assert_close(fast(**kw)[0], model(**kw)[0], atol=1e-6, rtol=1e-5)
    fast(**make_inputs("dit", model, timestep=540.0, seed=8))
    s = duca_compile.stats(fast, flops=False)
    assert s["requests"] == 2 and s["steps"]["full"] == 2 and s["steps"]["reuse"] == 3


def test_grad_mode_calls_inside_a_request_still_count_as_steps():
    """Calls run plainly in grad mode advance the step, and leave the caches stale for the next
    cached call (which runs FULL) instead of letting it reuse caches from four steps earlier."""
    model, fast = compile_tiny("dit", FORAConfig(interval=3))
    ts = timesteps(8)
    fast(**make_inputs("dit", model, timestep=ts[0]))                        # step 0: FULL
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in ts[1:5]:                                                   # steps 1-4: plain, grad mode
            fast(**make_inputs("dit", model, timestep=t))
    kw = make_inputs("dit", model, timestep=ts[5])
    torch.testing.assert_close(fast(**kw)[0], model(**kw)[0], atol=1e-6, rtol=1e-5)   # step 5: FULL
    st = state_of(fast)
    assert st.step == 5 and st.last_plan.mode.value == "full"
    fast(**make_inputs("dit", model, timestep=ts[6]))                        # step 6: FULL (6 % 3)
    fast(**make_inputs("dit", model, timestep=ts[7]))                        # step 7: reuses step 6
    s = duca_compile.stats(fast, flops=False)
    assert s["requests"] == 1 and s["uncached_calls"] == 4 and s["steps"] == {
        "full": 3, "reuse": 1, "skip": 0, "subset": 0, "partial": 0}
    assert any("grad mode" in why for why in s["uncached"])


@pytest.mark.parametrize("options, field", [
    ({"inner": "nope"}, "inner"),
    ({"config": "fora"}, "config"),
    ({"freezing": True}, "inner='eager' compiles nothing"),
])
def test_bad_compile_options_raise_value_error_naming_them(options, field):
    model = make_model("dit")
    fast = torch.compile(model, backend="duca", options={"inner": "eager", **options})
    with pytest.raises(Exception, match=field) as info:
        fast(**make_inputs("dit", model))
    error, causes = info.value, []
    while error is not None:                                    # Dynamo wraps what a backend raises
        causes.append(error)
        error = error.__cause__ or getattr(error, "inner_exception", None)
    assert any(isinstance(e, ValueError) for e in causes), causes


@pytest.mark.parametrize("bad, field", [
    (lambda: duca_backend(FORAConfig(), inner="eager", options={"freezing": True}), "inner='eager'"),
    (lambda: duca_backend(FORAConfig(), options={"no_such_inductor_key": 1}), "no_such_inductor_key"),
    (lambda: duca_backend(FORAConfig(), mode="fastest"), "mode"),
])
def test_bad_backend_arguments_raise_value_error_at_construction(bad, field):
    with pytest.raises(ValueError, match=field):
        bad()


def test_more_calls_than_sampling_declared_raise_value_error():
    model, fast = compile_tiny("dit", FORAConfig(interval=2))
    kw = make_inputs("dit", model)
    with pytest.raises(ValueError, match="num_steps=2"):
        with duca_compile.sampling(fast, num_steps=2):
            for _ in range(3):
                fast(**kw)
    with pytest.raises(ValueError, match="num_steps"):
        with duca_compile.sampling(fast, num_steps=True):
            pass
