"""Norm → activation → conv chains found by tracing a module's forward with
torch.fx, and fused in a forward generated from that trace.

A module's forward is traced with plain nn.Sequentials and layers made only
of chain parts and torch.nn modules (timm's ConvNormAct) followed into, so a
chain may span nested ones, as torchvision's Conv2dNormActivation stacks do;
every other submodule stays one call, and so does any module with hooks. A
chain is a normalisation whose output reaches one convolution and nothing
else, through at most one activation and any pass-through modules. A chain
wholly inside a followed Sequential or layer is fused there, in that
module's own forward; one that crosses module boundaries is fused in the
forward of the module holding both ends.

The module keeps its class, submodules, parameters and buffers (state dict
keys are unchanged); only its `forward` attribute is set, to a FusedForward.
A trace bakes in Python-level decisions (`if self.training`, `if temb is not
None`, `len(args)`), so FusedForward keeps one plan per call signature: the
module's own plain attributes, its children and their modes, grad mode, and
the non-tensor arguments. A plan steps aside (the module's own forward runs)
when a module it fused or followed into gains hooks or a followed module
changes mode; a signature that cannot be keyed or traced, or a forward that
sets attributes during the trace, runs the module's own forward too. What
the key cannot see, and the trace fixes: Python-level randomness or global
state read inside the forward, `isinstance(x, torch.Tensor)` on an argument
(False for a trace's proxies; `torch.is_tensor` is answered right), and
other changes inside the modules a trace followed. The plans belong to one
module object: `copy.copy` and nn.DataParallel's replicas would call the
original module (copy.deepcopy and pickling are fine).
"""
import contextlib
import inspect
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from resfast.conversion.units import Unsupported, activation_call_kind, activation_module_kind, conv_kind, \
    is_pass_through, norm_act_conv, norm_act_max_pool, norm_kind, pool_kind, pool_mismatch, rank_mismatch
from resfast.nn.members import has_hooks


def is_plain_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _is_part(m: nn.Module) -> bool:
    """A module the chains are made of, or one that may end up inside them."""
    for kind in (norm_kind, conv_kind, pool_kind, activation_module_kind, is_pass_through):
        try:
            if kind(m):
                return True
        except Unsupported:
            return True
    return False


def is_layer(m: nn.Module) -> bool:
    """A module of any class but torch.nn's containers made only of parts and
    torch.nn's own modules: a conv → norm → act layer (timm's ConvNormAct) or
    a simple block (torchvision's BasicBlock without a downsample).
    Followed into like a Sequential, so a chain may start in one such layer
    and end in the next; a chain wholly inside one is fused in its own
    forward (see plan_for). Modules holding other custom modules stay single
    calls, and so do resfast's own (fused already: a trace would run their
    Python, BatchNorm bookkeeping included)."""
    children = list(m.children())
    if not children or _is_part(m) or isinstance(m, (nn.ModuleList, nn.ModuleDict)) or \
            type(m).__module__.split(".")[0] == "resfast":
        return False
    return all(_is_part(c) or (type(c).__module__.startswith("torch.nn.") and not list(c.children()))
               for c in children)



# ---------------------------------------------------------------- call signatures
_TENSOR = "tensor"
_VALUES = (bool, int, float, str, type(None))
_PLAIN = frozenset(_VALUES)  # exact types: a per-call check, kept cheap
_NO_KWARGS = (tuple, ())
_MISSING = object()
# Plans kept per module (a float argument that changes every call would
# otherwise add one each call); beyond, new signatures run the module's own
# forward, unstored.
_MAX_PLANS = 32


class _Unkeyable(Exception):
    pass


