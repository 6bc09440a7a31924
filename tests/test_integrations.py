"""What people combine caching with: partial schedules, offloading, LoRA, torchao quantization, and
looking inside (``duca_compile.dump``, depyf). Tiny random-init pipelines, eager inner compiler
unless a test says otherwise; every test writes its row of the "Works with" table in docs/pipelines.md."""
import os
import warnings

import pytest
import torch

import duca_compile
from duca_compile import DuCaConfig, FORAConfig
from duca_compile.integrations.diffusers import disable, enable
from duca_compile.models import make_model, make_pipeline, pipeline_call_kwargs
from duca_compile.runtime import state_of
from helpers import compile_tiny, recorded_calls, run_against_oracle, timesteps
from works_with import works_with

# a step that ran without the compiled transformer fails the test
pytestmark = pytest.mark.filterwarnings("error:duca_compile. denoising step")

pytest.importorskip("transformers", reason="diffusers' Flux pipelines need transformers")


def _pipe(name="flux", seed=0):
    pipe = make_pipeline(name, seed=seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, name="flux", steps=4, **kw):
    return pipe(**pipeline_call_kwargs(name, pipe, steps, **kw))[0]


def _fresh(config, name="flux", setup=None, **kw):
    """The result of a fresh pipeline: built, ``setup(pipe)``, enabled, run once."""
    torch._dynamo.reset()
    pipe = _pipe(name)
    if setup is not None:
        setup(pipe)
    enable(pipe, config, inner="eager")
    return _run(pipe, name, **kw)


# -- partial schedules ------------------------------------------------------------------------------

def test_img2img_strength_runs_the_tail_as_a_request_of_its_own():
    config = FORAConfig(interval=3)
    pipe = enable(_pipe("flux-img2img"), config, inner="eager")
    _run(pipe, "flux-img2img", steps=8, strength=0.5)
    with recorded_calls(pipe) as calls:
        out = _run(pipe, "flux-img2img", steps=8, strength=0.5)
    assert len(pipe.scheduler.timesteps) == 8 and pipe.scheduler.begin_index == 4
    assert [c[:4] for c in calls] == [(i == 0, i, 0, 4) for i in range(4)]   # the policy sees 4 steps, 0..3
    st = state_of(pipe.transformer)
    assert st.num_steps == 4
    s = duca_compile.stats(pipe.transformer)
    assert s["steps"]["full"] == 2 * 2 and s["steps"]["reuse"] == 2 * 2    # F R R F, twice
    assert torch.equal(out, _fresh(config, "flux-img2img", steps=8, strength=0.5))
    works_with("strength", "img2img `strength=0.5` of 8 steps (`FluxImg2ImgPipeline`: `set_begin_index`)",
               f"the policy sees a request of {st.num_steps} steps, 0..3, the first FULL (F R R F); "
               "= a fresh pipeline")


def test_interrupted_request_ends_and_the_next_starts_clean():
    config = DuCaConfig(interval=3, ratio=0.5)

    def stop_after_two(pipe, i, t, kwargs):
        if i == 1:
            pipe._interrupt = True
        return kwargs

    pipe = enable(_pipe("flux"), config, inner="eager")
    _run(pipe, steps=6)
    with recorded_calls(pipe) as calls:
        _run(pipe, steps=6, callback_on_step_end=stop_after_two)
    assert [c[1] for c in calls] == [0, 1]                           # the loop skips the rest
    assert not state_of(pipe.transformer).driver.active             # the pipeline call ended the request
    with recorded_calls(pipe) as calls:
        out = _run(pipe, steps=6)
    assert calls[0][:4] == (True, 0, 0, 6) and [c[1] for c in calls] == list(range(6))
    assert torch.equal(out, _fresh(config, steps=6))
    assert duca_compile.stats(pipe.transformer)["requests"] == 3
    works_with("interrupt", "`callback_on_step_end` that sets `pipe._interrupt` after step 1 of 6",
               "2 calls, then the request ends (`maybe_free_model_hooks`); the next request starts at step 0 "
               "with fresh caches: = a fresh pipeline")


