"""The committed benchmark results say which code made them, and none is older than the presets it
used: a preset change without a rerun fails here, not in front of a reader."""
import dataclasses
import json
import pathlib

import pytest

from benchmarks.results_io import RESULTS, _explicit, preset_fingerprints, stale_presets

COMMITTED = sorted(p for p in RESULTS.glob("*.json") if not p.stem.endswith("_quick"))
RERUN = {"speed": "speed", "compile": "compile", "dispatch": "dispatch", "subset_k": "subset_k",
         "fidelity": "fidelity", "fidelity_heldout": "fidelity --only-heldout", "flops": "flops",
         "context_parallel": "speed --world 2", "adaptive": "adaptive", "adaptive_heldout": "adaptive --heldout-only",
         "two_thresholds": "two-thresholds", "adaptive_cond": "adaptive-cond", "flow_fidelity": "flow-fidelity",
         "flow_front": "flow-front", "dit_front": "dit-front"}


def test_every_results_file_is_known():
    assert {p.stem for p in COMMITTED} == set(RERUN), "a results file without a rerun command here"


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.stem)
def test_results_record_commit_date_and_current_presets(path):
    data = json.loads(path.read_text())
    env = data["environment"]
    assert env.get("commit") and env["commit"] != "unknown" and env.get("date"), f"{path.name}: no commit/date"
    assert "+dirty" not in env["commit"], f"{path.name} was measured on uncommitted code"
    assert "presets" in data, f"{path.name}: no preset fingerprints"
    stale = stale_presets(data["presets"])
    assert not stale, (f"{path.name} was made with other {stale} presets than the code has now: "
                       f"rerun `python -m benchmarks {RERUN[path.stem]}`")
    md = path.with_suffix(".md").read_text()
    assert env["commit"] in md.split("\n\n")[1], f"{path.stem}.md does not name its commit"


def test_a_changed_or_removed_preset_is_reported(monkeypatch):
    from duca_compile.policies import presets as registry

    recorded = preset_fingerprints(["dit-xl-2:fora", "dit-xl-2:duca"])
    assert stale_presets(recorded) == []
    build, doc = registry.PRESETS[("dit-xl-2", "duca")]
    monkeypatch.setitem(registry.PRESETS, ("dit-xl-2", "duca"),
                        (lambda: dataclasses.replace(build(), ratio=0.5), doc))
    assert stale_presets(recorded) == ["dit-xl-2:duca"]
    monkeypatch.delitem(registry.PRESETS, ("dit-xl-2", "fora"))
    assert sorted(stale_presets(recorded)) == ["dit-xl-2:duca", "dit-xl-2:fora"]


def test_a_new_field_at_its_default_keeps_the_fingerprint():
    before = dataclasses.make_dataclass("Config", [("interval", int, dataclasses.field(default=3))])
    after = dataclasses.make_dataclass("Config", [("interval", int, dataclasses.field(default=3)),
                                                  ("propagate_text", bool, dataclasses.field(default=True))])
    assert _explicit(before(interval=5)) == _explicit(after(interval=5))
    assert _explicit(before(interval=5)) != _explicit(after(interval=5, propagate_text=False))
    assert _explicit(before(interval=5)) != _explicit(before(interval=4))
