"""Smoke test of the benchmark CLI's ``--quick`` paths (nothing about speed is asserted), and the
trained checkpoint's promise: its uncached samples are the digits they were asked for."""
import json

import torch

from benchmarks.__main__ import main


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
    assert "| DuCa v1 (kv-norm) | N=3 |" in (tmp_path / "fidelity_quick.md").read_text()
    assert (tmp_path / "fidelity_quick.png").stat().st_size > 1000
    assert (tmp_path / "samples_quick.png").stat().st_size > 1000


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


def test_speed_runs_the_gpu_sizes_families(monkeypatch):
    """The GPU rows (PixArt-α, FLUX.1-dev: full_size configs, their presets, an Euler loop over the
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
    assert methods == {"pixart": ["duca FULL only", "fora", "duca"], "flux": ["duca FULL only", "fora", "taylorseer"]}
    assert all(r.flop_ratio < 1 for r in rows if r.method in ("fora", "duca", "taylorseer"))
    assert {r.size: r.cache_mb > 0 for r in rows if r.method == "fora"} == {"pixart": True, "flux": True}
