"""Schedules of the policies, as properties over any step count and interval (no compiling)."""
import dataclasses
import math

from hypothesis import given, settings
from hypothesis import strategies as st

import pytest
import torch

import duca_compile
from duca_compile import ClusCaConfig, DuCaConfig, FORAConfig, Mode, RatioSchedule, TaylorSeerConfig, ToCaConfig
from duca_compile.passes import Site
from duca_compile.policies import StepPlan, make_policy


@settings(max_examples=200)
@given(interval=st.integers(1, 12), steps=st.integers(1, 100))
def test_fora_runs_ceil_steps_over_interval_full_steps(interval, steps):
    plans = [make_policy(FORAConfig(interval=interval)).plan(s, steps) for s in range(steps)]
    assert sum(p.mode is Mode.FULL for p in plans) == math.ceil(steps / interval)
    assert {p.mode for p in plans} <= {Mode.FULL, Mode.REUSE}


@settings(max_examples=200)
@given(interval=st.integers(1, 12), steps=st.integers(1, 100), ratio=st.floats(0, 1))
def test_duca_alternates_conservative_and_aggressive_after_each_full_step(interval, steps, ratio):
    policy = make_policy(DuCaConfig(interval=interval, ratio=ratio))
    for s in range(steps):
        plan, r = policy.plan(s, steps), s % interval
        expected = Mode.FULL if r == 0 else Mode.SUBSET if r % 2 else Mode.SKIP
        assert plan.mode is expected
        assert 0.0 <= plan.ratio <= 1.0 and (plan.ratio == ratio) == (expected is Mode.SUBSET or ratio == 0)


def test_duca_matches_the_official_pixart_pattern():
    letters = {Mode.FULL: "F", Mode.SUBSET: "C", Mode.SKIP: "A"}
    patterns = {1: "FFFFFF", 2: "FCFCFC", 3: "FCAFCA", 5: "FCACAF"}
    for interval, pattern in patterns.items():
        policy = make_policy(DuCaConfig(interval=interval))
        assert "".join(letters[policy.plan(s).mode] for s in range(6)) == pattern


def _letters(config, steps):
    policy = make_policy(config)
    names = {Mode.FULL: "F", Mode.SUBSET: "C", Mode.SKIP: "A", Mode.REUSE: "R"}
    return "".join(names[policy.plan(s, steps).mode] for s in range(steps))


def _official_types(n, steps, weight, forced, layers=3, aggressive=True, count_down=True):
    """The official DiT / PixArt step-type code as written, block by block: ``cal_type`` with the
    shared ``cal_threshold``, updated by ``force_scheduler`` in every full block (the interval in
    float32 with torch's round-half-to-even). One string of block letters per step."""
    threshold, rows = n, []
    for s in range(steps):
        x = steps - 1 - s if count_down else s
        row = ""
        for _ in range(layers):
            interval = n if s == 0 else threshold
            if s == 0 or x % interval == 0:
                row += "F"
                bounds = [(int(lo * steps), int(hi * steps), v) if isinstance(lo, float) else (lo, hi, v)
                          for lo, hi, v in forced]                       # fractions of T: int(f·T)
                factor = torch.tensor(1 + weight - 2 * weight * x / steps)
                threshold = int(torch.round(n / factor))
                threshold = next((v for lo, hi, v in bounds if lo <= x < hi), threshold)
            else:
                row += "C" if (x % interval) % 2 or not aggressive else "A"
        rows.append(row)
    return rows


def _layer_letters(config, steps, layers=3):
    """Per step, one letter per block from the policy's per-site actions: F computed, A skipped, C else."""
    policy = make_policy(config)
    sites = [_site(f"b.{i}.{k}", k, layer=i) for i in range(layers) for k in ("self_attn", "ff")]
    rows = []
    for s in range(steps):
        actions, skip = policy.actions(policy.plan(s, steps), sites, layers, s, steps)
        rows.append("".join("F" if actions[f"b.{i}.ff"] == "compute" else "A" if skip else "C" for i in range(layers)))
    return rows


@settings(max_examples=300)
@given(n=st.integers(1, 8), steps=st.integers(1, 80), weight=st.sampled_from([0.0, 0.4, -0.2, 0.8]),
       forced=st.sampled_from([(), ((10, 20, 2),), ((0.2, 0.4, 2),), ((0.0, 0.3, 1), (0.5, 0.75, 4))]),
       down=st.booleans(), toca=st.booleans())
