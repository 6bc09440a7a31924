"""The conformance checks: one tiny model per family, compiled with the eager inner compiler.

``check(family)`` records the graphs and graph breaks Dynamo made, every site found per block, FULL
steps against the plain model, FULL / REUSE / SKIP / SUBSET steps against the eager oracle, what
the SKIP / REUSE variants still compute, and DuCa's defaults over 2 requests × 8 steps under
``set_stance("fail_on_recompile")`` (oracle, cache hits per block, reproducibility).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .expected import EXPECTED, Expected

__all__ = ["Report", "check", "matrix", "write_readme", "MARKERS"]

MARKERS = ("<!-- conformance:start -->", "<!-- conformance:end -->")
SCRIPT = ("full", "reuse", "skip", "subset", "subset")     # steps 0-6: F R A C C F R
STEPS, REQUESTS = 8, 2


@dataclass
class Report:
    family: str
    cls: str
    graphs: int = 0
    graph_breaks: int = 0
    break_reasons: list = field(default_factory=list)
    found: dict = field(default_factory=dict)          # site -> kind
    expected: dict = field(default_factory=dict)       # site -> kind
    subset: dict = field(default_factory=dict)         # site -> True | reason
    tokens: set = field(default_factory=set)
    blocks: list = field(default_factory=list)
    sited_graphs: int = 0                              # graphs holding blocks (graph breaks split the rest off)
    full_vs_plain: float | None = None                 # max |FULL step - plain model|
    oracle: dict = field(default_factory=dict)         # mode -> max |compiled - oracle| (scripted run)
    operands_gathered: int = 0                         # SUBSET gathers beyond one per subset site
    skip_block_nodes: int = -1                         # SKIP: ops of cached blocks still working on the latent
    reuse_site_nodes: int = -1                         # REUSE: attention, or ops of site modules on the latent
    duca_steps: str = ""
    duca_vs_oracle: float | None = None
    blocks_hit: int = 0
    reproducible: bool = False
    engaged: bool = False                              # some cached step differs from the plain model
    uncached: list = field(default_factory=list)       # why graphs run plainly (all of them: not cached)
    plain_vs_eager: float | None = None                # an uncached family: compiled vs eager model

    def sites_text(self) -> str:
        stacks: dict[str, dict] = {}
        for name, kind in self.found.items():
            stack, _, child = re.match(r"(.*)\.(\d+)\.(\w+)$", name).groups()
            stacks.setdefault(stack, {}).setdefault(child, (kind, []))[1].append(self.subset[name] is True)
        parts = []
        for stack, children in stacks.items():
            n = len({re.match(r".*\.(\d+)\.", s).group(1) for s in self.found if s.startswith(stack + ".")})
            kids = ", ".join(f"{c} {k.replace('_attn', '')}{_subset_text(sub)}" for c, (k, sub) in children.items())
            parts.append(f"`{stack}` ×{n}: {kids}")
        return "; ".join(parts)

    def row(self) -> str:
        exp = EXPECTED[self.family]
        if not exp.sites:
            return (f"| {self.family} (`{self.cls}`) | none: not cached | output = plain model; "
                    f"`explain()` says why | {self.graph_breaks} | – | {exp.notes} |")
        breaks = "0 (fullgraph)" if not self.graph_breaks else \
            f"{self.graph_breaks} ({self.graphs} graphs; blocks in {self.sited_graphs})"
        tokens = f"; {exp.image_tokens} video tokens = 2 frames × 4 × 4" if exp.image_tokens else ""
        gathered = f"; {self.operands_gathered} token-aligned operands gathered" if self.operands_gathered else ""
        duca = f"{self.duca_steps} ×{REQUESTS}: 0 recompiles, {self.blocks_hit}/{len(self.blocks)} blocks hit"
        verified = ", ".join(m.upper() for m in ("reuse", "skip", "subset") if m in self.oracle)
        return (f"| {self.family} (`{self.cls}`) | {self.sites_text()} | FULL = plain; {verified} = "
                f"oracle{gathered} | {breaks} | {duca} | {exp.notes}{tokens} |")


def _subset_text(per_block: list) -> str:
    if all(per_block):
        return " (subset)"
    return f" (subset in {sum(per_block)}/{len(per_block)} blocks)" if any(per_block) else ""


def _max_diff(a, b) -> float:
    return float((_output(a) - _output(b)).abs().max())


def _output(out):
    """A model's first output as one tensor (Z-Image returns a list of per-image tensors)."""
    out = out[0] if isinstance(out, tuple) else out
    return torch.stack(list(out)) if isinstance(out, list) else out


