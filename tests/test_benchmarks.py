"""Smoke test of the benchmark CLI's ``--quick`` paths (nothing about speed is asserted), and the
trained checkpoint's promise: its uncached samples are the digits they were asked for."""
import functools
import json

import pytest
import torch

import duca_compile
from benchmarks.__main__ import main
from duca_compile import _torch
from duca_compile.runtime import CONTEXT_PARALLEL_TORCH


def test_trained_dit_draws_recognizable_digits():
    from benchmarks.metrics import accuracy
    from benchmarks.models import load_classifier, load_dit, meta
    from benchmarks.sampling import sample, starts

    model, classifier = load_dit(), load_classifier()
    noise, labels = starts(60, seed=123)           # not the benchmark's seeds; its guidance (DiT's 1.5)
    with torch.no_grad():
        x = sample(lambda x, t, y: model(x, timestep=t, class_labels=y).sample, noise, labels, 25, guidance=1.5)
    assert accuracy(classifier, x, labels) >= 0.9
    assert meta("classifier")["test_accuracy"] >= 0.95 and meta("dit_digits")["steps"] > 0


def test_quick_fidelity_writes_tables_plots_and_the_sample_grid(tmp_path):
    main(["fidelity", "--quick", "--out", str(tmp_path)])
    rows = {(r["method"], r["knob"]): r for r in json.loads((tmp_path / "fidelity_quick.json").read_text())["rows"]}
    assert rows[("uncached", "-")]["psnr"] == 100.0 and rows[("uncached", "-")]["flop_ratio"] == 1.0
    duca = [r for (m, _), r in rows.items() if m.startswith(("FORA", "ToCa", "DuCa", "TaylorSeer", "ClusCa"))]
    assert len(duca) == 6 and all(0 < r["flop_ratio"] < 1 and r["psnr"] < 100 for r in duca)
    calibrated = [r for (m, _), r in rows.items() if m == "Calibrated"]     # ratios resampled 50 -> 8 steps
    assert len(calibrated) == 5 and all(0 < r["flop_ratio"] < 1 and r["psnr"] < 100 for r in calibrated)
    text = (tmp_path / "fidelity_quick.md").read_text()
    assert "| DuCa v1 (kv-norm) | N=3 |" in text and "Where duca's rows stand against each peer" in text
    assert (tmp_path / "fidelity_quick.png").stat().st_size > 1000
    held = json.loads((tmp_path / "fidelity_heldout_quick.json").read_text())["rows"]
    assert {r["method"] for r in held} == {"FORA", "Calibrated"} and all(0 < r["flop_ratio"] < 1 for r in held)
    assert (tmp_path / "fidelity_heldout_quick.png").stat().st_size > 1000
    assert (tmp_path / "samples_quick.png").stat().st_size > 1000


def test_quick_adaptive_pairs_each_peer_with_duca_at_the_same_steps(tmp_path):
    """The adaptive benchmark's pairs run the same rule: the same computed steps and the same
    samples (within float noise) for duca and the peer; the target rows compute 40 % of 8 steps."""
    pytest.importorskip("cache_dit")
    main(["adaptive", "--quick", "--out", str(tmp_path)])
    for name in ("adaptive_quick", "adaptive_heldout_quick"):
        rows = json.loads((tmp_path / f"{name}.json").read_text())["rows"]
        by = {(r["method"], r["knob"]): r for r in rows}
        pairs = [("duca adaptive", "diffusers FirstBlockCache"), ("duca adaptive", "cache-dit DBCache"),
                 ("duca adaptive + TaylorSeer", "cache-dit DBCache + TaylorSeer")]
        for ours, peer in pairs:
            knob = next(k for m, k in by if m == peer)
            a, b = by[(ours, knob if peer != "diffusers FirstBlockCache" else "F1B0 thr 0.08")], by[(peer, knob)]
            assert a["computed"] == b["computed"] and abs(a["psnr"] - b["psnr"]) < 0.5, (name, a, b)
        assert any(r["computed"] < 8 for r in rows if r["method"].startswith("duca adaptive"))
        assert all(r["computed"] == 3 for r in rows if r["knob"].startswith("target 0.4"))
    assert (tmp_path / "adaptive_quick.png").stat().st_size > 1000


