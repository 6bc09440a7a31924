"""Regional compilation: one compiled block graph serves every block of its class.

    transformer.compile_repeated_blocks(backend=duca_backend(config), dynamic=False)   # or block.compile(...)

Dynamo hands the backend one block's graph, which ``find_sites`` reads as a stack of one block
(``ONE_BLOCK``). A ``BlockRunner`` serves every block Dynamo routes through that graph; the call's
first parameter says which block, and so which model, a call is for. The model's ``BlockStack``
(in its ``ModelState``) lists its blocks in the order a model call runs them, plans each step for
all of them at once (the per-site plan a whole-model graph would get, under the real site names),
and keeps each block's caches in a ``Piece`` of its own. A forward pre-hook on the model marks each
model call and hands over its timestep: blocks of Flux or SD3 never see the timestep itself.

SKIP has no stack to skip inside one block. Each block returns its own output of the last step
that ran it, so the last block returns the cached stack output, as a whole-model SKIP does; what
runs between blocks works on outputs the next block ignores.
"""
from __future__ import annotations

import inspect
import weakref

import torch

from . import owners
from .passes.graph_paths import ONE_BLOCK, TIMESTEP_NAMES
from .passes.find_sites import Site
from .policies import Mode, StepPlan
from .policies.base import effective_mode
from .runner import GraphRunner, Piece, derive, shape_key
from .runtime import state_for

__all__ = ["BlockRunner", "BlockLookup", "BlockStack", "SKIP_IN_REGIONAL", "block_graph_key", "enter_block"]

# (settings, block graph key) -> the first BlockRunner of that graph: later graphs of one block class
# (Dynamo compiles the first block apart, for its input strides) share its compiled variants
_LEADERS: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()

SKIP_IN_REGIONAL = ("SKIP in regional mode: every block returns its output of the last step that ran it "
                    "(no block computes); the last block's is the cached stack output")


class _Block:
    """One block of a model as one graph serves it: its name, position, caches and plans. A block
    Dynamo later routes through another graph (a recompile) gets a second ``_Block`` with the
    same name and sites, and caches of its own."""

    def __init__(self, name: str, layer: int, runner: "BlockRunner"):
        self.name, self.layer = name, layer
        self.runner = weakref.ref(runner)
        self.sites = [Site(**{**s.__dict__, "name": name + s.name[len(ONE_BLOCK):], "block": name, "layer": layer})
                      for s in runner.sitemap.sites]
        self.names = {s.name: g.name for s, g in zip(runner.sitemap.sites, self.sites)}     # graph's -> model's
        self.piece = Piece(self.names)
        self.planned: dict = {}                  # (step, num_steps) -> runner._Planned for this block
        self.moved = False                       # the block ran in another graph before this one


class BlockStack:
    """The blocks of one model in call order, and the per-step plan they share."""

    def __init__(self, policy):
        self.policy = policy
        self.blocks: list[_Block] = []           # one per block module, in the order a model call runs them
        self.views: list[_Block] = []            # every (block, graph) pair: what holds caches
        self.current: dict[int, _Block] = {}     # layer -> the _Block that ran it last
        self.by_module: dict[int, _Block] = {}   # id(block module) -> its first _Block
        self.sites: list[Site] = []
        self.plans: dict = {}                    # (step, num_steps) -> (plan, actions, skip) for every site
        self.clusters: dict[int, dict] = {}      # slot -> ClusCa's clusters per token count (shared by blocks)
        self.adaptive = None                     # adaptive_blocks.AdaptiveStack, with AdaptiveConfig
        self.call = -1                           # st.clock_calls of the model call being run
        self.reset_at = -1                       # model call whose shape change already started a request

    def add(self, module: torch.nn.Module, name: str, runner: "BlockRunner") -> tuple[_Block, bool]:
        """The ``_Block`` for ``module`` run by ``runner``, and whether the module was known already
        (from another graph: its caches there do not carry over)."""
        known = self.by_module.get(id(module))
        block = _Block(name, known.layer if known else len(self.blocks), runner)
        self.views.append(block)
        if known is not None:
            return block, True
        self.by_module[id(module)] = block
        self.blocks.append(block)
        self.sites += block.sites
        self.plans.clear()                       # layer-dependent schedules see one more block
        for b in self.views:
            b.planned.clear()
        return block, False

    def is_last(self, block: _Block) -> bool:
        return block.layer == len(self.blocks) - 1

    def plan_step(self, step: int, num_steps: int | None):
        """What ``GraphRunner.plan_step`` gives for a whole model: the step's plan, labelled."""
        got = self.plans.get((step, num_steps))
        if got is None:
            plan = self.policy.plan(step, num_steps)
            actions, skip = self.policy.actions(plan, self.sites, len(self.blocks), step, num_steps)
            got = self.plans[(step, num_steps)] = (StepPlan(effective_mode(actions, skip), plan.ratio), actions, skip)
        return got

    def planned(self, block: _Block, step: int | None, num_steps: int | None):
        """``block``'s share of the step's plan (``step=None``: the FULL plan a request starts with)."""
        p = block.planned.get((step, num_steps))
        if p is None:
            if step is None:
                plan, actions, skip = StepPlan(Mode.FULL), {s.name: "compute" for s in self.sites}, False
            else:
                plan, actions, skip = self.plan_step(step, num_steps)
            runner = block.runner()
            local = {s.name: actions[block.names[s.name]] for s in runner.sitemap.sites}
            # A block computing all its sites on a SKIP step (full in block 0 only) runs its FULL
            # variant: the fresh output it returns is dropped, as the next block returns its cache
            runs_skip = skip and any(a != "compute" for a in local.values())
            p = block.planned[(step, num_steps)] = derive(plan, actions, skip, block.sites,
                                                          runner.key(local, runs_skip), local,
                                                          stack_hit=block.layer == 0)
        return p

    def graphs(self) -> list:
        return [(b.runner(), b.piece) for b in self.views if b.runner() is not None]


