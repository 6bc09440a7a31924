"""Schedules of the policies, as properties over any step count and interval (no compiling)."""
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from duca_compile import DuCaConfig, FORAConfig, Mode
from duca_compile.policies import make_policy


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