def _graph_counters():
    from .. import _torch

    counters = _torch.dynamo_counters
    counters.clear()
    return counters


def _expected_sites(model, exp: Expected) -> dict:
    out = {}
    for stack, children in exp.sites.items():
        for i, block in enumerate(model.get_submodule(stack)):
            out.update({f"{stack}.{i}.{c}": k for c, k in children.items() if getattr(block, c, None) is not None})
    return out


def _scripted(report: Report, family: str, model, exp: Expected) -> None:
    from .. import ScriptedConfig, duca_backend, explain
    from ..passes.graph_paths import block_path, is_sdpa, module_path
    from ..reference import ReferenceCache
    from ..report import _variant_name, count_ops
    from ..runtime import state_of
    from ..models import make_inputs

    counters = _graph_counters()
    fast = torch.compile(model, backend=duca_backend(ScriptedConfig(modes=SCRIPT, ratio=0.5), inner="eager"),
                         fullgraph=exp.fullgraph, dynamic=False)
    oracle = None
    for i, t in enumerate(_timesteps(len(SCRIPT) + 2)):
        kw = make_inputs(family, model, timestep=t, seed=i)
        out = fast(**kw)
        st = state_of(fast)
        oracle = oracle or ReferenceCache.from_compiled(model, fast)
        mode = st.last_plan.mode.value
        report.oracle[mode] = max(report.oracle.get(mode, 0.0), _max_diff(out, oracle.replay(fast, **kw)))
        if mode == "full":
            report.full_vs_plain = max(report.full_vs_plain or 0.0, _max_diff(out, model(**kw)))
    report.graphs = counters["stats"]["unique_graphs"]
    report.graph_breaks = sum(counters["graph_break"].values())
    report.break_reasons = sorted({r.split("\n")[0][:120] for r in counters["graph_break"]})
    graphs = [g for g in explain(fast, as_text=False) if g["sites"]]
    report.sited_graphs, graph = len(graphs), graphs[0]
    report.found = {s["name"]: s["kind"] for s in graph["sites"]}
    report.subset = {s["name"]: s["subset"] for s in graph["sites"]}
    report.tokens = {t for s in graph["sites"] for t in s["tokens"]}
    report.blocks = graph["blocks"]
    runner = next(runner for runner, _ in state_of(fast).graphs())
    blocks, sites = set(runner.sitemap.blocks), [s.name for s in runner.sitemap.sites]
    for key, gm in runner.variant_graphs.items():
        name = _variant_name(key)
        ops = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
        if name.startswith("SUBSET"):
            # one gather per subset site (its tokens), and one more per parallel block (its cached attention rows)
            halves = {s["name"] for s in graph["sites"] if "attention_channels" in s}
            report.operands_gathered = count_ops(gm)["gather"] - sum((1 + (n in halves)) * (a == "subset")
                                                                     for n, a in key[1])
        # ops on the latent only: DiT's final layer reads block 0's label embedding, Mochi's attention
        # prepares its text mask (and Dynamo asserts its sizes) whatever the step
        elif name == "SKIP":
            latent = _on_latent(gm)
            report.skip_block_nodes = sum(block_path(n) in blocks and n in latent for n in ops)
        elif name == "REUSE":
            latent = _on_latent(gm)
            report.reuse_site_nodes = sum(block_path(n) in blocks and (is_sdpa(n) or n in latent and any(
                module_path(n) == s or module_path(n).startswith(s + ".") for s in sites)) for n in ops)


