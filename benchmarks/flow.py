"""The second trained model: a FLUX-like flow-matching MMDiT (diffusers' ``FluxTransformer2DModel``:
double-stream and single-stream blocks, RoPE, text tokens) at a width a 2-core CPU trains in an
hour, on the captioned shapes of ``benchmarks.shapes``.

Images are packed into 4×4 patches (64 image tokens of 48 channels); a caption is three learned word
embeddings (the text tokens) and their mean (the pooled projection). Rectified flow: ``x_t = (1 − t)
x0 + t ε``, the model predicts ``ε − x0``, ``t`` logit-normal; 10 % of captions dropped to the null
caption for classifier-free guidance. Sampling: ``FlowMatchEulerDiscreteScheduler``.

    python -m benchmarks train flow --minutes 55
"""
from __future__ import annotations

import copy
import time

import torch

from .models import CHECKPOINTS, save
from .shapes import NULL_TOKEN, SIDE, VOCAB, dataset

__all__ = ["FLOW_CONFIG", "TEXT_DIM", "PATCH", "Captions", "make_flow", "pack", "unpack", "ids", "train_flow",
           "load_flow", "sample_flow"]

PATCH = 4
TEXT_DIM = 64
FLOW_CONFIG = dict(patch_size=1, in_channels=3 * PATCH * PATCH, out_channels=None, num_layers=2, num_single_layers=4,
                   attention_head_dim=32, num_attention_heads=4, joint_attention_dim=TEXT_DIM,
                   pooled_projection_dim=TEXT_DIM, guidance_embeds=False, axes_dims_rope=(8, 12, 12))
TRAIN_FLOW = dict(seed=0, batch=64, lr=1e-3, warmup_steps=200, ema=0.999, caption_dropout=0.1, images=9600)


class Captions(torch.nn.Module):
    """Word tokens [B, 3] -> (text states [B, 3, TEXT_DIM], pooled [B, TEXT_DIM])."""

    def __init__(self):
        super().__init__()
        self.words = torch.nn.Embedding(len(VOCAB), TEXT_DIM)

    def forward(self, tokens: torch.Tensor):
        states = self.words(tokens)
        return states, states.mean(dim=1)


class FlowModel(torch.nn.Module):
    """The transformer and its caption embeddings, saved as one checkpoint."""

    def __init__(self):
        super().__init__()
        from diffusers import FluxTransformer2DModel

        self.transformer = FluxTransformer2DModel(**FLOW_CONFIG)
        self.captions = Captions()


def make_flow() -> FlowModel:
    return FlowModel()


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, 32, 32] -> [B, 64, 48] (row-major 4×4 patches)."""
    b, n = x.shape[0], SIDE // PATCH
    return x.reshape(b, 3, n, PATCH, n, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(b, n * n, 3 * PATCH * PATCH)


def unpack(tokens: torch.Tensor) -> torch.Tensor:
    b, n = tokens.shape[0], SIDE // PATCH
    return tokens.reshape(b, n, n, 3, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5).reshape(b, 3, SIDE, SIDE)


def ids(text_tokens: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(img_ids [64, 3], txt_ids [3, 3]) as FLUX's pipeline makes them: (0, row, column) and zeros."""
    n = SIDE // PATCH
    rows, cols = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    img = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
    return img, torch.zeros(text_tokens, 3)


def velocity(model: FlowModel, x_t: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, transformer=None):
    """The predicted ``ε − x0`` for packed ``x_t`` at ``t`` in [0, 1] (``transformer``: a compiled one)."""
    states, pooled = model.captions(tokens)
    img_ids, txt_ids = ids(tokens.shape[1])
    net = transformer if transformer is not None else model.transformer
    return net(hidden_states=x_t, encoder_hidden_states=states, pooled_projections=pooled, timestep=t,
               img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]