def test_two_thresholds_run_all_three_kinds_of_step_and_count_them_as_duca_does():
    """The experiment's decider and duca's own stats agree on every step's kind (``run`` asserts it),
    and a two-threshold row reaches every kind: full, conservative and aggressive."""
    from benchmarks.models import load_dit
    from benchmarks.two_thresholds import QUICK, run

    rows = run(QUICK, load_dit(), rows=[("2 thresholds", "0.16/0.32", (0.16, 0.32)),
                                        ("1 threshold", "0.16", (0.16, 0.16))])
    both, one = rows
    assert both.full and both.conservative and both.aggressive and both.full + both.conservative + both.aggressive == 8
    assert one.conservative == 0 and one.aggressive > 0 and 0 < both.flop_ratio < 1 and both.psnr > 20


def test_torch_cond_design_decides_as_the_host_read_design_and_reads_the_predicate_each_step(scalar_reads):
    """Design (b) of the adaptive decision (``benchmarks.adaptive_cond``): the same steps and outputs
    as duca's runner, no recompile. It does not remove the host read: torch runs ``cond`` by reading
    its predicate on the host (eager / aot_eager: ``if pred``; Inductor's wrapper: ``pred.item()``),
    on every step, where duca's runner reads only on the steps its threshold decides."""
    import copy

    from benchmarks.adaptive_cond import cond_backend, computed_steps
    from duca_compile import AdaptiveConfig, sampling
    from duca_compile.adaptive import decisions
    from duca_compile.models import make_inputs, make_model

    config = AdaptiveConfig(threshold=0.15, warmup=2)
    model = make_model("dit")
    a = torch.compile(copy.deepcopy(model), backend=duca_compile.duca_backend(config, inner="eager"),
                      fullgraph=True, dynamic=False)
    b = torch.compile(copy.deepcopy(model), backend=cond_backend(config, "aot_eager"), fullgraph=True, dynamic=False)
    kw = make_inputs("dit", model, batch=2)
    x0 = kw.pop("hidden_states")
    kw.pop("timestep")

    def request(fast):
        x, outs, before = x0.clone(), [], len(scalar_reads)
        with sampling(fast, num_steps=8):
            for t in torch.linspace(900, 100, 8):
                out = fast(**kw, hidden_states=x, timestep=t.expand(2))[0]
                outs.append(out)
                x = x - 0.05 * out[:, :x.shape[1]]
        return outs, len(scalar_reads) - before

    request(a)
    request(b)                                  # compiles
    with torch.compiler.set_stance("fail_on_recompile"):
        want, reads_a = request(a)
        got, reads_b = request(b)
    flags = computed_steps(b)
    assert flags == [d["computed"] for d in decisions(a)] and 3 < sum(flags) < 8
    assert reads_a == 6 and reads_b == 8        # (a): steps 2..7; (b): every step, warm-up included
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