def _spec(value, tensors):
    """A hashable description of value with each tensor replaced by a marker
    (appended to tensors, in order)."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return _TENSOR
    if isinstance(value, _VALUES):
        return type(value), value  # type too: 1, 1.0 and True are equal as keys
    if type(value) in (tuple, list):
        return type(value), tuple(_spec(v, tensors) for v in value)
    raise _Unkeyable


def _fill(spec, tensors):
    if spec == _TENSOR:
        return next(tensors)
    kind, value = spec
    if kind in (tuple, list):
        return kind(_fill(s, tensors) for s in value)
    return value


def _state(module):
    """What the module's forward may branch on besides its arguments: its own
    plain attributes (training, flags such as diffusers'
    gradient_checkpointing), which modules its children are and their
    training modes."""
    return (tuple([(k, v) for k, v in module.__dict__.items() if type(v) in _PLAIN]),
            tuple([(id(c), c.training) for c in module._modules.values() if c is not None]))


# ---------------------------------------------------------------- tracing
class _Scope(nn.Module):
    """The traced root: module `m` called with one call signature's
    non-tensor arguments fixed and its tensors taken from one placeholder."""

    def __init__(self, module, args_spec, kwargs_spec, count):
        super().__init__()
        self.m = module
        self.specs = (args_spec, kwargs_spec, count)

    def forward(self, tensors):
        args_spec, kwargs_spec, count = self.specs
        it = iter([tensors[i] for i in range(count)])
        args = _fill(args_spec, it)
        kwargs = dict(_fill(kwargs_spec, it))
        return type(self.m).forward(self.m, *args, **kwargs)


class _Tracer(fx.Tracer):
    """Follows plain nn.Sequentials into, and layers (is_layer) when
    follow_layers, except the modules in `leaves` and those with hooks (so
    their hooks still run); records the ones it followed."""

    def __init__(self, leaves=frozenset(), follow_layers=True):
        super().__init__()
        self.proxy_buffer_attributes = True  # a forward's buffer updates are recorded, not run
        self.leaves = leaves
        self.follow_layers = follow_layers
        self.followed = set()

    def is_leaf_module(self, m, qualname):
        followed = is_plain_sequential(m) or (self.follow_layers and is_layer(m))
        return not followed or id(m) in self.leaves or has_hooks(m)

    def call_module(self, m, forward, args, kwargs):
        if not self.is_leaf_module(m, ""):
            self.followed.add(id(m))
        return super().call_module(m, forward, args, kwargs)


@dataclass
class Chain:
    """norm → (act) → conv, or BatchNorm → (act) → max pool, in a trace;
    paths relative to the traced module."""

    nodes: list  # the chain's graph nodes, norm first, conv (or pool) last
    activation: str
    parts: list  # the chain's module paths, or function names
    fuse: callable = norm_act_conv  # the fused unit: fuse(x, norm, last module, activation)

    @property
    def norm(self):
        return self.nodes[0].target[2:]  # strip the scope's "m."

    @property
    def end(self):
        return self.nodes[-1].target[2:]


@dataclass
class Plan:
    """One call signature's trace: its chains and what it left alone."""

    graph: fx.Graph = None
    chains: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (parts, reason)
    followed: set = field(default_factory=set)  # ids of the Sequentials and layers the trace followed into
    error: str = None


def _describe(node):
    if node.op == "call_module":
        return node.target[2:]
    return getattr(node.target, "__name__", str(node.target))


def _chain_from(norm_node, scope):
    """The chain starting at a normalisation node: Chain, (parts, reason) for
    a recognised chain that cannot be fused, or None."""
    reasons = []

    def kind_of(fn, *args):
        try:
            return fn(*args)
        except Unsupported as e:
            reasons.append(str(e))
            return "unsupported"

    def module(node):
        m = scope.get_submodule(node.target)
        if has_hooks(m):
            reasons.append(f"{node.target[2:]} has hooks, which a fused unit would not run")
        return m

    if len(norm_node.args) != 1 or norm_node.kwargs:
        return None
    kind = kind_of(norm_kind, module(norm_node))
    if kind is None:
        return None
    activation = None if kind == "unsupported" else kind[1]
    nodes = [norm_node]
    while True:
        node = nodes[-1]
        users = list(node.users)
        if len(users) != 1:
            convs = [u for u in users if u.op == "call_module" and
                     kind_of(conv_kind, scope.get_submodule(u.target)) is not None]
            if convs:
                parts = [_describe(n) for n in nodes]
                return parts, f"the normalised activation feeds {len(users)} consumers " \
                              f"({', '.join(_describe(u) for u in users)})"
            return None
        user = users[0]
        if not user.args or user.args[0] is not node or any(a is node for a in user.args[1:]):
            return None
        if user.op == "call_module":
            m = module(user)
            conv = kind_of(conv_kind, m)
            if conv is not None:
                if len(user.args) != 1 or user.kwargs:
                    return None
                mismatch = rank_mismatch(scope.get_submodule(norm_node.target), m)
                if mismatch:
                    reasons.append(mismatch)
                nodes.append(user)
                parts = [_describe(n) for n in nodes]
                if reasons:
                    return parts, reasons[0]
                return Chain(nodes, activation or "identity", parts)
            pool = kind_of(pool_kind, m)
            if pool is not None:
                if len(user.args) != 1 or user.kwargs:
                    return None
                norm = scope.get_submodule(norm_node.target)
                mismatch = None if "unsupported" in (pool, kind) else pool_mismatch(norm)
                if mismatch:
                    reasons.append(mismatch)
                nodes.append(user)
                parts = [_describe(n) for n in nodes]
                if reasons:
                    return parts, reasons[0]
                return Chain(nodes, activation or "identity", parts, norm_act_max_pool)
            if kind_of(is_pass_through, m) in (True, "unsupported"):
                nodes.append(user)
                continue
            act = kind_of(activation_module_kind, m)
        else:
            act = activation_call_kind(user.op, user.target)
            if act is not None and (len(user.args) > 2 or set(user.kwargs) - {"inplace"}):
                act = None
        if act is None:
            return None
        if activation not in (None, "identity") and act != "unsupported":
            reasons.append(f"two activations ({activation}, then {act})")
        activation = activation if act == "unsupported" else act
        nodes.append(user)


