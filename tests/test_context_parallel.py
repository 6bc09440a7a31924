"""duca on top of diffusers' context parallelism (Ulysses; ring for Flux), 2 CPU ranks under
torchrun (gloo).

``context_parallel_worker.py`` runs each family in one process and split over the ranks, both
with the same scripted F R A plan over 2 requests, and DuCa's SUBSET step under CP; this checks
what it found. One torchrun for the module (~45 s on 2 cores).
"""
import json
import os
import subprocess
import sys

import pytest

FAMILIES = ["flux", "wan", "qwen-image", "ltx-video", "flux2", "flux-ring"]
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def found(tmp_path_factory):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch build has no torch.distributed with the gloo backend, which the 2 CPU ranks talk over")
    out = tmp_path_factory.mktemp("cp") / "found.json"
    worker = os.path.join(os.path.dirname(__file__), "context_parallel_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          worker, str(out), *FAMILIES], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("family", FAMILIES)
def test_caching_under_context_parallelism_equals_one_process(found, family):
    r = found[family]
    assert "error" not in r, r.get("error")
    # the same sites, under the same names, with and without the CP hooks in the module paths
    assert r["sites"] == r["single_sites"] and r["sites"]
    assert [s["mode"] for s in r["steps"]] == [s["single_mode"] for s in r["steps"]] == ["full", "reuse", "skip"] * 4
    assert max(s["diff"] for s in r["steps"]) < 1e-5                  # every step, 2 requests (no recompile)
    assert r["requests"] == 2 and r["cache_hits"] > 0 and not r["uncached"]


@pytest.mark.parametrize("family", FAMILIES)
def test_reused_branches_take_their_collectives_and_attention_with_them(found, family):
    variants = found[family]["variants"]
    full, reuse, skip = variants["FULL"], variants["REUSE"], variants["SKIP"]
    exchange = "all_gather_into_tensor" if family.endswith("-ring") else "all_to_all_single"
    assert full.get("sdpa", 0) > 0 and full.get(exchange, 0) > 1
    # what stays in a cached step is the one gather of the model's output, not an attention or exchange
    assert reuse == skip == {"all_gather_into_tensor": 1}


def test_subset_tokens_are_a_stratified_share_per_rank(found):
    sub = found["flux"]["subset"]
    shares, shard = sub["shares"], sub["shard_tokens"]
    assert sub["mode"] == "subset" and len(shares) == 2
    everything = [t for share in shares for t in share]
    assert len(everything) == len(set(everything)) == 2 * len(shares[0])   # never a token twice
    assert len(everything) == 0.5 * 2 * shard                              # ratio 0.5 of the global tokens
    assert all(r * shard <= t < (r + 1) * shard for r, share in enumerate(shares) for t in share)
    assert {t % shard for t in shares[0]} != {t % shard for t in shares[1]}   # each rank its own stream


def test_enable_on_a_pipeline_whose_transformer_runs_context_parallel(found):
    r = found["pipeline"]
    assert "error" not in r, r.get("error")
    assert r["diff"] < 1e-5                                               # = the same pipeline in one process
    assert r["cache_hits"] > 0 and r["steps"]["reuse"] == 2 and r["steps"]["full"] == 2