def test_step_types_follow_the_official_code_block_by_block(n, steps, weight, forced, down, toca):
    """"per-layer" gives every block the official code's type; "whole-step" gives every block the
    type the official code runs in block 0 (ToCa: every non-full step conservative)."""
    make = ToCaConfig if toca else DuCaConfig
    kw = dict(interval=n, ratio=0.5, count_down=down, interval_weight=weight, forced_interval=forced)
    official = _official_types(n, steps, weight, forced, aggressive=not toca, count_down=down)
    assert _layer_letters(make(**kw, step_types="per-layer"), steps) == official
    assert _layer_letters(make(**kw), steps) == [row[0] * 3 for row in official]


# Block 0 | the later blocks, per step, printed by the official code itself (DuCa-DiT / DiT-ToCa /
# PixArt-alpha-ToCa cache_functions: cal_type or global_force_fresh, force_init, force_scheduler)
# run over 28 blocks with the presets' settings; the later blocks always agreed with each other.
OFFICIAL = {
    ("dit-xl-2", "duca", 3, 50): ("FCACFFCACFCACFCACFCFACFACFACFACFCFCFCFCFCFCFCFCFCF",
                                  "FCACCFCACFCACFCACACFACFACFACFACFCFCFCFCFCFCFCFCFCF"),
    ("dit-xl-2", "duca", 5, 50): ("FFCACACACFACACFACACFACACFACACFACACFFCFCFCFCACFCACF",
                                  "FFCACACACCACACCACACFACACFACACFACACCFCFCFCFCACFCACF"),
    ("dit-xl-2", "toca", 3, 50): ("FCCCFFCCCFCCCFCCCFCFCCFCCFCCFCCFCFCFCFCFCFCFCFCFCF",
                                  "FCCCCFCCCFCCCFCCCCCFCCFCCFCCFCCFCFCFCFCFCFCFCFCFCF"),
    ("dit-xl-2", "duca", 3, 20): ("FCACFACFACFACFCFCFCF", "FCACCACFACFACFCFCFCF"),
    ("dit-xl-2", "duca", 5, 20): ("FACFCFCFCFACACFFCFCF", "FACACACACFACACCFCACF"),
    ("dit-xl-2", "toca", 3, 20): ("FCCCFCCFCCFCCFCFCFCF", "FCCCCCCFCCFCCFCFCFCF"),
    ("pixart-alpha", "toca", 3, 20): ("FCCCFCFCCFCCFCCFCCFC", "FCCCCCFCCFCCFCCFCCFC"),
    ("pixart-alpha", "toca", 3, 50): ("FCCCFCCCFFCCFCCFCCFCCFCCFCCFCCFCCFCCFCCFCCFCCFCCFC",
                                      "FCCCFCCCCFCCFCCFCCFCCFCCFCCFCCFCCFCCFCCFCCFCCFCCFC"),
}


@pytest.mark.parametrize("model, method, n, steps", list(OFFICIAL))
def test_presets_schedule_every_block_as_the_official_code(model, method, n, steps):
    config = dataclasses.replace(duca_compile.presets(model, method), interval=n)
    head, rest = OFFICIAL[(model, method, n, steps)]
    rows = _layer_letters(config, steps)
    assert "".join(r[0] for r in rows) == head and all(r[1:] == c * 2 for r, c in zip(rows, rest))


def test_dit_duca_preset_runs_the_interval_down_to_two():
    letters = _letters(duca_compile.presets("dit-xl-2", "duca"), 50)
    assert letters.startswith("FCACC")                 # I = round(3 / 0.616) = 5, then 4 from step 4 on
    assert "A" not in letters[30:]                     # x < 20: I <= 2 leaves no aggressive step
    assert letters[30:40] == "CF" * 5                  # forced I = 2 for x in [10, 20): full on even x
    counts = {c: letters.count(c) for c in "FCA"}
    assert counts == {"F": 18, "C": 23, "A": 9}        # the official count (18 full steps, not 20)
    whole = _letters(dataclasses.replace(duca_compile.presets("dit-xl-2", "duca"), step_types="whole-step"), 50)
    assert {c: whole.count(c) for c in "FCA"} == {"F": 20, "C": 22, "A": 8}


