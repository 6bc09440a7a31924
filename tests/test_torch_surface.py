"""torch's private surface lives in duca_compile._torch alone; it resolves on this torch; versions
outside the tested range warn; the doctor reports all of it."""
from __future__ import annotations

import io
import pathlib
import re
import subprocess
import sys
import tokenize

import pytest
import torch

import duca_compile
from duca_compile import _torch, doctor

PACKAGE = pathlib.Path(duca_compile.__file__).parent
# attributes of torch objects that torch does not promise to keep
PRIVATE_ATTRIBUTES = {"_orig_mod", "_compiled_call_impl", "_dynamo_source", "_param_name_to_source", "__closure__",
                      "cell_contents", "current_tx", "_debug_get_cache_entry_list", "dynamo_ctx"}


def _dotted_names(source: str):
    """(line, dotted name) of every name in code (comments and strings skipped)."""
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline)
              if t.type in (tokenize.NAME, tokenize.OP)]
    i = 0
    while i < len(tokens):
        if tokens[i].type != tokenize.NAME:
            i += 1
            continue
        parts, line = [tokens[i].string], tokens[i].start[0]
        while i + 2 < len(tokens) and tokens[i + 1].string == "." and tokens[i + 2].type == tokenize.NAME:
            parts.append(tokens[i + 2].string)
            i += 2
        yield line, parts
        i += 1


def private_uses(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, name) of every use of a private torch module or attribute in ``path``'s code."""
    found = []
    for line, parts in _dotted_names(path.read_text()):
        name = ".".join(parts)
        private_module = parts[0] == "torch" and len(parts) > 1 and \
            ((parts[1].startswith("_") and not parts[1].startswith("__")) or name.startswith("torch.fx.experimental"))
        if private_module or PRIVATE_ATTRIBUTES & set(parts[1:]):
            found.append((line, name))
    return found


@pytest.mark.smoke
def test_private_torch_apis_are_used_in__torch_only():
    uses = [f"{p.relative_to(PACKAGE.parent)}:{line}: {name}" for p in sorted(PACKAGE.rglob("*.py"))
            if p.name != "_torch.py" for line, name in private_uses(p)]
    assert uses == [], "private torch APIs outside duca_compile/_torch.py:\n" + "\n".join(uses)


def test_the_scan_finds_what_it_looks_for(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import torch._dynamo\nfrom torch._inductor import x\nm._orig_mod\n"
                      "from torch.fx.experimental.symbolic_shapes import ShapeEnv\n"
                      "s = 'torch._dynamo in a string'  # torch._guards in a comment\ntorch.compiler.reset()\n")
    assert private_uses(sample) == [(1, "torch._dynamo"), (2, "torch._inductor"), (3, "m._orig_mod"),
                                    (4, "torch.fx.experimental.symbolic_shapes")]


def test_no_broad_except_outside_the_doctor():
    """Only the doctor (a diagnosis) catches everything; a rollback may catch BaseException to re-raise."""
    broad = []
    for p in sorted(PACKAGE.rglob("*.py")):
        lines = p.read_text().splitlines()
        for i, line in enumerate(lines):
            code = line.strip()
            if not code.startswith("except") or p.name == "doctor.py":
                continue
            reraises = "BaseException" in code and any(l.strip() == "raise" for l in lines[i + 1:i + 4])
            if ("Exception" in code or code == "except:") and not reraises:
                broad.append(f"{p.relative_to(PACKAGE.parent)}:{i + 1}: {code}")
    assert broad == []


@pytest.mark.smoke
def test_every_private_api_resolves_on_this_torch():
    missing = [err for _, _, err in _torch.check_surface() if err]
    assert missing == []


def test_a_missing_api_fails_loudly_naming_it():
    entry = _torch.Private("torch._dynamo", "no_such_thing", "a test", "nothing works")
    with pytest.raises(_torch.MissingTorchAPI, match=rf"torch\._dynamo\.no_such_thing \(a test\).*torch "
                                                      rf"{re.escape(torch.__version__)}.*Tested on torch 2\.11 to 2\.15"):
        entry.load()
    with pytest.raises(AttributeError):
        _torch.no_such_entry


@pytest.mark.parametrize("version, warns", [("2.10.0", True), ("2.11.0+cu130", False), ("2.13.0+cpu", False),
                                            ("2.15.0", False), ("2.16.0", True), ("3.0.0", True)])
def test_a_torch_outside_the_tested_range_warns_and_still_runs(monkeypatch, version, warns):
    monkeypatch.setattr(torch, "__version__", version)
    if warns:
        with pytest.warns(UserWarning, match=rf"tested on torch 2\.11 to 2\.15; this is torch {version}"):
            _torch.warn_if_untested()
    else:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _torch.warn_if_untested()


@pytest.mark.smoke
def test_importing_on_a_tested_torch_warns_nothing():
    subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", "import duca_compile"], check=True)


@pytest.mark.smoke
def test_doctor_reports_versions_api_inductor_and_optional_pieces():
    out = subprocess.run([sys.executable, "-m", "duca_compile.doctor", "--device", "cpu"], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[1].startswith("torch") and torch.__version__ in lines[1] and "tested (2.11 to 2.15)" in lines[1]
    n = len(_torch.SURFACE)
    assert f"{n}/{n} private APIs duca uses are present" in out.stdout
    assert any(line.startswith("inductor") and "works" in line for line in lines)
    assert sum(line.startswith("optional") for line in lines) == len(doctor.OPTIONAL)
    result = duca_compile.check(compile=False)
    assert result["torch"]["in_range"] is True and result["inductor"] is None


def test_context_parallel_on_a_torch_before_2_13_warns(monkeypatch):
    from duca_compile import owners, runtime
    from duca_compile.backend import DuCaBackend

    monkeypatch.setattr(runtime, "context_parallel", lambda module: (0, 2, None))
    settings = DuCaBackend(inner="eager").settings()[0]
    monkeypatch.setattr(_torch, "torch_version", lambda version=None: (2, 11))
    with pytest.warns(UserWarning, match=r"context parallelism is tested on torch >= 2\.13"):
        runtime.state_for(owners.Owner(), settings)
    monkeypatch.setattr(_torch, "torch_version", lambda version=None: (2, 13))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runtime.state_for(owners.Owner(), settings)
