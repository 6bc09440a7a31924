"""Conformance over diffusers' DiT families: one parametrized test per family (the checks live in
``duca_compile.conformance``), and the support matrix in docs/models.md must be exactly what they found."""
import pathlib
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import duca_compile
from duca_compile import DuCaConfig, ScriptedConfig, duca_backend
from duca_compile.conformance import EXPECTED, MARKERS, check
from duca_compile.reference import ReferenceCache
from duca_compile.runtime import state_of
from duca_compile.models import make_inputs, make_model

from helpers import timesteps

MATRIX = pathlib.Path(__file__).parent.parent / "docs" / "models.md"
ATOL = 1e-5


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("family", list(EXPECTED))
def test_family_conforms(family):
    r, exp = check(family), EXPECTED[family]
    if not exp.sites:                                    # cannot be cached: runs plainly and says why
        assert r.plain_vs_eager <= ATOL and r.uncached and r.row() in MATRIX.read_text()
        return
    # traces: fullgraph where diffusers' model allows it; otherwise the breaks fall outside the blocks
    assert (r.graph_breaks == 0 and r.graphs == 1) if exp.fullgraph else r.graph_breaks > 0
    assert r.sited_graphs == 1
    # every block, every expected site, nothing else; token-wise sites are computed on k tokens
    assert r.found == r.expected
    for name, kind in r.found.items():
        token_wise = (kind != "self_attn" or any(re.search(p, name) for p in exp.parallel)) \
            and not any(re.search(p, name) for p in exp.not_subset)
        assert (r.subset[name] is True) == token_wise, (name, r.subset[name])
    # FULL steps equal the plain model; every variant equals the eager oracle (a family without a
    # token-wise site runs its SUBSET steps as REUSE)
    subset = any(v is True for v in r.subset.values())
    assert r.full_vs_plain <= ATOL
    assert set(r.oracle) == {"full", "reuse", "skip"} | ({"subset"} if subset else set())
    assert max(r.oracle.values()) <= ATOL
    assert (r.operands_gathered > 0) == exp.gathers
    assert r.skip_block_nodes == 0 and r.reuse_site_nodes == 0     # skipped / reused work is gone from the graph
    if exp.image_tokens:
        assert exp.image_tokens in r.tokens            # frames × patches, one token axis
    # DuCa defaults, 2 requests × 8 steps: no recompile (stance), the oracle, hits in every block
    assert r.duca_steps == ("FCAFCAFC" if subset else "FRAFRAFR") and r.duca_vs_oracle <= ATOL
    assert r.blocks_hit == len(r.blocks) > 0 and r.engaged and r.reproducible
    # the docs' matrix row is this result
    assert r.row() in MATRIX.read_text(), "docs/models.md matrix is stale: python -m duca_compile.conformance --write docs/models.md"


def test_docs_matrix_has_one_row_per_family():
    text = MATRIX.read_text()
    table = text[text.index(MARKERS[0]):text.index(MARKERS[1])]
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "(`" in line]
    assert [r.split(" ")[0] for r in rows] == list(EXPECTED)


# -- SUBSET gathers whatever a branch reads along the token axis ------------------------------------