def test_opensora_cycles_compute_cross_attention_only_every_sixth_step():
    config = duca_compile.presets("opensora", "duca")
    policy = make_policy(config)
    sites = [_site("b.0.attn1", "self_attn"), _site("b.0.attn2", "cross_attn"), _site("b.0.ff", "ff")]
    computed = {s.name: [] for s in sites}
    for step in range(30):
        plan = policy.plan(step, 30)
        actions, skip = policy.actions(plan, sites, 1, step, 30)
        for name, a in actions.items():
            if a == "compute" and not skip:
                computed[name].append(step)
        assert skip == (step >= 3 and step % 3 == 2)
        assert actions["b.0.attn2"] in ("compute", "reuse")   # f_module = 1 - 0.67 * 1.5 < 0: never subset
        assert actions["b.0.attn1"] in ("compute", "reuse")
    assert computed["b.0.attn2"] == [0, 1, 2, 6, 12, 18, 24]
    assert computed["b.0.attn1"] == computed["b.0.ff"] == [0, 1, 2, 3] + list(range(6, 30, 3))


def _site(name, kind, tokens=256, layer=0):
    return Site(name=name, block=name.rsplit(".", 1)[0], kind=kind, outputs=["x"], streams=["s"], tokens=[tokens],
                subset_reason="" if kind != "self_attn" else "self-attention", layer=layer)


@settings(max_examples=300)
@given(ratio=st.floats(0, 1), ws=st.floats(-3, 3), wl=st.floats(-1, 1), wm=st.floats(0, 3), tau=st.floats(0, 1),
       down=st.booleans(), layers=st.integers(1, 40), steps=st.integers(1, 60), tokens=st.integers(1, 4096),
       kind=st.sampled_from(["cross_attn", "ff"]), multiple=st.integers(1, 16), data=st.data())
def test_ratio_schedule_keeps_k_within_the_tokens(ratio, ws, wl, wm, tau, down, layers, steps, tokens, kind,
                                                   multiple, data):
    schedule = RatioSchedule(step_weight=ws, layer_weight=wl, module_weight=wm, module_tau=tau, count_down=down)
    config = ToCaConfig(ratio=ratio, ratio_schedule=schedule, k_multiple=multiple)
    policy = make_policy(config)
    layer, step = data.draw(st.integers(0, layers - 1)), data.draw(st.integers(0, steps - 1))
    site = _site("b.0.x", kind, tokens, layer)
    k = policy.site_k(site, layers, StepPlan(Mode.SUBSET, ratio), step, steps)
    assert 0 <= k <= tokens and (k % multiple == 0 or k == 1)         # 1: a positive ratio rounded away
    actions, _ = policy.actions(StepPlan(Mode.SUBSET, ratio), [site], layers, step, steps)
    ran = actions[site.name]
    assert (ran == "reuse") == (k == 0)
    if k:                       # what runs: at least 2 tokens (one compile serves k >= 2), at most all
        assert min(2, tokens) <= ran <= tokens and (ran == k or ran == min(2, tokens))


def test_flux_toca_ratio_is_the_official_stream_and_layer_schedule():
    """ToCa-FLUX ``fresh_ratio_scheduler`` ('ToCa'): R·(1 + 0.5 − 2·0.5·j/27)·(0.4 double | 1.6 single),
    j the block's index in its own stream (double 0–18, single 0–37), and ``cache_cutfresh`` takes
    ``int(clamp(R_eff)·N)`` tokens (float32, as the official torch code): every site of FLUX.1-dev."""
    policy = make_policy(duca_compile.presets("flux-dev", "toca"))
    plan = StepPlan(Mode.SUBSET, 0.1)
    for layer in range(57):
        double = layer < 19
        j = layer if double else layer - 19
        block = f"transformer_blocks.{j}" if double else f"single_transformer_blocks.{j}"
        for tokens in (4096, 512) if double else (4608,):            # image, text; single: text + image
            site = Site(name=f"{block}.x", block=block, kind="ff" if double else "self_attn", outputs=["x"],
                        streams=["s"], tokens=[tokens], layer=layer)
            official = 0.1 * (1 + 0.5 - 2 * 0.5 * j / 27) * (1 - 0.6 if double else 1 + 0.6)
            want = int(torch.clamp(torch.tensor(official), min=0, max=1) * tokens)
            assert policy.site_k(site, 57, plan, 10, 50) == want, (block, tokens)