def test_quick_speed_and_flops_write_their_tables(tmp_path):
    main(["speed", "--quick", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "speed_quick.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["eager", "eager (quick)", "duca FULL only", "fora", "duca"]
    assert rows[2]["flop_ratio"] == 1.0 and rows[3]["flop_ratio"] < 1 and rows[4]["cache_mb"] > 0
    assert all(r["steps"] == 6 and r["peak_mb"] > 0 for r in rows)
    assert (tmp_path / "speed_quick.png").stat().st_size > 1000
    (tmp_path / "speed_quick.png").unlink()
    main(["plot", "--out", str(tmp_path)])                  # redrawn from the JSON alone
    assert (tmp_path / "speed_quick.png").stat().st_size > 1000
    main(["flops", "--quick", "--out", str(tmp_path)])
    assert "| dit-xl-2 | 50 |" in (tmp_path / "flops_quick.md").read_text()


@pytest.mark.skipif(_torch.torch_version() < CONTEXT_PARALLEL_TORCH,
                    reason="context parallelism is tested on torch >= 2.13 (docs/compatibility.md)")
def test_quick_context_parallel_speed_runs_two_ranks_and_counts_their_collectives(tmp_path):
    pytest.importorskip("transformers")
    main(["speed", "--world", "2", "--quick", "--out", str(tmp_path)])
    rows = {r["method"]: r for r in json.loads((tmp_path / "context_parallel_quick.json").read_text())["rows"]}
    assert set(rows) == {"plain torch.compile", "duca FULL only", "FORA (N=2)", "DuCa (N=3, r=0.3)"}
    plain = rows["plain torch.compile"]["collectives"]["every step"]
    fora = rows["FORA (N=2)"]
    assert fora["collectives"] == {"FULL": plain, "REUSE": 1}       # a reused step only gathers the output
    assert fora["steps"]["reuse"] > 0 and 0.4 < fora["flop_ratio"] < 0.7
    assert (tmp_path / "context_parallel_quick.png").stat().st_size > 1000


def test_speed_runs_the_gpu_sizes_families(monkeypatch):
    """The GPU rows (PixArt-α, FLUX.1-dev: models.full_size configs, their presets, an Euler loop over the
    family's inputs) run here at toy widths, eagerly: the code path a GPU session will time."""
    from benchmarks import speed

    toy = {"pixart": speed.Size(dict(num_layers=1, num_attention_heads=3, attention_head_dim=16, cross_attention_dim=48,
                                     sample_size=8, caption_channels=32), steps=4, registry="pixart-alpha", full=True),
           "flux": speed.Size(dict(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16,
                                   joint_attention_dim=32, pooled_projection_dim=16, in_channels=16,
                                   axes_dims_rope=(4, 6, 6)), batch=1, steps=4, registry="flux-dev", full=True)}
    monkeypatch.setattr(speed, "SIZES", {**speed.SIZES, **toy})
    rows = speed.run(list(toy), 4, 1, ("fora", "duca", "taylorseer"), "eager")
    methods = {size: [r.method for r in rows if r.size == size][2:] for size in toy}
    assert methods == {"pixart": ["duca FULL only", "fora", "duca"], "flux": ["duca FULL only", "fora", "duca", "taylorseer"]}
    assert all(r.flop_ratio < 1 for r in rows if r.method in ("fora", "duca", "taylorseer"))
    assert {r.size: r.cache_mb > 0 for r in rows if r.method == "fora"} == {"pixart": True, "flux": True}


def test_compile_cost_rows_come_from_separate_processes(monkeypatch, tmp_path):
    """``python -m benchmarks compile``: each measurement is a process of its own (cold: empty cache
    directory; warm: the same directory again), ratios against plain ``torch.compile``."""
    import benchmarks.compile as cost

    seen = []

    def fake_process(size, method, cache_dir, steps):
        seen.append((method, cache_dir))
        warm = sum(m == method for m, _ in seen) == 2
        return {"compile_s": {"plain": 10.0, "plain regional": 5.0}.get(method, 30.0) / (4 if warm else 1),
                "variants": None if method.startswith("plain") else 2, "hits": 3 if warm else 0, "misses": 0}

    monkeypatch.setattr(cost, "_process", fake_process)
    rows = cost.run(["tiny"], ["fora"], steps=2)
    assert [r.method for r in rows] == ["plain", "plain regional", "fora", "fora regional"]
    assert [m for m, _ in seen] == ["plain", "plain", "plain regional", "plain regional", "fora", "fora",
                                    "fora regional", "fora regional"]
    assert seen[0][1] == seen[1][1] != seen[2][1]                  # warm reuses the cold one's directory
    assert rows[2].cold_vs_plain == 3.0 and rows[1].warm_vs_plain == 0.5 and rows[2].warm_hits == 3


def test_compile_cost_worker_measures_one_plain_regional_compile(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "benchmarks.compile", "tiny", "plain regional", "2"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["compile_s"] > 0 and out["misses"] >= 1 and out["variants"] is None


def test_front_statement_calls_each_peer_point_above_equal_or_below():
    from benchmarks.__main__ import _front_vs_peers

    row = lambda m, psnr, speedup, flops=0.4: {"method": m, "knob": "k", "psnr": psnr, "speedup": speedup,  # noqa: E731
                                               "flop_ratio": flops}
    ours = [row("uncached", 100.0, 1.0, 1.0), row("FORA", 40.0, 2.0), row("TaylorSeer", 43.0, 2.5)]
    lines = _front_vs_peers(ours + [row("diffusers A", 42.0, 1.7), row("diffusers B", 43.05, 2.4),
                                    row("cache-dit C", 44.0, 2.0), row("diffusers D", 30.0, 3.0),
                                    row("diffusers E", 99.0, 1.1, 1.0)]).splitlines()
    said = {line.split(" (")[0].removeprefix("- "): line for line in lines if line.startswith("- ")}
    assert "**above**" in said["diffusers A"] and "TaylorSeer k: 43.00 dB" in said["diffusers A"]
    assert "**equal (within 0.1 dB)**" in said["diffusers B"]
    assert "**below**" in said["cache-dit C"] and "-1.00 dB" in said["cache-dit C"]
    assert "no duca row is as fast" in said["diffusers D"]
    assert "never skipped" in said["diffusers E: never skipped a computation here"]


def test_shapes_faithfulness_is_exact_on_renders_and_near_chance_on_other_captions():
    from benchmarks.shapes import dataset, faithfulness

    images, _, captions = dataset(96)
    assert faithfulness(images, captions) == {"colour": 1.0, "shape": 1.0, "position": 1.0, "all": 1.0}
    assert faithfulness(images, captions[1:] + captions[:1])["all"] < 0.2
    assert faithfulness(torch.full_like(images, -1.0), captions)["all"] == 0.0


def test_flow_model_trains_saves_loads_and_caches_under_duca(tmp_path, monkeypatch):
    """A few training steps of the FLUX-like flow model, its checkpoint round trip, and a guided
    request through duca (TaylorSeer's FLUX preset) that hits its caches."""
    import benchmarks.flow as flow
    import benchmarks.models as models
    from benchmarks.shapes import dataset

    monkeypatch.setattr(models, "CHECKPOINTS", tmp_path)
    monkeypatch.setattr(flow, "CHECKPOINTS", tmp_path)
    monkeypatch.setitem(flow.TRAIN_FLOW, "images", 64)
    images, tokens, _ = dataset(4)
    assert torch.equal(flow.unpack(flow.pack(images)), images)
    with torch.enable_grad():
        meta = flow.train_flow(minutes=0.05, log=lambda *a: None)
    assert meta["steps"] >= 1 and (tmp_path / "flow_shapes.safetensors").exists()
    model = flow.load_flow()
    fast = torch.compile(model.transformer, backend=duca_compile.duca_backend(
        duca_compile.presets("flux-dev", "taylorseer"), inner="eager"), fullgraph=True, dynamic=False)
    noise = torch.randn(2, 64, 48)
    with duca_compile.sampling(fast, num_steps=8):
        out = flow.sample_flow(model, noise, tokens[:2], 8, 2.0, transformer=fast)
    want = flow.sample_flow(model, noise, tokens[:2], 8, 2.0)
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all() and not torch.equal(out, want)
    s = duca_compile.stats(fast, flops=False)
    assert s["cache_hits"] > 0 and s["steps"]["full"] < 8
    scores = flow.evaluate_flow(model, 2, 2.0, per_caption=1)
    assert scores["samples"] == 48 and all(0 <= scores[k] <= 1 for k in ("colour", "shape", "position", "all"))


def test_flow_fidelity_rows_report_quality_and_flops_of_duca_on_the_flow_model():
    """The flow-fidelity path on an untrained flow model (no quality claim): a cached row has a finite
    PSNR and a FLOP ratio below 1, the uncached row is the reference."""
    from benchmarks.flow import make_flow
    from benchmarks.flow_fidelity import Setup, run
    from duca_compile import FORAConfig

    rows = run(Setup(steps=(4,), guidance=2.0, per_caption=1), make_flow().eval(),
               rows=[("FORA", "N=2", FORAConfig(interval=2))])
    assert [r.method for r in rows] == ["uncached", "FORA"]
    assert rows[1].flop_ratio < 1 and 0 < rows[1].psnr < float("inf") and not rows[1].notes


def test_flow_front_times_duca_and_peers_round_robin_and_places_them():
    """The flow-front path on an untrained flow model, eagerly (no quality claim): duca's FORA,
    diffusers' FirstBlockCache at a threshold that caches every step after the first and MagCache
    calibrated on the flow model, next to the plain row, each row in a process of its own (as the
    full run); each row timed over the rounds, all caching, each peer placed by ``standing``."""
    pytest.importorskip("diffusers")
    from benchmarks import peers as peer_lib
    from benchmarks.flow import make_flow
    from benchmarks.flow_front import Setup, _calibration, flow_workload, run, standing

    torch.manual_seed(0)
    setup = Setup(steps=(4,), rounds=2, inner="eager", processes=True)
    model = make_flow().eval()
    fbc = peer_lib.FirstBlockCache("diffusers FirstBlockCache", "diffusers", {"threshold": 1e9}, threshold=1e9)
    mag = peer_lib.MagCache("diffusers MagCache", "diffusers", {}, threshold=1e9, max_skip=2, retention=0.0,
                            calibration=functools.partial(_calibration, model, setup.guidance))
    rows, unavailable = run(setup, flow_workload(model, setup),
                            duca=[("FORA", "N=2", duca_compile.FORAConfig(interval=2))], peers=[fbc, mag])
    assert [r.library for r in rows] == ["torch", "duca", "diffusers", "diffusers"] and not unavailable
    plain, fora, *peers = rows
    assert plain.flop_ratio == 1.0 and plain.speedup == 1.0 and plain.psnr == 100.0
    assert 0.4 < fora.flop_ratio < 0.7 and fora.psnr < 100 and fora.seconds > 0 and fora.warmup_seconds > 0
    assert all(p.flop_ratio < 0.9 and p.psnr < 100 for p in peers)
    lines = standing(rows)
    assert [line.split(",")[1].split(" (")[0].strip() for line in lines] == [p.method for p in peers]
    assert all(any(w in line for w in ("above", "equal", "below")) for line in lines)


def test_best_at_gives_the_sharpest_caching_row_at_least_that_fast():
    from benchmarks.flow_front import Row, best_at

    def row(method, psnr, speedup, flops=0.5, library="duca"):
        return Row(20, method, "-", library, psnr, 1.0, flops, 1.0, speedup, 1.0)

    rows = [row("plain", 100.0, 1.0, flops=1.0, library="torch"), row("A", 40.0, 1.6), row("B", 35.0, 2.2),
            row("C", 45.0, 1.9, library="cache-dit"), row("nothing cached", 99.0, 2.5, flops=1.0)]
    assert best_at(rows, targets=(1.5, 2.0, 3.0)) == [
        "- 20 steps, 1.5x or more: C - (cache-dit), 45.00 dB, 100.0% score, at 1.90x",
        "- 20 steps, 2.0x or more: B - (duca), 35.00 dB, 100.0% score, at 2.20x",
        "- 20 steps, 3.0x or more: no row"]


def test_dit_front_runs_the_same_rows_on_the_digits_dit_with_a_peer_that_cannot_run_reported():
    """The DiT workload through the same path (untrained DiT, eager): FORA against diffusers'
    FirstBlockCache, and a peer that fails on this model is listed, not fatal."""
    pytest.importorskip("diffusers")
    from benchmarks import peers as peer_lib
    from benchmarks.flow_front import Setup, dit_workload, run
    from benchmarks.models import Classifier, make_dit

    torch.manual_seed(0)
    setup = Setup(steps=(4,), rounds=1, inner="eager", guidance=1.5)
    fbc = peer_lib.FirstBlockCache("diffusers FirstBlockCache", "diffusers", {"threshold": 1e9}, threshold=1e9)
    broken = peer_lib.CacheDiT("cache-dit F9B9", "cache-dit", {}, config=dict(Fn_compute_blocks=9, Bn_compute_blocks=9))
    rows, unavailable = run(setup, dit_workload(make_dit().eval(), Classifier().eval(), setup, samples=4),
                            duca=[("FORA", "N=2", duca_compile.FORAConfig(interval=2))], peers=[fbc, broken])
    assert [r.library for r in rows] == ["torch", "duca", "diffusers"]
    assert list(unavailable) == ["cache-dit F9B9"] and "leaves none" in unavailable["cache-dit F9B9"]
    assert all(0.0 <= r.score <= 1.0 for r in rows) and rows[1].flop_ratio < 0.7
