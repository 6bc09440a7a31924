"""Site discovery on DiT, PixArt and Flux (every other family: test_conformance.py)."""
import pytest
import torch

import duca_compile
from duca_compile import FORAConfig
from duca_compile.tiny import make_inputs

from helpers import compile_tiny

EXPECTED = {
    "dit": {"transformer_blocks.{i}.attn1": "self_attn", "transformer_blocks.{i}.ff": "ff"},
    "pixart": {"transformer_blocks.{i}.attn1": "self_attn", "transformer_blocks.{i}.attn2": "cross_attn",
               "transformer_blocks.{i}.ff": "ff"},
    "flux": {"transformer_blocks.{i}.attn": "self_attn", "transformer_blocks.{i}.ff": "ff",
             "transformer_blocks.{i}.ff_context": "ff", "single_transformer_blocks.{i}.proj_out": "self_attn"},
}


@pytest.mark.parametrize("family", list(EXPECTED))
def test_every_block_and_branch_is_found(family):
    model, fast = compile_tiny(family, FORAConfig(interval=2))
    fast(**make_inputs(family, model))
    graph = duca_compile.explain(fast, as_text=False)[0]
    found = {s["name"]: s["kind"] for s in graph["sites"]}
    expected = {}
    for name, child in model.named_children():
        if isinstance(child, torch.nn.ModuleList):
            for i in range(len(child)):
                for pattern, kind in EXPECTED[family].items():
                    if pattern.startswith(name + "."):
                        expected[pattern.format(i=i)] = kind
    assert found == expected
    assert len(graph["stack_outputs"]) == 1
    # Flux joint attention caches both its image and its text output.
    if family == "flux":
        assert {s["name"]: s["outputs"] for s in graph["sites"]}["transformer_blocks.0.attn"] == 2


def test_explain_text_names_sites_and_variants():
    model, fast = compile_tiny("pixart", FORAConfig(interval=2))
    for t in (900.0, 800.0):
        fast(**make_inputs("pixart", model, timestep=t))
    text = duca_compile.explain(fast)
    assert "transformer_blocks.1.attn2" in text and "cross_attn" in text
    assert "variant FULL" in text and "variant REUSE" in text
