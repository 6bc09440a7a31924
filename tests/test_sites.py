"""Site discovery on DiT, PixArt and Flux (every other family: test_conformance.py)."""
import pytest
import torch

import duca_compile
from duca_compile import FORAConfig
from duca_compile.models import make_inputs

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


def _unet(conditional: bool):
    from diffusers import UNet2DConditionModel, UNet2DModel

    torch.manual_seed(0)
    if conditional:
        model = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=12, norm_num_groups=4, attention_head_dim=4)
    else:
        model = UNet2DModel(
            sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=4, attention_head_dim=8)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, model.config.in_channels, 8, 8, generator=g)
    extra = {"encoder_hidden_states": torch.randn(2, 3, 12, generator=g)} if conditional else {}
    return model.eval(), lambda t: dict(sample=sample, timestep=torch.full((2,), t), **extra)


@pytest.mark.parametrize("conditional", [False, True], ids=["UNet2DModel", "UNet2DConditionModel"])
def test_unets_are_no_transformer_stack_run_plainly_and_say_why(conditional):
    """A UNet's mid-block resnets and attention add residuals too; caching them as "blocks" gave
    outputs 1.38 off. They run plainly, with a warning, under timesteps and under sampling()."""
    model, inputs = _unet(conditional)
    fast = torch.compile(model, backend=duca_compile.duca_backend(FORAConfig(interval=3), inner="eager"),
                         dynamic=False)
    with pytest.warns(UserWarning, match="no stack of transformer blocks"), duca_compile.sampling(fast, num_steps=3):
        for t in (900.0, 800.0, 700.0):
            assert torch.equal(fast(**inputs(t))[0], model(**inputs(t))[0])
    s = duca_compile.stats(fast, flops=False)
    assert s["calls"] == 0 and "no stack of transformer blocks" in s["uncached"][0]
    assert "no graph of this model is cached" in duca_compile.explain(fast)