def test_dit_ratio_schedule_never_subsets_attention_and_reuses_early_mlp():
    policy = make_policy(duca_compile.presets("dit-xl-2", "toca"))
    attn, ff0, ff27 = _site("b.0.attn", "cross_attn"), _site("b.0.ff", "ff", layer=0), _site("b.27.ff", "ff", layer=27)
    plan = StepPlan(Mode.SUBSET, 0.07)
    assert all(policy.site_k(attn, 28, plan, s, 50) == 0 for s in range(50))     # attention factor 0
    assert all(policy.site_k(ff0, 28, plan, s, 50) == 0 for s in range(12))      # f_step < 0 early on
    assert 0 < policy.site_k(ff0, 28, plan, 45, 50) < policy.site_k(ff27, 28, plan, 45, 50)


@settings(max_examples=200)
@given(n=st.integers(1, 10), first=st.integers(1, 5), steps=st.integers(1, 80))
def test_taylorseer_warms_up_then_computes_every_interval(n, first, steps):
    letters = _letters(TaylorSeerConfig(interval=n, first_enhance=first), steps)
    full = [i for i, c in enumerate(letters) if c == "F"]
    assert full[: min(first, steps)] == list(range(min(first, steps)))
    assert all(b - a == n for a, b in zip(full[first - 1:], full[first:]))
    assert set(letters) <= {"F", "R"} and (steps - full[-1] <= n)
    assert _letters(TaylorSeerConfig(interval=n, first_enhance=1), steps) == _letters(FORAConfig(interval=n), steps)


def test_policy_needing_num_steps_says_how_to_pass_it():
    policy = make_policy(duca_compile.presets("dit-xl-2", "duca"))
    with pytest.raises(ValueError, match="sampling\\(model, num_steps=N\\)|enable\\(pipe"):
        policy.plan(3, None)


def test_presets_list_and_reject_unknown_names():
    assert "duca" in duca_compile.presets()["dit-xl-2"]
    assert isinstance(duca_compile.presets("flux-dev", "clusca"), ClusCaConfig)
    with pytest.raises(ValueError, match="valid models: dit-xl-2"):
        duca_compile.presets("sdxl", "duca")
    with pytest.raises(ValueError, match="valid methods for it: .*taylorseer"):
        duca_compile.presets("flux-dev", "duca-v3")


@pytest.mark.parametrize("bad, field", [
    (lambda: ToCaConfig(ratio=-0.1), "ratio"),
    (lambda: ToCaConfig(interval=0), "interval"),
    (lambda: ToCaConfig(selection="attention"), "selection"),
    (lambda: ToCaConfig(spatial_grid=-1), "spatial_grid"),
    (lambda: ToCaConfig(soft_fresh_weight=-1.0), "soft_fresh_weight"),
    (lambda: ToCaConfig(forced_interval=((10, 20),)), "forced_interval"),
    (lambda: TaylorSeerConfig(phase="diffuser"), "phase"),
    (lambda: ToCaConfig(forced_interval=((0.2, 20, 2),)), "forced_interval"),      # a fraction and a step
    (lambda: ToCaConfig(forced_interval=((0.2, 1.5, 2),)), "forced_interval"),     # a fraction above 1
    (lambda: ToCaConfig(forced_interval=((0.2, float("nan"), 2),)), "forced_interval"),
    (lambda: DuCaConfig(cycles=(("self_attn", "FXA"),)), "cycles"),
    (lambda: DuCaConfig(warmup=-1), "warmup"),
    (lambda: RatioSchedule(module_tau=2.0), "module_tau"),
    (lambda: TaylorSeerConfig(max_order=-1), "max_order"),
    (lambda: TaylorSeerConfig(interval=0), "interval"),
    (lambda: ClusCaConfig(clusters=0), "clusters"),
    (lambda: ClusCaConfig(propagation=1.5), "propagation"),
    (lambda: ClusCaConfig(forecast="foca"), "forecast"),       # SUBSET steps rewrite FoCa's anchor
    (lambda: TaylorSeerConfig(forecast="dmd"), "forecast"),
    (lambda: FORAConfig(compute_first=-1), "compute_first"),
    # found by a new user: each ran silently or failed later with another error
    (lambda: DuCaConfig(seed=2**70), "seed"),
    (lambda: DuCaConfig(interval_weight=-1.0), "interval_weight"),
    (lambda: DuCaConfig(interval_weight=float("nan")), "interval_weight"),
    (lambda: ToCaConfig(soft_fresh_weight=float("nan")), "soft_fresh_weight"),
    (lambda: ToCaConfig(spatial_bonus=float("inf")), "spatial_bonus"),
    (lambda: RatioSchedule(step_weight=float("nan")), "step_weight"),
    (lambda: FORAConfig(interval=True), "interval"),
    (lambda: DuCaConfig(cycles=3), "cycles"),
    (lambda: ToCaConfig(forced_interval=5), "forced_interval"),
    (lambda: ToCaConfig(count_down="yes"), "count_down"),
    (lambda: DuCaConfig(step_types="per-block"), "step_types"),
    (lambda: RatioSchedule(layer_span=-1), "layer_span"),
    (lambda: RatioSchedule(list_factors=(("single_transformer_blocks", "1.6"),)), "list_factors"),
    (lambda: RatioSchedule(list_factors=("transformer_blocks",)), "list_factors"),
])
def test_bad_method_config_raises_value_error_naming_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        bad()


