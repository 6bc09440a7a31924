"""The second benchmark task: text-to-image on procedurally drawn shapes, with captions that matter.

Each 32×32 RGB image holds one shape (circle, square, triangle) of one colour (red, green, blue,
yellow) in one quadrant, on black, with a little jitter in size and position; its caption names all
three: "a red triangle, top left". A caption is three word tokens. ``faithfulness`` checks a
sample against its caption by exact rendering checks, no classifier: the bright pixels' centroid
gives the quadrant, their mean colour the nearest palette colour, and the best overlap with the three
shapes drawn at that place the shape.
"""
from __future__ import annotations

import torch

__all__ = ["COLOURS", "SHAPES", "POSITIONS", "VOCAB", "NULL_TOKEN", "SIDE", "caption", "tokens", "draw", "dataset",
           "faithfulness"]

SIDE = 32
COLOURS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0), "yellow": (1.0, 1.0, -1.0)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"top left": (8, 8), "top right": (8, 24), "bottom left": (24, 8), "bottom right": (24, 24)}
VOCAB = ["<null>", *COLOURS, *SHAPES, *POSITIONS]     # one token per word group; 0: the unconditional caption
NULL_TOKEN = 0
RADIUS = 6


def caption(colour: str, shape: str, position: str) -> str:
    return f"a {colour} {shape}, {position}"


def tokens(colour: str, shape: str, position: str) -> list[int]:
    return [VOCAB.index(colour), VOCAB.index(shape), VOCAB.index(position)]


def _mask(shape: str, cy: float, cx: float, r: float) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(SIDE) + 0.5, torch.arange(SIDE) + 0.5, indexing="ij")
    dy, dx = y - cy, x - cx
    if shape == "circle":
        return dy ** 2 + dx ** 2 <= r ** 2
    if shape == "square":
        s = r * 0.9
        return (dy.abs() <= s) & (dx.abs() <= s)
    # an upright triangle: apex at the top, base at the bottom, about the circle's area
    h = 1.3 * r
    top, bottom = cy - h, cy + h * 0.8
    half = (y - top) / (bottom - top) * (1.15 * r)
    return (y >= top) & (y <= bottom) & (dx.abs() <= half)


def draw(colour: str, shape: str, position: str, jitter: tuple = (0.0, 0.0, 0.0)) -> torch.Tensor:
    """[3, 32, 32] in [-1, 1]; ``jitter``: (dy, dx, dr) in pixels."""
    cy, cx = POSITIONS[position]
    m = _mask(shape, cy + jitter[0], cx + jitter[1], RADIUS + jitter[2])
    img = torch.full((3, SIDE, SIDE), -1.0)
    for c, v in enumerate(COLOURS[colour]):
        img[c][m] = v
    return img


def dataset(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[tuple]]:
    """(images [n, 3, 32, 32], tokens [n, 3], (colour, shape, position) per image), every
    combination equally often, jittered by up to ±2 px in place and ±1 px in size."""
    g = torch.Generator().manual_seed(seed)
    combos = [(c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS]
    picks = [combos[i % len(combos)] for i in torch.randperm(n, generator=g).tolist()]
    jit = (torch.rand(n, 3, generator=g) * 2 - 1) * torch.tensor([2.0, 2.0, 1.0])
    images = torch.stack([draw(*c, tuple(j.tolist())) for c, j in zip(picks, jit)])
    return images, torch.tensor([tokens(*c) for c in picks]), picks


def faithfulness(images: torch.Tensor, captions: list[tuple]) -> dict:
    """Per attribute and for all three at once: the fraction of ``images`` whose colour, shape and
    position match their caption (an image with no bright pixel matches nothing)."""
    hits = {"colour": 0, "shape": 0, "position": 0, "all": 0}
    palette = torch.tensor(list(COLOURS.values()))
    y, x = torch.meshgrid(torch.arange(SIDE) + 0.5, torch.arange(SIDE) + 0.5, indexing="ij")
    for img, (colour, shape, position) in zip(images, captions):
        m = img.max(dim=0).values > 0.0
        if not m.any():
            continue
        cy, cx = y[m].mean().item(), x[m].mean().item()
        where = ("top" if cy < SIDE / 2 else "bottom") + " " + ("left" if cx < SIDE / 2 else "right")
        mean = img[:, m].mean(dim=1)
        got_colour = list(COLOURS)[int((palette - mean).abs().sum(dim=1).argmin())]

        def overlap(s):
            # the best IoU over small shifts and sizes (a triangle's centroid is not its centre)
            return max(((ref := _mask(s, cy + dy, cx + dx, RADIUS + dr)) & m).sum().item()
                       / max((ref | m).sum().item(), 1)
                       for dy in (-2, -1, 0, 1, 2) for dx in (-1, 0, 1) for dr in (-1, -0.5, 0, 0.5, 1))
        got_shape = max(SHAPES, key=overlap)
        ok = {"colour": got_colour == colour, "shape": got_shape == shape, "position": where == position}
        for k, v in ok.items():
            hits[k] += v
        hits["all"] += all(ok.values())
    return {k: v / max(len(captions), 1) for k, v in hits.items()}
