"""``pip install .`` gives a user the library: a wheel without the tests, benchmarks or their
checkpoints, with the ``duca`` backend entry point, that works from outside the repository."""
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_wheel_holds_the_library_and_runs_outside_the_repository(tmp_path):
    source = tmp_path / "src"            # build from a copy: the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "duca_compile", source / "duca_compile",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(source)], check=True, cwd=tmp_path)
    (wheel,) = wheels.glob("duca_compile-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"duca_compile"}, tops
    assert not any(n.endswith((".safetensors", ".pt")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "duca = duca_compile.backend:duca_backend" in zipfile.ZipFile(wheel).read(entry_points).decode()

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                    str(site), str(wheel)], check=True, cwd=tmp_path)
    script = """
import torch, duca_compile
from diffusers import DiTTransformer2DModel
assert duca_compile.__file__.startswith(SITE), duca_compile.__file__
model = DiTTransformer2DModel(num_layers=1, num_attention_heads=2, attention_head_dim=16, in_channels=4,
                              out_channels=4, sample_size=8, num_embeds_ada_norm=10).eval()
fast = torch.compile(model, backend=duca_compile.duca_backend(duca_compile.FORAConfig(interval=2), inner="eager"))
x, y = torch.randn(1, 4, 8, 8), torch.tensor([3])
with torch.no_grad(), duca_compile.sampling(fast, num_steps=4):
    for t in (900, 600, 300, 0):
        fast(x, timestep=torch.tensor([t]), class_labels=y)
assert duca_compile.stats(fast)["cache_hits"] > 0
print("ok")
""".replace("SITE", repr(str(site)))
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
