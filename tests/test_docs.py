"""The README's code runs as written, and the README and docs/ link only to what exists."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md",
         ROOT / "tests" / "README.md", ROOT / "CHANGELOG.md", ROOT / "duca_compile" / "passes" / "README.md"]

# The pipeline quick start loads FLUX.1-dev from the hub and prompts it through its text encoders;
# here a tiny random Flux pipeline without text encoders stands in (prompt embeddings passed
# directly, 4 steps). Every other line runs as the README has it.
PIPELINE_STAND_INS = {
    'pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", torch_dtype=torch.bfloat16).to("cuda")':
        'from duca_compile.models import make_pipeline, pipeline_call_kwargs\npipe = make_pipeline("flux")',
    'image = pipe("a red fox in the snow", num_inference_steps=50).images[0]':
        'image = pipe(**{**pipeline_call_kwargs("flux", pipe, num_inference_steps=4), "return_dict": True}).images[0]',
}


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move detail to docs/"


@pytest.mark.inductor
def test_own_loop_quick_start_runs_as_written(capsys):
    block = next(b for b in python_blocks(README.read_text()) if "DDIMScheduler" in b)
    scope: dict = {}
    exec(compile(block, "README.md (own-loop quick start)", "exec"), scope)
    stats = scope["stats"]
    assert stats["cache_hits"] > 0 and stats["flop_ratio"] < 0.5 and stats["variants_compiled"] == 2
    assert "of the uncached FLOPs" in capsys.readouterr().out


@pytest.mark.inductor
def test_pipeline_quick_start_runs_with_a_tiny_pipeline():
    block = next(b for b in python_blocks(README.read_text()) if "enable(pipe" in b)
    for written, stand_in in PIPELINE_STAND_INS.items():
        assert written in block, f"the README's pipeline quick start changed: {written!r} is gone"
        block = block.replace(written, stand_in)
    scope: dict = {}
    exec(compile(block, "README.md (pipeline quick start)", "exec"), scope)
    pipe = scope["pipe"]
    assert not hasattr(pipe.transformer, "_orig_mod")          # disable() restored the plain transformer
    assert scope["image"] is not None


def _anchors(path: pathlib.Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"
