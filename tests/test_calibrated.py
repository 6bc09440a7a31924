"""Calibrated (MagCache-style) schedules: ``calibrate`` measures what diffusers' MagCache calibration
measures, the static schedule reproduces MagCache's outputs on the trained DiT, and the compiled
method equals the eager oracle with its caches hit and no recompile on a second request."""
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import duca_compile
from duca_compile import CalibratedConfig, Calibration, calibrate
from duca_compile.policies.calibrated import calibrated_full_steps, resample

from helpers import FAMILIES, compile_tiny, run_against_oracle, timesteps

RATIOS = (1.0, 0.99, 0.98, 1.01, 0.97, 0.95, 0.99, 0.9, 0.96)


def test_config_rejects_bad_fields_by_name(tmp_path):
    for bad in ((), (1.0, -0.5), (1.0, float("nan")), "1.0", (True,)):
        with pytest.raises(ValueError, match="mag_ratios"):
            CalibratedConfig(mag_ratios=bad)
    for field, value in (("threshold", -0.1), ("max_skip", 1.5), ("retention", 1.2), ("max_order", -1)):
        with pytest.raises(ValueError, match=f"CalibratedConfig.{field}"):
            CalibratedConfig(mag_ratios=RATIOS, **{field: value})
    (tmp_path / "other.json").write_text(json.dumps({"ratios": [1.0]}))
    with pytest.raises(ValueError, match="no 'mag_ratios'"):
        CalibratedConfig.from_file(tmp_path / "other.json")


def test_resampling_is_magcaches_nearest_interpolation():
    from diffusers.hooks.mag_cache import nearest_interp

    ratios = tuple(float(r) for r in torch.linspace(1.0, 0.8, 28))
    for n in (1, 2, 7, 28, 50):
        assert resample(ratios, n) == tuple(nearest_interp(torch.tensor(ratios), n).tolist())


@given(ratios=st.lists(st.floats(0.7, 1.3), min_size=2, max_size=30), threshold=st.floats(0, 0.5),
       max_skip=st.integers(0, 5), retention=st.floats(0, 1))
def test_schedule_properties(ratios, threshold, max_skip, retention):
    full = calibrated_full_steps(tuple(ratios), len(ratios), threshold, max_skip, retention)
    keep = int(retention * len(ratios) + 0.5)
    assert full[0] and all(full[:keep])
    run = 0
    for f in full:                                   # never more than max_skip reused steps in a row
        run = 0 if f else run + 1
        assert run <= max_skip
    if max_skip == 0 or threshold == 0 and all(r != 1.0 for r in ratios):
        assert all(full)
    looser = calibrated_full_steps(tuple(ratios), len(ratios), threshold + 1.0, max_skip, retention)
    assert sum(looser) <= sum(full)                  # a larger allowed error never computes more


def test_calibration_and_schedule_reproduce_diffusers_magcache_on_the_trained_dit():
    """The same ratios as diffusers' calibration mode (one request, CFG batched), and with them the
    same steps computed as diffusers' MagCache hooks decide at run time. The samples are close, not
    equal: a duca R step applies the current step's adaLN gates to the cached branch outputs, where
    MagCache adds the last computed residual as it was."""
    from benchmarks.fidelity import Setup, _duca, _peer
    from benchmarks.metrics import psnr
    from benchmarks.models import load_dit
    from benchmarks.peers import MagCache, calibration_request
    from benchmarks.sampling import starts

    steps = 12
    setup = Setup(samples=4, batch=4, steps=steps, guidance=1.5, inner="eager", sweep=())
    model = load_dit()
    noise, labels = starts(4, seed=5)
    ours = calibrate(model, lambda: calibration_request(lambda *a, **k: model(*a, **k), steps, cfg=True))
    ran = []                                           # per model call: did block 1 run its attention?
    hooks = [model.register_forward_pre_hook(lambda m, a: ran.append(False)),
             model.transformer_blocks[1].attn1.register_forward_hook(lambda m, a, o: ran.__setitem__(-1, True))]
    peer = MagCache("diffusers MagCache", "diffusers", {}, threshold=0.04, max_skip=2, retention=0.2)
    try:
        want, peer_flops, *_ = _peer(model, peer, setup, noise, labels)
    finally:
        for h in hooks:
            h.remove()
    theirs = peer._run["mag_ratios"]
    assert len(ours.mag_ratios) == steps and ours.mag_ratios[0] == 1.0
    assert max(abs(a - b) for a, b in zip(ours.mag_ratios, theirs)) < 1e-5
    full = calibrated_full_steps(ours.mag_ratios, steps, 0.04, 2, 0.2)
    # calls: calibration, a FLOP-counted request, the timed one, then the plain FLOP count (all computed)
    assert tuple(ran[-2 * steps:-steps]) == full and steps - sum(full) >= 3 and all(ran[-steps:])
    config = CalibratedConfig(mag_ratios=ours.mag_ratios, threshold=0.04, max_skip=2, retention=0.2)
    got, flop_ratio, *_ = _duca(model, config, setup, noise, labels)
    assert abs(flop_ratio - peer_flops) < 0.02 and psnr(got, want) > 30