@contextlib.contextmanager
def _proxies_are_tensors():
    """torch.is_tensor(proxy) is False, which would trace a forward's
    "not a tensor yet" branch (diffusers' timesteps handling): during a trace
    it says what the value will be at run time."""
    is_tensor = torch.is_tensor
    torch.is_tensor = lambda obj: isinstance(obj, fx.Proxy) or is_tensor(obj)
    try:
        yield
    finally:
        torch.is_tensor = is_tensor


def _trace(module, args_spec, kwargs_spec, count, leaves=frozenset(), follow_layers=True):
    scope = _Scope(module, args_spec, kwargs_spec, count)
    tracer = _Tracer(leaves, follow_layers)
    plan = Plan()
    before = {m: dict(m.__dict__) for m in module.modules()}
    try:
        with _proxies_are_tensors():
            plan.graph = tracer.trace(scope)
    except Exception as e:  # fx raises many kinds: TraceError, TypeError, RuntimeError, NameError...
        plan.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return scope, plan
    finally:
        # A forward that sets its own attributes (a counter, a cached input)
        # would do so once, at the trace: undo it, and keep no plan.
        changed = []
        for m, state in before.items():
            keys = sorted(k for k in state.keys() | m.__dict__.keys()
                          if m.__dict__.get(k, _MISSING) is not state.get(k, _MISSING))
            if keys:
                changed += keys
                m.__dict__.clear()
                m.__dict__.update(state)
    if changed:
        plan.error = f"the forward sets attributes ({', '.join(changed)})"
        return scope, plan
    plan.followed = tracer.followed
    constants = [n.target for n in plan.graph.nodes if n.op == "get_attr" and not n.target.startswith("m.")]
    if constants:
        plan.error = f"the forward creates tensor constants ({', '.join(constants)})"
        return scope, plan
    for node in plan.graph.nodes:
        if node.op != "call_module":
            continue
        found = _chain_from(node, scope)
        if isinstance(found, Chain):
            plan.chains.append(found)
        elif found is not None:
            plan.skipped.append(found)
    return scope, plan


def _container(path_a, path_b):
    """The deepest module path holding both (relative to the traced module)."""
    a, b = path_a.split("."), path_b.split(".")
    common = []
    for x, y in zip(a[:-1], b[:-1]):
        if x != y:
            break
        common.append(x)
    return ".".join(common)


def _inside(path, container):
    return path == container or path.startswith(container + ".")


def plan_for(module, args_spec, kwargs_spec, count):
    """Trace module for one call signature. A chain wholly inside one of the
    Sequentials or layers followed into belongs to it (fused where it is,
    so the block structure stays): the outermost such modules that no other
    chain crosses are traced again as single calls. A forward that
    does not trace with layers followed into may trace with them as calls
    (the layer's own forward is what fails)."""
    follow_layers = True
    scope, plan = _trace(module, args_spec, kwargs_spec, count)
    if plan.error is not None:
        follow_layers = False
        retry = _trace(module, args_spec, kwargs_spec, count, follow_layers=False)
        if retry[1].error is None:
            scope, plan = retry
    if plan.error is not None or not plan.chains:
        return scope, plan
    ends = [(c.norm, c.end) for c in plan.chains]
    containers = sorted({_container(*e) for e in ends} - {""}, key=len)
    leaves = []
    for c in containers:
        if any(_inside(c, other) for other in leaves):
            continue
        if all(_inside(n, c) == _inside(v, c) for n, v in ends):
            leaves.append(c)
    if not leaves:
        return scope, plan
    ids = frozenset(id(module.get_submodule(c)) for c in leaves)
    return _trace(module, args_spec, kwargs_spec, count, ids, follow_layers)


