"""The prepared GPU check (``python -m benchmarks gpu``) end to end at toy sizes on the CPU, and its
section isolation: a section that raises is recorded as failed and the next one still runs."""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import types

import pytest

from benchmarks.gpu import Context, Skip, run_sections

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.smoke
def test_the_gpu_check_runs_every_section_on_the_cpu_at_toy_sizes(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "benchmarks", "gpu", "--device", "cpu", "--tiny", "--out",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = json.loads((tmp_path / "gpu.json").read_text())
    sections = found["sections"]
    assert list(sections) == ["correctness", "speed", "cudagraphs", "peer"]
    has_cache_dit = importlib.util.find_spec("cache_dit") is not None
    for name, s in sections.items():
        allowed = {"ok"} if name != "peer" or has_cache_dit else {"skipped"}
        assert s["status"] in allowed, (name, s["status"], s["error"])
        assert all(c["ok"] for c in s["checks"]), (name, [c for c in s["checks"] if not c["ok"]])
    correctness = sections["correctness"]["rows"]
    assert len(correctness) >= 10 and all(r["ok"] and r["worst"] <= r["tolerance"] for r in correctness)
    assert all(r["cache_hits"] > 0 for r in correctness)
    assert {r["dtype"] for r in correctness} == {"float32", "bfloat16"}
    speed = [r for r in sections["speed"]["rows"] if r["seconds"] is not None]
    caching = [r for r in speed if r["method"] not in ("plain", "duca FULL only")]
    assert len(caching) >= 4 and all(r["cache_hits"] > 0 and 0 < r["flop_ratio"] < 1 for r in caching)
    assert all(r["seconds"] > 0 and r["peak_mb"] > 0 for r in speed)
    assert sections["cudagraphs"]["rows"] and found["environment"]["device"] == "cpu"
    text = (tmp_path / "gpu.md").read_text()
    assert all(f"## {name}: " in text for name in sections) and "inner compiler" in text
    assert "== correctness: ok in" in done.stdout


def _module(run):
    return types.SimpleNamespace(run=run, COLUMNS={}, ABOUT="")


def test_a_raising_section_is_recorded_as_failed_and_the_next_one_runs():
    def boom(ctx, section):
        section.rows.append({"partial": 1})
        raise RuntimeError("planted failure")

    def skip(ctx, section):
        raise Skip("no such package")

    def wrong(ctx, section):
        with section.attempt("a row that raises"):
            raise ValueError("planted row failure")
        section.check("right", True)                 # the rows after it still run
        section.check("planted wrong result", False, "2 != 3")

    def fine(ctx, section):
        section.check("right", True)

    saved, results = [], {}
    modules = {"correctness": _module(boom), "speed": _module(skip), "cudagraphs": _module(wrong),
               "peer": _module(fine)}
    run_sections(list(modules), Context("cpu", True, "eager"), results, lambda: saved.append(dict(results)),
                 modules=modules)
    status = {n: s.status for n, s in results.items()}
    assert status == {"correctness": "failed", "speed": "skipped", "cudagraphs": "failed", "peer": "ok"}
    assert "planted failure" in results["correctness"].error and results["correctness"].rows == [{"partial": 1}]
    assert results["speed"].error == "no such package"
    assert "planted wrong result" in results["cudagraphs"].error
    checks = {c["name"]: c for c in results["cudagraphs"].checks}
    assert "planted row failure" in checks["a row that raises: ran"]["detail"] and checks["right"]["ok"]
    assert len(saved) == 4                      # written after every section
