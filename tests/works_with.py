"""The "Works with" table of docs/pipelines.md: one row per combination, written by the test that checks it.

A test ends with ``works_with(key, combination, result)``, where ``result`` states what it measured
(calls, hits, errors). Normally that asserts the table's row is current; with
``DUCA_WORKS_WITH=<dir>`` it writes the row to ``<dir>/<key>.md`` instead, and

    python tests/works_with.py          # reruns those tests and rewrites the table in docs/pipelines.md

assembles the rows in ``KEYS`` order between the page's markers.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile

PAGE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "pipelines.md"
MARKERS = ("<!-- works-with:start -->", "<!-- works-with:end -->")
HEAD = "| combination | what the test measured |\n|---|---|"
PIPELINE_KEYS = ["dit", "pixart", "flux", "flux-img2img", "sd3", "sd3-heun", "wan", "cogvideox", "ltx-video",
                 "hunyuan-video", "sana", "qwen-image"]
KEYS = [*(f"pipeline-{k}" for k in PIPELINE_KEYS),
        "strength", "interrupt",
        "model-offload-before", "model-offload-after", "sequential-offload", "group-offload",
        "lora-load", "lora-fuse", "lora-set-adapters", "lora-hotswap",
        "torchao-int8-weight-only", "torchao-float8-weight-only", "torchao-int8-dynamic", "torchao-inductor",
        "dump", "depyf-prepare-debug", "recompile-limit"]
TESTS = ["tests/test_pipelines.py::test_enabled_pipeline_caches_and_is_deterministic", "tests/test_integrations.py"]


def row(combination: str, result: str) -> str:
    return f"| {combination} | {result} |"


def works_with(key: str, combination: str, result: str) -> None:
    assert key in KEYS, f"{key!r} is not in tests/works_with.py KEYS"
    line = row(combination, result)
    out = os.environ.get("DUCA_WORKS_WITH")
    if out:
        pathlib.Path(out, f"{key}.md").write_text(line + "\n")
        return
    assert line in table(PAGE.read_text()), \
        f"docs/pipelines.md 'Works with' row is stale (python tests/works_with.py rewrites it); this run measured:\n{line}"


def table(text: str) -> str:
    return text[text.index(MARKERS[0]):text.index(MARKERS[1])]


def main() -> None:
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "DUCA_WORKS_WITH": out}
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", *TESTS], env=env, check=True,
                       cwd=PAGE.parent.parent)
        missing = [k for k in KEYS if not pathlib.Path(out, f"{k}.md").exists()]
        if missing:
            raise SystemExit(f"no row written for {missing}")
        rows = [pathlib.Path(out, f"{k}.md").read_text().strip() for k in KEYS]
    text = PAGE.read_text()
    start, end = text.index(MARKERS[0]) + len(MARKERS[0]), text.index(MARKERS[1])
    PAGE.write_text(text[:start] + "\n" + HEAD + "\n" + "\n".join(rows) + "\n" + text[end:])
    print(f"wrote {len(rows)} rows to {PAGE}")


if __name__ == "__main__":
    main()