# -- offloading -------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["before", "after"])
def test_model_cpu_offload_caches_and_matches(order):
    pytest.importorskip("accelerate")
    config = FORAConfig(interval=2)
    want = _fresh(config)
    torch._dynamo.reset()
    pipe = _pipe()
    if order == "before":
        pipe.enable_model_cpu_offload(device="cpu")
    enable(pipe, config, inner="eager")
    if order == "after":
        pipe.enable_model_cpu_offload(device="cpu")
    assert getattr(pipe.transformer, "_hf_hook", None) is not None    # accelerate's offload hook is on
    got = _run(pipe)
    with torch.compiler.set_stance("fail_on_recompile"):
        again = _run(pipe)
    s = duca_compile.stats(pipe.transformer)
    assert torch.equal(got, want) and torch.equal(again, want)
    assert s["requests"] == 2 and s["cache_hits"] > 0 and s["fallback_calls"] == 0
    works_with(f"model-offload-{order}", f"`enable_model_cpu_offload()` {order} `enable`",
               f"cached: {s['cache_hits']} cache hits over 2 runs, = the pipeline without offload, no recompile "
               "(CPU only here: onload and execution device are the same)")


def _sequential_hooks(pipe):
    # what pipe.enable_sequential_cpu_offload() does to each component. (Run through the pipeline, those
    # hooks fail at the first call on torch 2.13 with accelerate 1.15, with or without duca: a TypeError
    # in accelerate's set_module_tensor_to_device.)
    from accelerate import cpu_offload

    cpu_offload(pipe.transformer, execution_device=torch.device("cpu"))


def _group_offload(pipe):
    from diffusers.hooks import apply_group_offloading

    apply_group_offloading(pipe.transformer, onload_device=torch.device("cpu"), offload_type="block_level",
                           num_blocks_per_group=1)


@pytest.mark.parametrize("kind", ["sequential", "group"])
def test_unsupported_offload_is_refused_before_and_after_enable(kind):
    pytest.importorskip("accelerate")
    install = _sequential_hooks if kind == "sequential" else _group_offload
    match = "enable_sequential_cpu_offload" if kind == "sequential" else "group offloading"
    pipe = _pipe()
    install(pipe)
    with pytest.raises(ValueError, match=match):
        enable(pipe, FORAConfig(interval=2), inner="eager")
    assert pipe.transformer._compiled_call_impl is None              # nothing left half-enabled

    pipe = enable(_pipe(), FORAConfig(interval=2), inner="eager")
    install(pipe)
    with pytest.raises(ValueError, match=match):                     # at the next request
        _run(pipe)
    disable(pipe)
    works_with(f"{kind}-offload",
               "`enable_sequential_cpu_offload()`" if kind == "sequential" else
               "group offloading (`apply_group_offloading`, `enable_group_offload`)",
               "refused before and after `enable` (at the next request) with a ValueError saying why: "
               + ("accelerate moves weights inside every leaf call, which torch.compile cannot trace"
                  if kind == "sequential" else "its hooks break Dynamo's graph at every block, so no block is found"))


# -- LoRA -------------------------------------------------------------------------------------------