def train_flow(minutes: float = 55.0, log=print) -> dict:
    c = TRAIN_FLOW
    torch.manual_seed(c["seed"])
    images, tokens, _ = dataset(c["images"], seed=c["seed"])
    x_all = pack(images)
    model = make_flow().train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=c["lr"], weight_decay=0.0)
    g = torch.Generator().manual_seed(c["seed"])
    start, step, losses = time.perf_counter(), 0, []
    while time.perf_counter() - start < minutes * 60:
        idx = torch.randint(0, len(x_all), (c["batch"],), generator=g)
        x0, tok = x_all[idx], tokens[idx].clone()
        tok[torch.rand(len(tok), generator=g) < c["caption_dropout"]] = NULL_TOKEN
        t = torch.sigmoid(torch.randn(len(tok), generator=g))           # logit-normal, as SD3 / FLUX train
        noise = torch.randn(x0.shape, generator=g)
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        loss = torch.nn.functional.mse_loss(velocity(model, x_t, t, tok), noise - x0)
        for group in opt.param_groups:
            group["lr"] = c["lr"] * min(1.0, (step + 1) / c["warmup_steps"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(c["ema"], (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(loss.item())
        step += 1
        if step % 100 == 0:
            elapsed = time.perf_counter() - start
            log(f"step {step}  loss {sum(losses[-100:]) / 100:.4f}  {step / elapsed:.2f} steps/s  {elapsed / 60:.1f} min")
        if step % 500 == 0:
            _save(ema, step, time.perf_counter() - start, losses)
    return _save(ema, step, time.perf_counter() - start, losses)


def _save(ema: FlowModel, steps: int, seconds: float, losses: list) -> dict:
    meta = {"model": {"class": "FluxTransformer2DModel", **FLOW_CONFIG, "captions": f"Embedding({len(VOCAB)}, {TEXT_DIM})"},
            "train": TRAIN_FLOW, "steps": steps, "minutes": round(seconds / 60, 1),
            "final_loss_mean_last_100": round(sum(losses[-100:]) / max(1, len(losses[-100:])), 4),
            "params": sum(p.numel() for p in ema.parameters()),
            "data": "benchmarks.shapes: one jittered shape per 32x32 RGB image, captions of colour, shape, quadrant"}
    save(ema, "flow_shapes", meta)
    return meta


def load_flow() -> FlowModel:
    from safetensors.torch import load_file

    path = CHECKPOINTS / "flow_shapes.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: train it with `python -m benchmarks train flow`")
    model = make_flow()
    model.load_state_dict(load_file(path))
    return model.eval()


@torch.no_grad()
def sample_flow(model: FlowModel, noise: torch.Tensor, tokens: torch.Tensor, num_steps: int, guidance: float,
                transformer=None) -> torch.Tensor:
    """Images [B, 3, 32, 32] in [-1, 1] from packed ``noise``; with ``guidance > 1`` each step is one
    call on ``[uncond; cond]``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=1.0)
    sched.set_timesteps(num_steps)
    x = noise.clone()
    cfg = guidance > 1
    tok = torch.cat([torch.full_like(tokens, NULL_TOKEN), tokens]) if cfg else tokens
    for t in sched.timesteps:
        inp = torch.cat([x, x]) if cfg else x
        v = velocity(model, inp, (t / 1000).expand(len(inp)), tok, transformer)
        if cfg:
            uncond, cond = v.chunk(2)
            v = uncond + guidance * (cond - uncond)
        x = sched.step(v, t, x).prev_sample
    return unpack(x).clamp(-1, 1)


@torch.no_grad()
def evaluate_flow(model: FlowModel, num_steps: int, guidance: float, per_caption: int = 2, seed: int = 1) -> dict:
    """Caption faithfulness of uncached samples: every one of the 48 captions ``per_caption`` times,
    from fixed noise (``shapes.faithfulness``: colour, shape, position, all three)."""
    from .shapes import COLOURS, POSITIONS, SHAPES, faithfulness, tokens

    captions = [(c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS] * per_caption
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(captions), (SIDE // PATCH) ** 2, 3 * PATCH * PATCH, generator=g)
    toks = torch.tensor([tokens(*c) for c in captions])
    images = torch.cat([sample_flow(model, noise[i:i + 48], toks[i:i + 48], num_steps, guidance)
                        for i in range(0, len(captions), 48)])
    return {"steps": num_steps, "guidance": guidance, "samples": len(captions), **faithfulness(images, captions)}