class BlockLookup:
    """Per call of a block graph: the state of the model the block belongs to, and the block.

    The model is the module on the call stack whose forward takes the timestep, innermost first
    (else the outermost holding the block); the first sight of a model hooks its forward."""

    def __init__(self, settings, anchor_index: int, on_new=None):
        self.settings, self.anchor_index, self.on_new = settings, anchor_index, on_new
        self.known: dict[int, tuple] = {}        # id(anchor) -> (weakref anchor, weakref state, _Block)

    def __call__(self, args, runner: "BlockRunner"):
        anchor = args[self.anchor_index]
        entry = self.known.get(id(anchor))
        if entry is not None and entry[0]() is anchor and entry[1]() is not None:
            return entry[1](), entry[2]
        st, block_module, model = self._find(anchor)
        names = {id(m): n for n, m in model.named_modules()}
        block, block.moved = st.regional.add(block_module, names.get(id(block_module), type(block_module).__name__),
                                             runner)
        self.known[id(anchor)] = (weakref.ref(anchor), weakref.ref(st), block)
        return st, block

    def state(self, args):
        """The state alone (a block graph run plainly, in grad mode)."""
        anchor = args[self.anchor_index]
        entry = self.known.get(id(anchor))
        st = entry[1]() if entry is not None and entry[0]() is anchor else None
        return st if st is not None else self._find(anchor)[0]

    def _find(self, anchor):
        block_module, model, frame_locals = _modules_of(anchor)
        owner = owners.tie(anchor, model)
        st = state_for(owner, self.settings, self.on_new)
        if st.regional is None:
            st.regional = BlockStack(st.policy)
            _hook(model)
            _clock(st, _timestep_in(model, frame_locals))     # this call started before the hook existed
        return st, block_module, model


def _modules_of(anchor):
    """(block, model, the model's forward locals) for a call whose first parameter is ``anchor``."""
    found = owners.modules_on_stack(anchor)
    if not found:
        raise RuntimeError("duca: a block graph ran outside any module holding its weights")
    block = found[0][0]
    outer = [(m, f) for m, f in found if m is not block]
    for module, frame_locals in outer:
        if _timestep_parameter(module) is not None:
            return block, module, frame_locals
    return (block, *outer[-1]) if outer else (block, block, found[0][1])


def _timestep_parameter(module) -> tuple[int, str] | None:
    """(position, name) of the forward's timestep parameter, or None."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    for i, p in enumerate(params):
        if p.name in TIMESTEP_NAMES:
            return i, p.name
    return None


def _timestep_in(module, frame_locals: dict):
    """The timestep ``module`` was called with: from its call's arguments (PixArt's forward rebinds
    ``timestep`` to its embedding before the blocks run), else from its forward's locals."""
    param = _timestep_parameter(module)
    if param is None:
        return None
    called = owners.call_arguments(module)
    if called is not None:
        args, kwargs = called
        return kwargs.get(param[1], args[param[0]] if param[0] < len(args) else None)
    return frame_locals.get(param[1], (frame_locals.get("kwargs") or {}).get(param[1]))


def _clock(st, timestep) -> None:
    st.clock_calls += 1
    st.pending_timestep = timestep


def _hook(model: torch.nn.Module) -> None:
    """Mark every call of ``model`` for the regional states of its owner (once per model)."""
    owner = owners.owner_of_module(model)
    if getattr(owner, "clock_hook", None) is not None:
        return
    param = _timestep_parameter(model)

    def mark_call(module, args, kwargs):
        t = None
        if param is not None:
            t = kwargs.get(param[1], args[param[0]] if len(args) > param[0] else None)
        for st in owner.states.values():
            if st.regional is not None:
                _clock(st, t)

    owner.clock_hook = model.register_forward_pre_hook(mark_call, with_kwargs=True)