@pytest.mark.parametrize("family", FAMILIES)
def test_calibrated_schedule_equals_the_oracle_and_hits_its_caches(family):
    config = CalibratedConfig(mag_ratios=RATIOS, threshold=0.1, max_skip=2, retention=0.0, max_order=1)
    model, fast = compile_tiny(family, config)
    full = calibrated_full_steps(RATIOS, 9, 0.1, 2, 0.0)
    with duca_compile.sampling(fast, num_steps=9):
        modes = run_against_oracle(family, model, fast, timesteps(9))
    assert modes == ["full" if f else "reuse" for f in full] and "reuse" in modes
    assert duca_compile.stats(fast)["cache_hits"] > 0
    with torch.compiler.set_stance("fail_on_recompile"), duca_compile.sampling(fast, num_steps=9):
        run_against_oracle(family, model, fast, timesteps(9), input_seed=20)


def test_calibrate_finds_one_request_and_refuses_what_it_cannot_measure(tmp_path):
    from duca_compile.models import make_inputs, make_model

    model = make_model("dit")
    ts = timesteps(5)
    found = calibrate(model, lambda: [model(**make_inputs("dit", model, timestep=t, seed=i)) for i, t in enumerate(ts)])
    assert found.num_steps == 5 and found.mag_ratios[0] == 1.0 and all(r > 0 for r in found.mag_ratios)
    loaded = CalibratedConfig.from_file(found.save(tmp_path / "cal.json"), threshold=0.2)
    assert loaded.mag_ratios == found.mag_ratios and Calibration.load(tmp_path / "cal.json") == found
    with pytest.raises(ValueError, match="second request"):
        calibrate(model, lambda: [model(**make_inputs("dit", model, timestep=t)) for t in ts + ts])
    fast = torch.compile(model, backend="eager")
    with pytest.raises(ValueError, match="uncompiled"):
        calibrate(fast, lambda: fast(**make_inputs("dit", model, timestep=ts[0])))


@pytest.mark.parametrize("family", ["flux", "pixart"])
def test_calibrate_reads_the_image_stream_of_multi_stream_and_cross_attention_stacks(family):
    """Flux's blocks return (text, image) pairs, its last block is a single-stream one; PixArt's
    take the text through cross-attention: the residual is the image stream's either way."""
    from duca_compile.models import make_inputs, make_model

    model = make_model(family)
    seen = []
    model.register_forward_hook(lambda m, a, out: seen.append(1))
    found = calibrate(model, lambda: [model(**make_inputs(family, model, timestep=t, seed=i))
                                      for i, t in enumerate(timesteps(4))])
    assert found.num_steps == 4 == len(seen) and found.mag_ratios[0] == 1.0
    assert all(0 < r < 10 and r != 1.0 for r in found.mag_ratios[1:])


def test_calibrated_without_the_number_of_steps_says_how_to_give_it():
    from duca_compile.models import make_inputs

    model, fast = compile_tiny("dit", CalibratedConfig(mag_ratios=RATIOS))
    fast(**make_inputs("dit", model, timestep=500.0))            # a request's first step is FULL anyway
    with pytest.raises(ValueError, match="number of denoising steps"):
        fast(**make_inputs("dit", model, timestep=400.0))