def _lora(tmp_path, seed, rank=4):
    """A LoRA for the tiny Flux transformer, made with peft and saved as diffusers saves one."""
    peft = pytest.importorskip("peft")
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    transformer = make_model("flux")
    transformer.add_adapter(peft.LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                            target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(seed)
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.normal_(std=0.3)
    path = tmp_path / f"lora{seed}"
    FluxPipeline.save_lora_weights(path, transformer_lora_layers=get_peft_model_state_dict(transformer))
    return path


def test_lora_load_fuse_unfuse_and_set_adapters_follow_the_weights(tmp_path):
    config = FORAConfig(interval=2)
    a = _lora(tmp_path, 1)
    base = _fresh(config)
    with_a = _fresh(config, setup=lambda p: p.load_lora_weights(a, adapter_name="a"))
    half = _fresh(config, setup=lambda p: (p.load_lora_weights(a, adapter_name="a"), p.set_adapters(["a"], [0.5])))
    assert (with_a - base).abs().max() > 1e-2 and (half - with_a).abs().max() > 1e-2   # the LoRA matters

    torch._dynamo.reset()
    pipe = enable(_pipe(), config, inner="eager")
    assert torch.equal(_run(pipe), base)
    pipe.load_lora_weights(a, adapter_name="a")
    assert torch.equal(_run(pipe), with_a)                            # no stale variant or cache
    pipe.fuse_lora()
    fused = _run(pipe)
    pipe.unfuse_lora()
    unfused = _run(pipe)
    pipe.set_adapters(["a"], [0.5])
    scaled = _run(pipe)
    torch.testing.assert_close(fused, with_a, atol=1e-5, rtol=1e-5)  # fusing reorders the sums
    torch.testing.assert_close(unfused, with_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scaled, half, atol=1e-5, rtol=1e-5)
    s = duca_compile.stats(pipe.transformer)
    assert s["requests"] == 5 and s["cache_hits"] > 0 and not s["uncached"]
    works_with("lora-load", "`load_lora_weights` (a peft LoRA) after `enable`",
               "results = a fresh pipeline with the LoRA loaded before `enable`; Dynamo recompiles for the new modules")
    works_with("lora-fuse", "`fuse_lora()` / `unfuse_lora()`",
               "results follow the weights (= the unfused LoRA within 1e-5: fusing reorders the sums)")
    works_with("lora-set-adapters", "`set_adapters([...], [0.5])`",
               f"= a fresh pipeline with that weight; {s['cache_hits']} hits over the 5 requests, none uncached")


def test_lora_hotswap_follows_the_new_weights_without_recompiling(tmp_path):
    config = FORAConfig(interval=2)
    a, b = _lora(tmp_path, 1), _lora(tmp_path, 2)
    with_a = _fresh(config, setup=lambda p: p.load_lora_weights(a, adapter_name="x"))
    with_b = _fresh(config, setup=lambda p: p.load_lora_weights(b, adapter_name="x"))

    torch._dynamo.reset()
    pipe = _pipe()
    pipe.enable_lora_hotswap(target_rank=8)
    pipe.load_lora_weights(a, adapter_name="x")
    enable(pipe, config, inner="eager")
    torch.testing.assert_close(_run(pipe), with_a, atol=1e-6, rtol=1e-6)
    pipe.load_lora_weights(b, adapter_name="x", hotswap=True)
    with torch.compiler.set_stance("fail_on_recompile"):
        swapped = _run(pipe)
    torch.testing.assert_close(swapped, with_b, atol=1e-6, rtol=1e-6)
    assert (with_b - with_a).abs().max() > 1e-2
    works_with("lora-hotswap", "`enable_lora_hotswap` + `load_lora_weights(..., hotswap=True)`",
               "the swapped LoRA's results (= a fresh pipeline with it), no recompile (`fail_on_recompile`)")


# -- torchao quantization ---------------------------------------------------------------------------

LETTERS = {"full": "F", "subset": "C", "skip": "A", "reuse": "R"}
QUANT = {"int8-weight-only": "Int8WeightOnlyConfig", "float8-weight-only": "Float8WeightOnlyConfig",
         "int8-dynamic": "Int8DynamicActivationInt8WeightConfig"}


def _quantized_flux(method):
    torchao = pytest.importorskip("torchao.quantization")
    model = make_model("flux")
    torchao.quantize_(model, getattr(torchao, QUANT[method])())
    return model


@pytest.mark.parametrize("method", list(QUANT))
def test_torchao_quantized_transformer_equals_the_oracle(method):
    model = _quantized_flux(method)
    kind = type(model.transformer_blocks[0].ff.net[2].weight).__name__
    assert kind in ("Int8Tensor", "Float8Tensor")                      # torchao's tensor subclass
    reference, plain_fast = compile_tiny("flux", DuCaConfig(interval=3, ratio=0.5))
    reference_modes = run_against_oracle("flux", reference, plain_fast, timesteps(6))
    reference_sites = [x["name"] for g in duca_compile.explain(plain_fast, as_text=False) for x in g["sites"]]
    torch._dynamo.reset()                                              # frees the graphs: read them before
    fast = torch.compile(model, backend=duca_compile.duca_backend(DuCaConfig(interval=3, ratio=0.5), inner="eager"),
                         dynamic=False)
    modes = run_against_oracle("flux", model, fast, timesteps(6))   # every step = the oracle on the quantized model
    s = duca_compile.stats(fast)
    sites = [x["name"] for g in duca_compile.explain(fast, as_text=False) for x in g["sites"]]
    assert reference_sites and modes == reference_modes and sites == reference_sites        # the same sites and plan as unquantized
    assert s["cache_hits"] > 0 and s["steps"]["subset"] > 0 and s["steps"]["skip"] > 0
    works_with(f"torchao-{method}", f"torchao `quantize_(transformer, {QUANT[method]}())` (Flux)",
               f"the same {len(sites)} sites and plan ({' '.join(LETTERS[m] for m in modes)}) as unquantized; "
               f"= the eager oracle on the quantized model every step; {s['cache_hits']} cache hits")


@pytest.mark.inductor
def test_torchao_int8_weight_only_under_inductor_and_its_dump(tmp_path):
    model = _quantized_flux("int8-weight-only")
    fast = torch.compile(model, backend=duca_compile.duca_backend(FORAConfig(interval=2)), dynamic=False)
    modes = run_against_oracle("flux", model, fast, timesteps(4), atol=1e-4)
    s = duca_compile.stats(fast)
    assert modes == ["full", "reuse", "full", "reuse"] and s["cache_hits"] > 0
    names = sorted(os.path.basename(f) for f in duca_compile.dump(fast, str(tmp_path)))
    inductor = [n for n in names if ".inductor" in n]
    assert {n.split(".")[0] for n in inductor} == {"graph0_variant0_FULL", "graph0_variant1_REUSE"}
    assert all("def call(" in open(tmp_path / n).read() for n in inductor)    # Inductor's output code
    works_with("torchao-inductor", "torchao int8 weight-only under Inductor (Flux, FORA 2), then `dump`",
               f"= the eager oracle within 1e-4 every step; {s['variants_compiled']} variants compiled, "
               f"{s['cache_hits']} cache hits; `dump` writes Inductor's output code of FULL and REUSE")


# -- looking inside ---------------------------------------------------------------------------------

@pytest.mark.smoke
def test_dump_writes_each_variants_graph_and_dynamos_code(tmp_path):
    model, fast = compile_tiny("dit", DuCaConfig(interval=3, ratio=0.5))
    run_against_oracle("dit", model, fast, timesteps(4))              # F C A F: FULL, SUBSET, SKIP
    files = duca_compile.dump(fast, str(tmp_path))
    names = sorted(os.path.basename(f) for f in files)
    variants = {n.split("_", 2)[2].split(".")[0]: n for n in names if n.endswith(".fx.py")}
    assert set(variants) == {"FULL", "SUBSET_any_k_at_2_sites", "SKIP"}
    full, subset, skip = (open(tmp_path / variants[k]).read() for k in ("FULL", "SUBSET_any_k_at_2_sites", "SKIP"))
    assert full.startswith("# FULL: ") and "scaled_dot_product_attention" in full
    assert "scaled_dot_product_attention" not in skip and "scaled_dot_product_attention" not in subset
    assert "scatter" in subset and "gather" in subset
    dynamo = [n for n in names if n.startswith("dynamo_forward")]
    assert len(dynamo) == 1
    source = open(tmp_path / dynamo[0]).read()
    assert "def forward" in source or "depyf is not installed" in source
    assert "SUBSET" in open(tmp_path / "explain.txt").read()
    with pytest.raises(ValueError, match="no duca caching state"):
        duca_compile.dump(make_model("dit"), str(tmp_path / "none"))
    works_with("dump", "`duca_compile.dump(compiled, dir)`",
               f"{len(files)} files for DuCa on DiT: the FX graph of FULL, SUBSET and SKIP (attention only in "
               "FULL), Dynamo's bytecode as source (depyf), explain.txt")


def test_works_with_table_has_a_row_per_combination():
    from works_with import KEYS, MARKERS, PAGE, table

    text = PAGE.read_text()
    rows = [line for line in table(text).splitlines() if line.startswith("| ") and not line.startswith("| combination")]
    assert len(rows) == len(KEYS) and text.count(MARKERS[0]) == 1


def test_depyf_prepare_debug_runs_around_a_duca_model(tmp_path):
    depyf = pytest.importorskip("depyf")
    model, fast = compile_tiny("dit", FORAConfig(interval=2))
    with depyf.prepare_debug(str(tmp_path)):
        modes = run_against_oracle("dit", model, fast, timesteps(3))
    names = os.listdir(tmp_path)
    assert modes == ["full", "reuse", "full"]
    assert any(n.startswith("__transformed_code") for n in names) and any(n.startswith("full_code") for n in names)
    works_with("depyf-prepare-debug", "`with depyf.prepare_debug(dir):` around the calls",
               "runs; depyf writes Dynamo's transformed code and the full code of each frame")


def test_steps_that_never_reach_the_backend_warn():
    # Dynamo stops compiling a code object at recompile_limit entries and runs it eagerly: a new
    # resolution past the limit would run uncached without a word.
    pipe = enable(_pipe(), FORAConfig(interval=2), inner="eager")
    _run(pipe)
    with torch._dynamo.config.patch(recompile_limit=1), pytest.warns(UserWarning, match="recompile_limit"):
        _run(pipe, height=96, width=96)
    assert duca_compile.stats(pipe.transformer)["requests"] == 1     # that request never reached duca
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _run(pipe, height=96, width=96)                               # compiled again: no warning
    works_with("recompile-limit", "a step that never reaches the backend (Dynamo's `recompile_limit` hit)",
               "a UserWarning naming the step and the limit, instead of running uncached in silence")
