"""What each diffusers transformer family must yield: the conformance suite's model knowledge.

The backend has no per-model code; this table is data the checks compare against. ``sites`` maps a
block stack to the child modules every block must yield as sites, with their kinds.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Expected", "EXPECTED"]


@dataclass(frozen=True)
class Expected:
    """sites: block stack -> {child: kind} every block must yield (a child the block lacks, as SD3's
    last ``ff_context``, is not expected); empty: the family cannot be cached and must say why and
    run plainly. not_subset: regexes of token-wise sites SUBSET still reuses; parallel: regexes of
    self-attention sites that are parallel blocks (attention ∥ MLP into one projection: SUBSET runs
    the MLP half on k tokens beside cached attention rows); image_tokens: video
    latent tokens (frames × patches); gathers: a SUBSET branch reads a token-aligned operand (rotary
    table, per-token modulation) that is gathered with the tokens; other: a family beyond the
    twelve the suite was written for (the second table of docs/models.md)."""

    sites: dict
    fullgraph: bool = True
    not_subset: tuple = ()
    parallel: tuple = ()
    image_tokens: int | None = None
    gathers: bool = False
    notes: str = ""
    other: bool = False


_ATTN_FF = {"attn1": "self_attn", "ff": "ff"}
_CROSS = {"attn1": "self_attn", "attn2": "cross_attn", "ff": "ff"}
_JOINT = {"attn": "self_attn", "ff": "ff", "ff_context": "ff"}
_SINGLE = r"^single_transformer_blocks\.\d+\.proj_out$"

EXPECTED: dict[str, Expected] = {
    "dit": Expected({"transformer_blocks": _ATTN_FF}),
    "pixart": Expected({"transformer_blocks": _CROSS}, notes="PixArt-α config"),
    "pixart-sigma": Expected({"transformer_blocks": _CROSS},
                             notes="Σ-style config: micro-conditions, caption mask, interpolation scale 2"),
    "sd3": Expected({"transformer_blocks": _JOINT},
                    notes="joint attention: one site, image and text outputs; last block is context-pre-only"),
    "flux": Expected({"transformer_blocks": _JOINT, "single_transformer_blocks": {"proj_out": "self_attn"}},
                     parallel=(_SINGLE,), notes="single blocks: attention and MLP in parallel, one site; SUBSET "
                                                "runs the MLP half on k tokens beside cached attention rows"),
    "hunyuan-video": Expected({"transformer_blocks": _JOINT, "single_transformer_blocks": {"proj_out": "self_attn"}},
                              image_tokens=32, parallel=(_SINGLE,),
                              notes="the text token refiner never sees the latent: not cached"),
    "wan": Expected({"blocks": {"attn1": "self_attn", "attn2": "cross_attn", "ffn": "ff"}}, image_tokens=32,
                    notes="residual adds read `hidden.float()`; RoPE written slice by slice (setitem)"),
    "cogvideox": Expected({"transformer_blocks": {"attn1": "self_attn", "ff": "ff"}}, image_tokens=32,
                          notes="FF runs on text + video tokens: SUBSET gathers from the FF input (37 tokens)"),
    "ltx-video": Expected({"transformer_blocks": _CROSS}, image_tokens=32,
                          notes="per-token timesteps: modulation gathered with the tokens (separate test)"),
    "sana": Expected({"transformer_blocks": _CROSS}, not_subset=(r"\.ff$",),
                     notes="linear attention (no SDPA) is self-attention; the conv FF mixes tokens: reused"),
    "qwen-image": Expected({"transformer_blocks": {"attn": "self_attn", "img_mlp": "ff", "txt_mlp": "ff"}},
                           notes="gates from `img_mod`/`txt_mod` child modules (conditioning, not branches)"),
    "lumina2": Expected({"context_refiner": {"attn": "self_attn", "feed_forward": "ff"},
                         "noise_refiner": {"attn": "self_attn", "feed_forward": "ff"},
                         "layers": {"attn": "self_attn", "feed_forward": "ff"}}, fullgraph=False,
                        notes="sequence lengths read from the caption mask (data-dependent) break the graph; "
                              "the block piece follows the timestep piece's steps; sandwich norms re-applied"),
    "hunyuan-dit": Expected({"blocks": _CROSS}, gathers=True,
                            notes="cross-attention rotates its queries: RoPE tables gathered on SUBSET; "
                                  "long-skip blocks (`skip_linear` feeds the stream)"),
}

_FLUX_LIKE = {"transformer_blocks": _JOINT, "single_transformer_blocks": {"proj_out": "self_attn"}}
EXPECTED.update({name: Expected(other=True, **kw) for name, kw in {
    "auraflow": dict(sites={"joint_transformer_blocks": _JOINT,
                            "single_transformer_blocks": {"attn": "self_attn", "ff": "ff"}},
                     notes="the FF is added to the block input but reads `norm2(input + attention)`: its "
                           "input is the attention's residual add"),
    "chroma": dict(sites=_FLUX_LIKE, parallel=(_SINGLE,), notes="Flux blocks, joint text + image mask"),
    "flux2": dict(sites={"transformer_blocks": _JOINT, "single_transformer_blocks": {"attn": "self_attn"}},
                  notes="single blocks fuse attention and MLP in one `attn` module"),
    "cogview3plus": dict(sites={"transformer_blocks": _ATTN_FF}, notes="one FF over text + image tokens"),
    "cogview4": dict(sites={"transformer_blocks": _ATTN_FF}, not_subset=(r"\.ff$",),
                     notes="one `ff` module runs on image, then text: one site, two outputs, reused on SUBSET"),
    "omnigen": dict(sites={"layers": {"self_attn": "self_attn", "mlp": "ff"}}, fullgraph=False,
                    notes="a data-dependent branch in the RoPE (`max(position_ids)`) breaks the graph before "
                          "the blocks"),
    "z-image": dict(sites={s: {"attention": "self_attn", "feed_forward": "ff"}
                           for s in ("noise_refiner", "context_refiner", "layers")}, fullgraph=False,
                    notes="`with torch.device(...)` in the RoPE's lazy init breaks the graph; the latent input "
                          "is `x`, so the text-only context refiner is cached too"),
    "mochi": dict(sites={"transformer_blocks": {"attn1": "self_attn", "ff": "ff", "ff_context": "ff"}},
                  image_tokens=32, notes="needs `fullgraph=True`: otherwise the attention processor's per-sample "
                                         "`nonzero` on the text mask breaks the graph in every block (nothing cached)"),
    "allegro": dict(sites={"transformer_blocks": _CROSS}, image_tokens=32, notes="3-D RoPE from the pipeline"),
    "latte": dict(sites={"transformer_blocks": _CROSS, "temporal_transformer_blocks": _ATTN_FF},
                  notes="spatial blocks run at batch × frames, temporal ones at batch × height × width: "
                        "indices drawn per site"),
    "skyreels-v2": dict(sites={"blocks": {"attn1": "self_attn", "attn2": "cross_attn", "ffn": "ff"}},
                        image_tokens=32, gathers=True,
                        notes="diffusion forcing: a timestep per frame, so per-token gates gathered on SUBSET"),
    "easyanimate": dict(sites={"transformer_blocks": {"attn1": "self_attn", "ff": "ff", "txt_ff": "ff"}},
                        image_tokens=32, not_subset=(r"blocks\.1\.ff$",),
                        notes="block 0 has a text FF; block 1 runs one `ff` on image, then text (reused on SUBSET)"),
    "cosmos": dict(sites={"transformer_blocks": _CROSS}, image_tokens=32,
                   notes="without the padding-mask channel (it needs torchvision)"),
    "hidream": dict(sites={}, fullgraph=False,
                    notes="MoE routing reads expert counts on the host (`bincount().cpu()`) inside every block, and "
                          "every block wraps its real block (`HiDreamBlock.block`): no residual add at block level"),
}.items()})
