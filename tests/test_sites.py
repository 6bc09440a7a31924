"""Site discovery: every block and branch of the three families, found from graph metadata alone."""
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


def test_attention_without_sdpa_is_never_subset():
    """Sana's linear attention has no SDPA node; computing it on k tokens would be wrong."""
    from diffusers import SanaTransformer2DModel

    from duca_compile import ToCaConfig, duca_backend
    from duca_compile.tiny import randomize_zero_params
    from helpers import oracle_for, run_oracle_step

    torch.manual_seed(0)
    model = randomize_zero_params(SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=24,
        mlp_ratio=2.5, sample_size=8, patch_size=1))
    fast = torch.compile(model, backend=duca_backend(ToCaConfig(interval=3, ratio=0.5), inner="eager"),
                         fullgraph=True, dynamic=False)
    oracle = None
    for i, t in enumerate((900.0, 800.0, 700.0)):
        g = torch.Generator().manual_seed(i)
        kw = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.full((2,), t),
                  encoder_hidden_states=torch.randn(2, 5, 24, generator=g), encoder_attention_mask=torch.ones(2, 5),
                  return_dict=False)
        out = fast(**kw)[0]
        oracle = oracle or oracle_for(model, fast)
        torch.testing.assert_close(out, run_oracle_step(oracle, fast, **kw)[0], atol=1e-5, rtol=1e-4)
    sites = {s["name"].rsplit(".", 1)[-1]: s for s in duca_compile.explain(fast, as_text=False)[0]["sites"]}
    assert sites["attn1"]["kind"] == "self_attn" and sites["attn1"]["subset"] is not True
    assert sites["attn2"]["kind"] == "cross_attn" and sites["attn2"]["subset"] is True
    assert duca_compile.stats(fast, flops=False)["steps"]["subset"] == 2


def test_branch_reading_a_cast_of_the_stream_is_found_and_subset_correctly():
    """Wan adds ``hidden.float() + out * gate``: the stream is behind a cast the branch never reads."""
    from diffusers import WanTransformer3DModel

    from duca_compile import DuCaConfig, duca_backend
    from duca_compile.tiny import randomize_zero_params
    from helpers import oracle_for, run_oracle_step

    torch.manual_seed(0)
    model = randomize_zero_params(WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64))
    fast = torch.compile(model, backend=duca_backend(DuCaConfig(interval=3, ratio=0.5), inner="eager"),
                         fullgraph=True, dynamic=False)
    oracle = None
    for i, t in enumerate((900.0, 800.0, 700.0)):
        g = torch.Generator().manual_seed(i)
        kw = dict(hidden_states=torch.randn(2, 4, 2, 8, 8, generator=g), timestep=torch.full((2,), t),
                  encoder_hidden_states=torch.randn(2, 5, 24, generator=g), return_dict=False)
        out = fast(**kw)[0]
        oracle = oracle or oracle_for(model, fast)
        torch.testing.assert_close(out, run_oracle_step(oracle, fast, **kw)[0], atol=1e-5, rtol=1e-4)
    kinds = {s["name"]: s["kind"] for s in duca_compile.explain(fast, as_text=False)[0]["sites"]}
    assert kinds == {f"blocks.{i}.{c}": k for i in range(2)
                     for c, k in (("attn1", "self_attn"), ("attn2", "cross_attn"), ("ffn", "ff"))}
    assert duca_compile.stats(fast, flops=False)["steps"] == {"full": 1, "subset": 1, "skip": 1, "reuse": 0,
                                                             "partial": 0}