def _duca(report: Report, family: str, model, exp: Expected) -> None:
    from .. import DuCaConfig, duca_backend, stats
    from ..policies.base import Mode
    from ..reference import ReferenceCache
    from ..report import _LETTERS
    from ..runtime import state_of
    from ..models import make_inputs

    fast = torch.compile(model, backend=duca_backend(DuCaConfig(), inner="eager"), fullgraph=exp.fullgraph,
                         dynamic=False)
    oracle, outputs, letters, engaged = None, [], [], False
    for request in range(REQUESTS):
        for i, t in enumerate(_timesteps(STEPS)):
            kw = make_inputs(family, model, timestep=t, seed=i)
            with torch.compiler.set_stance("fail_on_recompile" if request or i else "default"):
                out = fast(**kw)
            st = state_of(fast)
            oracle = oracle or ReferenceCache.from_compiled(model, fast)
            report.duca_vs_oracle = max(report.duca_vs_oracle or 0.0, _max_diff(out, oracle.replay(fast, **kw)))
            if st.last_plan.mode is not Mode.FULL:
                engaged |= _max_diff(out, model(**kw)) > 1e-4
            outputs.append(_output(out))
            if request == 0:
                letters.append(_LETTERS[st.last_plan.mode.value])
    report.duca_steps = "".join(letters)
    report.reproducible = all(torch.equal(a, b) for a, b in zip(outputs[:STEPS], outputs[STEPS:]))
    report.engaged = engaged
    hits = stats(fast, flops=False)["block_hits"]
    report.blocks_hit = sum(hits.get(b, 0) > 0 for b in report.blocks)


def _on_latent(gm) -> set:
    """Nodes depending on the ``hidden_states`` input (every node if no input has that name)."""
    from ..passes.find_sites import LATENT_INPUT
    from ..passes.graph_paths import source_name

    seeds = {n for n in gm.graph.nodes if n.op == "placeholder" and LATENT_INPUT.search(source_name(n))}
    if not seeds:
        return set(gm.graph.nodes)
    for n in gm.graph.nodes:
        if any(a in seeds for a in n.all_input_nodes):
            seeds.add(n)
    return seeds


def _uncached(report: Report, family: str, model, exp: Expected) -> None:
    """A family that cannot be cached: it must run plainly (equal to eager) and say why."""
    from .. import DuCaConfig, duca_backend, stats
    from ..models import make_inputs

    counters = _graph_counters()
    fast = torch.compile(model, backend=duca_backend(DuCaConfig(), inner="eager"), dynamic=False)
    for i, t in enumerate(_timesteps(3)):
        kw = make_inputs(family, model, timestep=t, seed=i)
        report.plain_vs_eager = max(report.plain_vs_eager or 0.0, _max_diff(fast(**kw), model(**kw)))
    report.graph_breaks = sum(counters["graph_break"].values())
    report.uncached = stats(fast, flops=False)["uncached"]


def _timesteps(n: int, start: float = 900.0, stop: float = 100.0) -> list[float]:
    return [start - i * (start - stop) / max(n - 1, 1) for i in range(n)]


def check(family: str) -> Report:
    """Run every conformance check on ``family``'s tiny model; failures to trace or run raise."""
    from ..models import FAMILIES, make_model

    exp = EXPECTED[family]
    report = Report(family, FAMILIES[family].cls)
    with torch.no_grad():
        model = make_model(family)
        report.expected = _expected_sites(model, exp)
        torch.compiler.reset()
        if not exp.sites:
            _uncached(report, family, model, exp)
        else:
            _scripted(report, family, model, exp)
            torch.compiler.reset()
            _duca(report, family, model, exp)
        torch.compiler.reset()
    return report


def matrix(reports: list[Report]) -> str:
    """The support matrix (docs/models.md): the issue's families, then the others tried."""
    head = ("| family | sites per block (*subset*: computed on k tokens in SUBSET) | variants verified | "
            "graph breaks | DuCa defaults, 2 requests × 8 steps | notes |\n|---|---|---|---|---|---|")
    core = [r.row() for r in reports if not EXPECTED[r.family].other]
    other = [r.row() for r in reports if EXPECTED[r.family].other]
    return "\n".join([head, *core] + (["", "Other families tried, same checks:", "", head, *other] if other else []))


def write_readme(path: str, table: str) -> None:
    text = open(path).read()
    start, end = text.index(MARKERS[0]) + len(MARKERS[0]), text.index(MARKERS[1])
    with open(path, "w") as f:
        f.write(text[:start] + "\n" + table + "\n" + text[end:])