def _sites():
    from duca_compile.passes import Site

    return [Site(name=f"blocks.{b}.{c}", block=f"blocks.{b}", kind=k, outputs=["x"], streams=["s"], tokens=[16],
                 layer=b) for b in range(2) for c, k in (("attn1", "self_attn"), ("attn2", "cross_attn"), ("ff", "ff"))]


_ANY = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-3, 40),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(-2, 2), st.text(max_size=4),
    st.sampled_from(["random", "kv-norm", "full", "reuse", "skip", "subset", "FCA", "self_attn", "per-layer"]),
    st.lists(st.integers(-1, 30), max_size=3).map(tuple),
    st.lists(st.tuples(st.integers(-1, 30), st.integers(-1, 30), st.integers(-1, 5)), max_size=2).map(tuple),
    st.lists(st.sampled_from(["full", "reuse", "skip", "subset", "fast"]), max_size=3),
    st.just((("self_attn", "FCA"), ("cross_attn", "FCACCA"), ("ff", "FC"))), st.dictionaries(st.text(max_size=2), st.none(), max_size=1),
    st.builds(RatioSchedule, step_weight=st.floats(-1, 1), layer_weight=st.floats(-1, 1), module_weight=st.floats(-1, 1),
              count_down=st.booleans()),
)


def _near(default):
    """Values of the field's own type, edge cases first, or anything at all."""
    if isinstance(default, bool):
        return st.one_of(st.booleans(), _ANY)
    if isinstance(default, int):
        return st.one_of(st.integers(-3, 40), st.sampled_from([2**63, 2**64, 2**70, -2**63 - 1]), _ANY)
    if isinstance(default, float):
        edges = [-1.0, 1.0, 0.0, float("nan"), float("inf"), -float("inf")]
        return st.one_of(st.sampled_from(edges), st.floats(-2, 2), _ANY)
    return _ANY


@settings(max_examples=500)
@given(data=st.data(), config_type=st.sampled_from([FORAConfig, DuCaConfig, ToCaConfig, TaylorSeerConfig, ClusCaConfig,
                                                     duca_compile.ScriptedConfig, duca_compile.CalibratedConfig,
                                                     RatioSchedule]))
def test_any_field_values_validate_or_raise_value_error(data, config_type):
    """Every config either validates or raises ValueError naming the field; a valid one is hashable
    (it keys the caching state), seeds a generator and plans every step without another error."""
    import dataclasses

    import torch

    fields = {f.name: f.default for f in dataclasses.fields(config_type)}
    chosen = data.draw(st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=3, unique=True))
    kwargs = {name: data.draw(_near(fields[name]), label=name) for name in chosen}
    required = {"mag_ratios": (1.0, 0.95, 0.9)} if config_type is duca_compile.CalibratedConfig else {}
    try:
        config = config_type(**{**required, **kwargs})
    except ValueError as e:
        assert any(name in str(e) for name in chosen), e
        return
    hash(config)
    if config_type is RatioSchedule:
        return
    torch.Generator().manual_seed(config.seed)
    policy = make_policy(config)
    for num_steps in (None, 9):
        for step in range(9):
            try:
                plan = policy.plan(step, num_steps)
                actions, _ = policy.actions(plan, _sites(), 2, step, num_steps)
            except ValueError as e:                 # the two documented refusals
                assert ("number of denoising steps" in str(e) and num_steps is None) or "clusters" in str(e), e
                continue
            assert all(a in ("compute", "reuse") or 0 < a <= 16 for a in actions.values())