def fused_graph(plan: Plan) -> fx.Graph:
    """plan's graph with each chain replaced by one call of its fused unit
    that reads the modules where they are."""
    graph = plan.graph
    for chain in plan.chains:
        norm_node, end_node = chain.nodes[0], chain.nodes[-1]
        # At the norm's place: what runs between the norm and the conv (an
        # in-place op on the norm's input, another call of a shared norm)
        # keeps its order relative to the normalisation.
        with graph.inserting_before(norm_node.next):
            norm = graph.get_attr(norm_node.target)
            end = graph.get_attr(end_node.target)
            fused = graph.call_function(chain.fuse, (norm_node.args[0], norm, end, chain.activation))
        end_node.replace_all_uses_with(fused)
        for node in reversed(chain.nodes):
            graph.erase_node(node)
    graph.lint()
    return graph


# ---------------------------------------------------------------- the installed forward
class _Root:
    """What a generated forward reads its modules from: `self.m...`."""

    __slots__ = ("m",)

    def __init__(self, module):
        self.m = module


def _compile(scope, plan):
    """(the generated forward, its guards): the modules the plan fused or
    followed into, with their training modes at the trace. Hooks added to
    them later, or a changed mode, send the call to the module's own forward."""
    # A chain's own modules only need to stay hook-free: the fused op reads
    # the norm's mode at each call.
    guards = {id(m): (m, m.training) for m in scope.m.modules() if id(m) in plan.followed}
    for chain in plan.chains:
        for node in chain.nodes:
            if node.op == "call_module":
                m = scope.get_submodule(node.target)
                guards.setdefault(id(m), (m, None))
    return type(fx.GraphModule(scope, fused_graph(plan))).forward, tuple(guards.values())


def _guards_hold(guards) -> bool:
    if _global_hooks():
        return False
    return all((training is None or m.training is training) and not has_hooks(m) for m, training in guards)


def _global_hooks() -> bool:
    from torch.nn.modules import module as torch_module
    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
                or torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks)


class FusedForward:
    """A module's forward with its norm → act → conv chains fused: set as the
    instance's `forward` attribute. Runs the plan traced for the call's
    signature (tracing it on first use), or the class's own forward where
    there is none."""

    def __init__(self, module):
        self._module = module
        self._root = _Root(module)
        self._plans = {}

    def __call__(self, *args, **kwargs):
        module = self._module
        if not kwargs and all(type(a) is torch.Tensor for a in args):  # the common call, keyed cheaply
            tensors, args_spec, kwargs_spec = args, (tuple, (_TENSOR,) * len(args)), _NO_KWARGS
        else:
            tensors = []
            try:
                args_spec, kwargs_spec = _spec(args, tensors), _spec(tuple(kwargs.items()), tensors)
            except _Unkeyable:
                return type(module).forward(module, *args, **kwargs)
        key = (_state(module), torch.is_grad_enabled(), args_spec, kwargs_spec)
        compiled = self._plans.get(key)
        if compiled is None:
            if len(self._plans) >= _MAX_PLANS:
                return type(module).forward(module, *args, **kwargs)
            compiled = self._plans[key] = self._build(args_spec, kwargs_spec, len(tensors))
        if compiled is False or not _guards_hold(compiled[1]):
            return type(module).forward(module, *args, **kwargs)
        return compiled[0](self._root, tensors)

    @torch.compiler.disable
    def _build(self, args_spec, kwargs_spec, count):
        """The generated forward for one signature and its guards, or False (run the module's own)."""
        scope, plan = plan_for(self._module, args_spec, kwargs_spec, count)
        if plan.error is not None or not plan.chains:
            return False
        return _compile(scope, plan)

    def add_plan(self, signature, scope, plan, grad_enabled):
        """Install a plan traced at conversion for its signature (args_spec, kwargs_spec, count)."""
        key = (_state(self._module), grad_enabled, signature[0], signature[1])
        self._plans[key] = _compile(scope, plan)

    def __getstate__(self):
        # Generated functions do not pickle; plans are traced again after loading.
        return {"_module": self._module, "_root": self._root, "_plans": {}}


def default_signature(module):
    """The call signature resfast.convert traces at conversion: tensors for
    the forward's required positional parameters, defaults for the rest.
    None if the forward's signature cannot be read or keyed."""
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.KEYWORD_ONLY and p.default is p.empty for p in params):
        return None
    count = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in params)
    return (tuple, (_TENSOR,) * count), _NO_KWARGS, count