def enter_block(runner, args) -> tuple:
    """What every block runner does first at a call: find the model's state and the block, mark a
    new model call (at its first block), and start a new request where the inputs' shapes changed
    or Dynamo moved the block to another graph. Returns (state, block, tracked, first block)."""
    st, block = runner.resolve(args, runner)
    stack = st.regional
    tracked = st.advance_piece(None)                  # the model's pre-hook gave the timestep
    first = stack.call != st.clock_calls
    if first:
        stack.call = st.clock_calls
        st.last_indices, st.last_assign = {}, {}
    key, anchor = shape_key(args, runner.user_indices), id(args[runner.resolve.anchor_index])
    reshaped = st.shape_keys.get(anchor, key) != key
    if block.moved and not reshaped:
        # Dynamo recompiled this block for the same shapes: the new graph's caches start empty
        st.warn_once("regraph", f"duca: block {block.name} now runs in another compiled graph (a Dynamo "
                     "recompile); its caches there start empty, so the request restarts from a full step")
    if (reshaped or block.moved) and stack.reset_at != st.clock_calls:
        st.stats.shape_resets += reshaped
        st.epoch += 1                                  # never mix caches of two shapes, once per model call
        stack.reset_at = st.clock_calls
    block.moved = False
    st.shape_keys[anchor] = key
    stack.current[block.layer] = block
    return st, block, tracked, first


def block_graph_key(gm, examples) -> tuple:
    """What two block graphs must share to share compiled variants: code, input shapes and output layout."""
    inputs = tuple((tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else x for x in examples)
    out = gm.graph.output_node().args[0]
    values = [n.meta.get("example_value") if isinstance(n, torch.fx.Node) else None
              for n in (out if isinstance(out, (tuple, list)) else (out,))]
    layout = tuple((tuple(v.shape), v.stride()) if isinstance(v, torch.Tensor) else None for v in values)
    return gm.code, inputs, layout


class BlockRunner(GraphRunner):
    """A ``GraphRunner`` for one block's graph: each call runs the block's share of the model's step
    plan, on the block's own caches. Stats count a model call once (at its first block). Inputs at
    ``strided`` are made contiguous (the variants are compiled for contiguous inputs); a runner whose
    ``share_key`` an earlier one has uses that one's compiled variants."""

    def __init__(self, *args, strided=(), share_key=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.strided = frozenset(strided)
        leader = _LEADERS.get(share_key) if share_key is not None else None
        self.leader = leader
        if leader is not None:
            self.variants, self.by_plan, self.variant_graphs = leader.variants, leader.by_plan, leader.variant_graphs
            self.build = leader.build
        elif share_key is not None:
            _LEADERS[share_key] = self

    def __call__(self, *args):
        if self.strided:
            args = tuple(a.contiguous() if i in self.strided else a for i, a in enumerate(args))
        st, block, tracked, first = enter_block(self, args)
        stack, piece = st.regional, block.piece
        slot = piece.slot(st.slot, self)
        slot.clusters = stack.clusters.setdefault(st.slot, slot.clusters)
        if not tracked:
            st.stats.fallback_calls += first
            st.warn_once("untracked", "duca: the model's forward has no timestep argument and no "
                         "duca_compile.sampling() context is active, so every call runs FULL (no caching)")
        p = stack.planned(block, st.step if tracked and slot.epoch == st.epoch else None, st.num_steps)
        if slot.epoch != st.epoch:
            slot.taylor.reset()
            slot.clusters.clear()          # shared by the blocks: the request's first clustering is cold
        extra = self._inputs(st, slot, p.actions, p.key, block.names)
        out = self.variant(p.actions, p.key[0], p.key, st)(*args, *slot.caches, *extra)
        if self.fallbacks:
            st.note_fallbacks(self.fallbacks)
        piece.variant_calls[p.key] += 1
        global_plan = stack.plan_step(st.step, st.num_steps) if p.plan.mode is not Mode.FULL else None
        st.last_plan, st.last_skip = p.plan, p.skip
        st.last_actions = global_plan[1] if global_plan is not None else {s.name: "compute" for s in stack.sites}
        for name in p.computed:
            st.selector.full(name)
        if p.plan.mode is Mode.FULL:
            slot.epoch = st.epoch
            if self.layout.propagation is not None and stack.is_last(block):
                piece.cold_clusterings += self._cluster_stack(st, stack, slot)
        self._count(st, p, model_call=first)
        return out

    def _cluster_stack(self, st, stack: BlockStack, slot) -> bool:
        """ClusCa's clusters, once per FULL model call, from the caches of the block that ran each
        token count's last token-wise site (see ``GraphRunner.cluster_into``), shared by every block."""
        outputs = [slot.by_key[f"stack:{i}"] for i in range(len(self.sitemap.stack_outputs))]

        def caches_of(site):
            block = stack.current[site.layer]
            return block.piece.slots[st.slot].by_key, next(k for k, v in block.names.items() if v == site.name)
        return self.cluster_into(st, slot.clusters, outputs, stack.sites, caches_of)
