"""duca-compile benchmarks: a DiT trained on upsampled digits, fidelity / speed / FLOPs side by side
with peers. Run ``python -m benchmarks --help``."""