class _RotaryCrossAttention(torch.nn.Module):
    """Cross-attention whose queries are rotated by a table in one of the layouts diffusers uses."""

    def __init__(self, dim, heads, layout):
        super().__init__()
        self.heads, self.layout = heads, layout
        self.to_q, self.to_k, self.to_v, self.to_out = (torch.nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, text, rope):
        b, n, c = x.shape
        h = self.heads
        q = self.to_q(x)
        if self.layout == "per-sample [B, N, C]":          # LTX: applied before the head split
            q = q * rope
        q = q.view(b, n, h, c // h)                        # the token count as a constant, as Dynamo writes it
        if self.layout == "[1, N, 1, D]":                  # Wan: [batch, tokens, heads, head_dim]
            q = q * rope
        q = q.transpose(1, 2)
        if self.layout == "[N, D]":                        # Flux / HunyuanDiT tables
            q = q * rope
        elif self.layout == "[B, 1, N, D]":
            q = q * rope
        k = self.to_k(text).view(b, -1, h, c // h).transpose(1, 2)
        v = self.to_v(text).view(b, -1, h, c // h).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, c))


class _Block(torch.nn.Module):
    def __init__(self, dim, heads, layout):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.attn2 = _RotaryCrossAttention(dim, heads, layout)
        self.ff = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))

    def forward(self, x, text, rope, temb):
        x = x + self.attn2(self.norm1(x), text, rope)
        return x + self.ff(self.norm2(x) * (1 + temb))


class _ToyRotaryDiT(torch.nn.Module):
    def __init__(self, dim, heads, layout, layers=2):
        super().__init__()
        self.proj_in, self.proj_out, self.t_embed = (torch.nn.Linear(dim, dim) for _ in range(3))
        self.blocks = torch.nn.ModuleList(_Block(dim, heads, layout) for _ in range(layers))

    def forward(self, hidden_states, timestep, text, rope, token_scale):
        temb = self.t_embed(timestep[:, None, None].expand(-1, 1, self.proj_in.in_features) / 1000) * token_scale
        x = self.proj_in(hidden_states)
        for block in self.blocks:
            x = block(x, text, rope, temb)
        return (self.proj_out(x),)


_LAYOUTS = ["[N, D]", "[1, N, 1, D]", "[B, 1, N, D]", "per-sample [B, N, C]"]


def _rope(layout, batch, tokens, heads, head_dim, g):
    shape = {"[N, D]": (tokens, head_dim), "[1, N, 1, D]": (1, tokens, 1, head_dim),
             "[B, 1, N, D]": (batch, 1, tokens, head_dim), "per-sample [B, N, C]": (batch, tokens, heads * head_dim)}
    return torch.randn(*shape[layout], generator=g)


@given(layout=st.sampled_from(_LAYOUTS), batch=st.integers(1, 3), heads=st.sampled_from([1, 2]),
       head_dim=st.sampled_from([4, 8]), tokens=st.sampled_from([4, 6, 8, 12]), ratio=st.floats(0.1, 0.9),
       per_token_modulation=st.booleans())
def test_subset_gathers_token_aligned_operands_in_any_layout(layout, batch, heads, head_dim, tokens, ratio,
                                                            per_token_modulation):
    """Rotary tables (and per-token modulation) read by a SUBSET branch are gathered with its tokens,
    whatever their layout; token counts equal to head_dim must not confuse the token axis."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    dim = heads * head_dim
    model = _ToyRotaryDiT(dim, heads, layout).eval()
    fast = torch.compile(model, backend=duca_backend(ScriptedConfig(modes=("full", "subset"), ratio=ratio),
                                                     inner="eager"), fullgraph=True, dynamic=False)
    oracle, g = None, torch.Generator().manual_seed(1)
    rope = _rope(layout, batch, tokens, heads, head_dim, g)
    scale = torch.rand(batch, tokens if per_token_modulation else 1, 1, generator=g)
    for t in (900.0, 800.0, 700.0):
        kw = dict(hidden_states=torch.randn(batch, tokens, dim, generator=g), timestep=torch.full((batch,), t),
                  text=torch.randn(batch, 3, dim, generator=g), rope=rope, token_scale=scale)
        out = fast(**kw)[0]
        oracle = oracle or ReferenceCache.from_compiled(model, fast)
        torch.testing.assert_close(out, oracle.replay(fast, **kw)[0], atol=ATOL, rtol=1e-4)
    sites = duca_compile.explain(fast, as_text=False)[0]["sites"]
    assert all(s["subset"] is True for s in sites)      # both sites run on k tokens, none fell back
    if int(ratio * tokens) > 0:
        assert duca_compile.stats(fast, flops=False)["steps"]["subset"] >= 1


def test_ltx_per_token_timesteps_track_steps_and_gather_the_modulation():
    """LTX conditioning: the first frame's tokens keep timestep 0. Steps still advance (the step
    marker is the mean timestep) and SUBSET gathers the per-token shift / scale with the tokens."""
    model = make_model("ltx-video")
    fast = torch.compile(model, backend=duca_backend(DuCaConfig(ratio=0.5), inner="eager"), fullgraph=True,
                         dynamic=False)
    oracle, frame = None, 16                                  # tokens per latent frame (4 × 4)
    for i, t in enumerate(timesteps(6)):
        kw = make_inputs("ltx-video", model, timestep=t, seed=i)
        per_token = torch.full((2, 2 * frame), t)
        per_token[:, :frame] = 0.0
        kw["timestep"] = per_token
        out = fast(**kw)[0]
        oracle = oracle or ReferenceCache.from_compiled(model, fast)
        torch.testing.assert_close(out, oracle.replay(fast, **kw)[0], atol=ATOL, rtol=1e-4)
    s = duca_compile.stats(fast, flops=False)
    assert s["steps"]["subset"] == 2 and s["steps"]["skip"] == 2 and s["requests"] == 1
    runner, _ = state_of(fast).graphs()[0]
    from duca_compile.report import count_ops
    subset = [gm for key, gm in runner.variant_graphs.items() if any(a == "subset" for _, a in key[1])][0]
    assert count_ops(subset)["gather"] > count_ops(subset)["scatter"]     # modulation gathered too


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_graph_pieces_follow_an_explicit_sampling_context():
    """Lumina2's block piece has no timestep input: under ``sampling()`` it takes the steps from the
    context (once per model call, not once per piece), exactly as with timestep tracking."""
    model = make_model("lumina2")
    fast = torch.compile(model, backend=duca_backend(DuCaConfig(), inner="eager"), dynamic=False)
    fast(**make_inputs("lumina2", model, timestep=900.0))
    with duca_compile.sampling(fast, num_steps=6):
        for i, t in enumerate(timesteps(6)):
            fast(**make_inputs("lumina2", model, timestep=t, seed=i))
            assert state_of(fast).step == i
    assert duca_compile.stats(fast, flops=False)["steps"]["skip"] == 2


def test_uncached_models_say_why_in_explain_and_stats():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x, timestep):
            return self.lin(x) * timestep

    model = Plain().eval()
    fast = torch.compile(model, backend=duca_backend(inner="eager"))
    with pytest.warns(UserWarning, match="no residual branch"):
        fast(torch.randn(2, 4), torch.ones(()))
    assert re.search(r"no graph of this model is cached.*\n.*no residual branch", duca_compile.explain(fast))
    assert "no residual branch" in duca_compile.stats(fast, flops=False)["uncached"][0]
