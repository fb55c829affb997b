"""Reading a pipeline's loop: the built-in call pattern (``pipelines.py``) an unregistered pipeline class follows.

A pipeline class that neither it nor a base class registered is matched by its loop: :func:`detect_call_pattern`
parses (never runs) the source of the ``__call__`` its MRO resolves to and recognises each built-in pattern from
the markers diffusers' own loops carry (:data:`PATTERN_MARKERS`):

- ``"uncond_cond"``: the denoiser's sample argument is built by ``torch.cat([latents] * 2)`` (or
  ``torch.cat([x, x])``) exactly when ``self.do_classifier_free_guidance`` holds, the prediction is split uncond
  first (``noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)``) under the same test, and each step makes one
  denoiser call;
- ``"uncond_cond_local"``: the same, the test being the local variable ``do_classifier_free_guidance`` of
  ``__call__`` (assigned there or a parameter);
- ``"cond_uncond"``: one denoiser call with ``class_labels`` on the doubled sample, the prediction split cond first
  (``cond_eps, uncond_eps = ...``);
- ``"separate"``: every denoiser call under ``cache_context("cond")`` or (true CFG) ``cache_context("uncond")``, one
  of each at most; or one denoiser call per step in a loop that shows no classifier-free guidance at all (no
  identifier mentions uncond, negative, cfg or classifier_free; FLUX.1 Fill / Control, FLUX.2-dev).

Detection is conservative: a pattern matches only when all its markers are present and nothing contradicts them
(a cond-first split in an uncond-first loop, a 3-way chunk or ``[x] * 3``, the sample doubled under another or a
compound test, more denoiser calls than the pattern makes, a cache context other than ``"cond"`` / ``"uncond"``
around a ``"separate"`` loop's calls, ...), and a loop is detected only when exactly one pattern matches. Calls
that pass the architecture's ``side_pass_arg`` (SD3's skip-layer pass) are not counted. What a matched loop can
still do at run time that headpag cannot honour (``guidance_rescale > 0`` without a ``rescale_noise_cfg`` in its
loop module) is refused at call time.
The ``cfg_off`` of a detected pattern is ``{scale: 1.0}`` for the scale that gates the uncond rows
(``true_cfg_scale`` when ``__call__`` takes it, else ``guidance_scale``) when its default is above 1, else ``{}``.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import weakref
from dataclasses import dataclass, field
from typing import Any, Mapping

from .pipelines import CALL_PATTERNS, PATTERN_NAMES, CallPattern

__all__ = ["Detection", "LoopFacts", "PATTERN_MARKERS", "detect_call_pattern", "loop_facts"]


#: What headpag looks for in a loop, per built-in pattern (one line each; error messages quote them).
PATTERN_MARKERS = {
    "uncond_cond": "one denoiser call per step on torch.cat([latents] * 2) if self.do_classifier_free_guidance, "
                   "split uncond first (noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)); SD, SDXL, SD3",
    "uncond_cond_local": "the same with a local variable do_classifier_free_guidance of __call__ instead of the "
                         "property; PixArt, AuraFlow",
    "cond_uncond": "one call per step with class_labels on the doubled sample, split cond first "
                   "(cond_eps, uncond_eps = ...); DiT",
    "separate": "the cond call under denoiser.cache_context('cond') and the true-CFG uncond call under "
                "cache_context('uncond'), or a single denoiser call per step without CFG; Flux, Wan, Qwen-Image",
}

# The pipeline attributes holding a denoiser (get_denoiser's, and Wan 2.2 A14B's second one): `self.<one of these>`.
_DENOISER_ATTRS = ("transformer", "unet", "transformer_2")
_PROPERTY = "self.do_classifier_free_guidance"
_LOCAL = "do_classifier_free_guidance"
# Identifier fragments that show a loop has some classifier-free guidance (refuses the single-call "separate").
_CFG_WORDS = ("uncond", "negative", "cfg", "classifier_free")
_UNCOND_NAMES = ("uncond", "neg")
_COND_NAMES = ("cond", "text", "pos")


@dataclass(frozen=True)
class DenoiserCall:
    """One syntactic call of the denoiser in ``__call__``."""

    positional: tuple[str, ...]  # each positional argument (the start of a method-call chain, as source text)
    keywords: Mapping[str, str]  # keyword -> its value, likewise (``**kwargs`` under "**")
    context: str | None  # the enclosing cache_context name; "?" when not a constant string
    growing: frozenset[str] = frozenset()  # arguments (keyword, or position as "0", "1", ...) built in __call__ by
    # a batch-dim cat / stack / repeat / expand ([x] * k too)
    output_selected: bool = False  # the output is indexed, sliced, chunked or split along the batch dim


@dataclass(frozen=True)
class LoopFacts:
    """What the source of a pipeline's ``__call__`` does with its denoiser (see the module docstring).

    ``error`` says why the source could not be read (then nothing else is filled in)."""

    owner: str = ""
    error: str | None = None
    calls: tuple[DenoiserCall, ...] = ()
    contexts: tuple[str, ...] = ()  # cache_context names, "?" for a non-constant one
    doublings: tuple[tuple[str, str], ...] = ()  # (assigned name, test) of each torch.cat([x] * 2) / ([x, x])
    splits: tuple[tuple[str, str], ...] = ()  # (order "uncond_cond" / "cond_uncond", test) of each 2-way split
    many_way: bool = False  # a chunk / split / repeat into 3 or more parts (e.g. InstructPix2Pix's 3 rows)
    local_cfg: bool = False  # do_classifier_free_guidance is a local of __call__ (assigned or a parameter)
    cfg_words: bool = False  # an identifier mentions uncond / negative / cfg / classifier_free
    defaults: Mapping[str, Any] = field(default_factory=dict)  # __call__'s parameters and their defaults


@dataclass(frozen=True)
class Detection:
    """The outcome of reading a loop: the matched ``pattern`` (a :class:`~headpag.CallPattern`) or None, the names
    of the built-in patterns whose markers all matched, and why nothing (or more than one) matched."""

    pattern: Any
    matches: tuple[str, ...]
    reason: str


def _call_owner(cls: type) -> type | None:
    """The class of ``cls``'s MRO that defines the ``__call__`` its instances run (None: only ``object`` / none)."""
    for klass in cls.__mro__:
        if klass is not object and "__call__" in vars(klass):
            return klass
    return None


def _test_name(test: ast.expr | None) -> str:
    return "always" if test is None else ast.unparse(test)


def _split_order(names: list[str]) -> str | None:
    """``"uncond_cond"`` / ``"cond_uncond"`` from the two target names of a split, None when they do not say."""
    def side(name: str) -> str | None:
        lowered = name.lower()
        if any(lowered.startswith(n) or f"_{n}" in lowered for n in _UNCOND_NAMES):
            return "uncond"
        if any(n in lowered for n in _COND_NAMES):
            return "cond"
        return None

    sides = [side(n) for n in names]
    if sides == ["uncond", "cond"]:
        return "uncond_cond"
    if sides == ["cond", "uncond"]:
        return "cond_uncond"
    return None


def _parts(call: ast.Call) -> int | None:
    """Into how many parts ``x.chunk(k)`` / ``torch.chunk(x, k)`` splits (None: not a chunk with a constant)."""
    func = call.func
    if not (isinstance(func, ast.Attribute) and func.attr == "chunk"):
        return None
    args = call.args if not (isinstance(func.value, ast.Name) and func.value.id == "torch") else call.args[1:]
    value = args[0] if args else next((k.value for k in call.keywords if k.arg == "chunks"), None)
    return value.value if isinstance(value, ast.Constant) and isinstance(value.value, int) else None


def _is_split(value: ast.expr) -> bool:
    return (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute)
            and value.func.attr in ("chunk", "split", "tensor_split"))


def _batch_dim(call: ast.Call) -> bool:
    """Whether a ``cat`` / ``stack`` call works along dim 0 (its default; a dim headpag cannot read counts too)."""
    dim = next((k.value for k in call.keywords if k.arg in ("dim", "axis")), None)
    if dim is None and len(call.args) >= 2:
        dim = call.args[1]
    try:
        return dim is None or ast.literal_eval(dim) == 0
    except ValueError:
        return True


def _doubled(call: ast.Call) -> int | None:
    """The number of copies ``torch.cat([x] * k)`` / ``torch.cat([x, x, ...])`` concatenates along the batch dim
    (None: neither)."""
    func = call.func
    if (not (isinstance(func, ast.Attribute) and func.attr in ("cat", "concat", "concatenate")) or not call.args
            or not _batch_dim(call)):
        return None
    arg = call.args[0]
    if (isinstance(arg, ast.BinOp) and isinstance(arg.op, ast.Mult) and isinstance(arg.left, ast.List)
            and len(arg.left.elts) == 1 and isinstance(arg.right, ast.Constant) and isinstance(arg.right.value, int)):
        return arg.right.value
    if isinstance(arg, (ast.List, ast.Tuple)) and len(arg.elts) >= 2:
        dumps = {ast.dump(e) for e in arg.elts}
        if len(dumps) == 1:
            return len(arg.elts)
    return None


def _is_module(expr: ast.expr) -> bool:
    """``torch`` / ``np`` / ``self``...: a name whose methods are functions, not tensor methods."""
    return isinstance(expr, ast.Name) and expr.id in ("torch", "np", "numpy", "F", "self", "math")


def _root(expr: ast.expr) -> str:
    """The expression a method-call chain starts from (``x.to(dtype=d).float()`` -> ``x``), as source text."""
    while isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute):
        expr = expr.func.value
    return ast.unparse(expr)


class _Reader(ast.NodeVisitor):
    """Collects :class:`LoopFacts` from the ``__call__`` function node, tracking the enclosing test (the nearest
    ``if`` / conditional expression whose body holds a node) and cache context."""

    def __init__(self, function: ast.FunctionDef):
        self.function = function
        self.tests: list[ast.expr | None] = [None]
        self.context: list[str | None] = [None]
        self.denoisers: set[str] = {f"self.{attr}" for attr in _DENOISER_ATTRS}
        self.calls: list[DenoiserCall] = []
        self.contexts: list[str] = []
        self.doublings: list[tuple[str, str]] = []
        self.splits: list[tuple[str, str]] = []
        self.many_way = False
        self.local_cfg = False
        self.cfg_words = False
        self.call_nodes: list[ast.Call] = []
        self.outputs: dict[int, set[str]] = {}  # id(call node) -> the names its result is assigned to
        self.assigned: dict[str, list[ast.expr]] = {}  # name -> the values assigned to it in __call__
        for node in ast.walk(function):
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and node.value is not None:
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    for name in ast.walk(target):
                        if isinstance(name, ast.Name):
                            self.assigned.setdefault(name.id, []).append(node.value)
        # aliases of the denoiser (`current_model = self.transformer if ... else self.transformer_2`) first
        for node in ast.walk(function):
            if isinstance(node, ast.Assign):
                values = [node.value.body, node.value.orelse] if isinstance(node.value, ast.IfExp) else [node.value]
                if any(ast.unparse(v) in self.denoisers for v in values):
                    self.denoisers.update(ast.unparse(t) for t in node.targets if isinstance(t, ast.Name))

    # --- scopes -------------------------------------------------------------------------------------------------

    def visit_If(self, node: ast.If) -> None:
        self.visit(node.test)
        self.tests.append(node.test)
        for child in node.body:
            self.visit(child)
        self.tests[-1] = ast.UnaryOp(ast.Not(), node.test)
        for child in node.orelse:
            self.visit(child)
        self.tests.pop()

    def visit_IfExp(self, node: ast.IfExp) -> None:
        self.visit(node.test)
        self.tests.append(node.test)
        self.visit(node.body)
        self.tests[-1] = ast.UnaryOp(ast.Not(), node.test)
        self.visit(node.orelse)
        self.tests.pop()

    def visit_With(self, node: ast.With) -> None:
        name = None
        for item in node.items:
            self.visit(item.context_expr)
            expr = item.context_expr
            if (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute)
                    and expr.func.attr == "cache_context"):
                arg = expr.args[0] if expr.args else None
                name = arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else "?"
                self.denoisers.add(ast.unparse(expr.func.value))
        self.context.append(name if name is not None else self.context[-1])
        for child in node.body:
            self.visit(child)
        self.context.pop()

    def visit_FunctionDef(self, node) -> None:
        if node is self.function:
            self.generic_visit(node)
        # nested functions (callbacks) are not the loop: skipped

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef

    # --- markers ------------------------------------------------------------------------------------------------

    def visit_Name(self, node: ast.Name) -> None:
        self._word(node.id)
        if node.id == _LOCAL and isinstance(node.ctx, ast.Store):
            self.local_cfg = True

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self._word(node.attr)
        self.generic_visit(node)

    def visit_arg(self, node: ast.arg) -> None:
        self._word(node.arg)
        if node.arg == _LOCAL:
            self.local_cfg = True

    def visit_keyword(self, node: ast.keyword) -> None:
        if node.arg:
            self._word(node.arg)
        self.generic_visit(node)

    def _word(self, name: str) -> None:
        lowered = name.lower()
        if any(w in lowered for w in _CFG_WORDS):
            self.cfg_words = True

    def visit_Assign(self, node: ast.Assign) -> None:
        target = node.targets[0] if len(node.targets) == 1 else None
        if isinstance(target, (ast.Tuple, ast.List)) and _is_split(node.value):
            names = [e.id for e in target.elts if isinstance(e, ast.Name)]
            if len(target.elts) >= 3:
                self.many_way = True
            elif len(names) == 2:
                order = _split_order(names)
                if order is not None:
                    self.splits.append((order, _test_name(self.tests[-1])))
        if isinstance(target, ast.Name):
            for sub in ast.walk(node.value):
                if isinstance(sub, ast.Call) and _doubled(sub) == 2:
                    self.doublings.append((target.id, self._test_of(node.value, sub)))
        self.generic_visit(node)

    def _test_of(self, value: ast.expr, call: ast.Call) -> str:
        """The test under which ``call`` (inside the assigned ``value``) is evaluated."""
        test = None
        for node in ast.walk(value):  # breadth first: the last conditional holding the call is the innermost
            if isinstance(node, ast.IfExp):
                if any(n is call for n in ast.walk(node.body)):
                    test = ast.unparse(node.test)
                elif any(n is call for n in ast.walk(node.orelse)):
                    test = f"not {ast.unparse(node.test)}"
        return test if test is not None else _test_name(self.tests[-1])

    def visit_Call(self, node: ast.Call) -> None:
        parts = _parts(node)
        copies = _doubled(node)
        if (parts is not None and parts > 2) or (copies is not None and copies > 2):
            self.many_way = True
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "cache_context":
            arg = node.args[0] if node.args else None
            self.contexts.append(arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else "?")
        if ast.unparse(func) in self.denoisers:
            keywords = {k.arg or "**": _root(k.value) for k in node.keywords}
            self.calls.append(DenoiserCall(tuple(_root(a) for a in node.args), keywords, self.context[-1]))
            self.call_nodes.append(node)
        self.generic_visit(node)

    def finished_calls(self) -> tuple[DenoiserCall, ...]:
        """The denoiser calls with what their arguments' data flow and their outputs' uses show."""
        for node in ast.walk(self.function):
            if isinstance(node, ast.Assign):
                held = [c for c in self.call_nodes if any(n is c for n in ast.walk(node.value))]
                names = {n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
                for call in held:
                    self.outputs.setdefault(id(call), set()).update(names)
        calls = []
        for call, node in zip(self.calls, self.call_nodes):
            arguments = {**{str(i): a for i, a in enumerate(node.args)}, **{k.arg: k.value for k in node.keywords if k.arg}}
            growing = frozenset(key for key, value in arguments.items() if self._grows_batch(value, set()))
            selected = self._selects_batch(self.outputs.get(id(node), set()))
            calls.append(DenoiserCall(call.positional, call.keywords, call.context, growing, selected))
        return tuple(calls)

    def _grows_batch(self, expr: ast.expr, seen: set[str]) -> bool:
        """Whether ``expr`` is built by a concatenation or stack along dim 0, ``repeat`` / ``repeat_interleave`` /
        ``expand``, or ``[x] * k``: through method chains (``x.to(dtype)``), conditional expressions, the pieces of
        a concatenation along another dim, and the assignments in ``__call__`` of a name it is (other calls, such
        as ``self.scheduler.scale_model_input(x, t)``, are taken as keeping the rows)."""
        if isinstance(expr, ast.IfExp):
            return self._grows_batch(expr.body, seen) or self._grows_batch(expr.orelse, seen)
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Mult) and isinstance(expr.left, ast.List):
            return True
        if isinstance(expr, ast.Name):
            if expr.id in seen:
                return False
            seen.add(expr.id)
            return any(self._grows_batch(value, seen) for value in self.assigned.get(expr.id, ()))
        if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute):
            attr = expr.func.attr
            if attr in ("cat", "concat", "concatenate", "stack"):
                if attr == "stack" or _batch_dim(expr):
                    return True
                pieces = expr.args[0] if expr.args else None
                return isinstance(pieces, (ast.List, ast.Tuple)) and any(
                    self._grows_batch(piece, seen) for piece in pieces.elts)
            if attr in ("repeat", "repeat_interleave", "expand", "tile"):
                return True
            if isinstance(expr.func.value, (ast.Name, ast.Call, ast.IfExp)) and not _is_module(expr.func.value):
                return self._grows_batch(expr.func.value, seen)  # a method of the tensor: x.to(dtype), x.float()
        return False

    def _selects_batch(self, names: set[str]) -> bool:
        """Whether a name holding a denoiser output is indexed or sliced along dim 0, chunked or split."""
        for node in ast.walk(self.function):
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id in names:
                first = node.slice.elts[0] if isinstance(node.slice, ast.Tuple) and node.slice.elts else node.slice
                if not (isinstance(first, ast.Slice) and first.lower is None and first.upper is None
                        and first.step is None):
                    return True
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and _is_split(node)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in names):
                return True
        return False


def loop_facts(cls: type) -> LoopFacts:
    """The :class:`LoopFacts` of ``cls.__call__`` (cached per class)."""
    try:
        return _FACTS[cls]
    except (KeyError, TypeError):
        pass
    facts = _read(cls)
    try:
        _FACTS[cls] = facts
    except TypeError:
        pass
    return facts


_FACTS: "weakref.WeakKeyDictionary[type, LoopFacts]" = weakref.WeakKeyDictionary()


def _read(cls: type) -> LoopFacts:
    owner = _call_owner(cls)
    if owner is None:
        return LoopFacts(error=f"{cls.__name__} defines no __call__")
    label = f"{owner.__name__}.__call__"
    function = inspect.unwrap(vars(owner)["__call__"])
    if isinstance(function, (staticmethod, classmethod)):
        function = function.__func__
    try:
        source = textwrap.dedent(inspect.getsource(function))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError, IndentationError) as error:
        return LoopFacts(owner=label, error=f"the source of {label} cannot be read ({type(error).__name__}: {error})")
    node = next((n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    if node is None:
        return LoopFacts(owner=label, error=f"the source of {label} is not a function definition")
    reader = _Reader(node)
    reader.visit(node)
    try:
        parameters = inspect.signature(function).parameters
        defaults = {name: p.default for name, p in parameters.items() if name != "self"}
    except (TypeError, ValueError):
        defaults = {}
    return LoopFacts(
        owner=label, calls=reader.finished_calls(), contexts=tuple(reader.contexts), doublings=tuple(reader.doublings),
        splits=tuple(reader.splits), many_way=reader.many_way, local_cfg=reader.local_cfg,
        cfg_words=reader.cfg_words, defaults=defaults,
    )


def _cfg_off(defaults: Mapping[str, Any], scale: str | None) -> dict[str, float]:
    """``{scale: 1.0}`` when ``__call__`` takes ``scale`` and its default turns CFG on (above 1), else ``{}``."""
    if scale is None or scale not in defaults:
        return {}
    default = defaults[scale]
    if isinstance(default, (int, float)) and not isinstance(default, bool) and default <= 1:
        return {}
    return {scale: 1.0}


def _sample_of(call: DenoiserCall, sample_arg: str) -> str | None:
    if sample_arg in call.keywords:
        return call.keywords[sample_arg]
    return call.positional[0] if call.positional else None


def _sample_grows(call: DenoiserCall, sample_arg: str) -> bool:
    return (sample_arg if sample_arg in call.keywords else "0") in call.growing


def _one_call(facts: LoopFacts, main: list[DenoiserCall], sample_arg: str) -> tuple[str | None, str | None]:
    """For the one-call patterns: (the test under which the sample is doubled, why not) ."""
    if len(main) != 1:
        return None, f"{len(main)} denoiser calls where the pattern makes one"
    if any(c.context in ("cond", "uncond", "?") for c in main):
        return None, "the denoiser call is under a cond / uncond cache context"
    if facts.many_way:
        return None, "the loop splits a batch into three or more parts"
    sample = _sample_of(main[0], sample_arg)
    tests = {test for name, test in facts.doublings if name == sample}
    if not tests:
        return None, f"the denoiser's sample {sample} is never built by torch.cat([...] * 2)"
    if len(tests) > 1:
        return None, f"the sample {sample} is doubled under different tests {sorted(tests)}"
    return tests.pop(), None


def _match(name: str, facts: LoopFacts, main: list[DenoiserCall], sample_arg: str) -> tuple[dict | None, str]:
    """``(cfg_off, "")`` when every marker of pattern ``name`` is present and none contradicts it, else
    ``(None, why not)``."""
    orders = {order for order, _ in facts.splits}
    if name in ("uncond_cond", "uncond_cond_local"):
        test, why = _one_call(facts, main, sample_arg)
        if why:
            return None, why
        wanted = _PROPERTY if name == "uncond_cond" else _LOCAL
        if test != wanted:
            return None, f"the sample is doubled when {test}, not when {wanted}"
        if name == "uncond_cond_local" and not facts.local_cfg:
            return None, f"{_LOCAL} is not a local variable of {facts.owner}"
        if orders != {"uncond_cond"}:
            return None, f"the prediction is split {sorted(orders) or 'nowhere'}, not uncond first only"
        if not any(order == "uncond_cond" and t == wanted for order, t in facts.splits):
            return None, f"no uncond-first split under {wanted}"
        return _cfg_off(facts.defaults, "guidance_scale"), ""
    if name == "cond_uncond":
        test, why = _one_call(facts, main, sample_arg)
        if why:
            return None, why
        if orders != {"cond_uncond"}:
            return None, f"the prediction is split {sorted(orders) or 'nowhere'}, not cond first only"
        if "class_labels" not in main[0].keywords:
            return None, "the denoiser is not called with class_labels"
        return _cfg_off(facts.defaults, "guidance_scale"), ""
    # separate
    if facts.doublings or facts.splits or facts.many_way:
        return None, "the loop doubles the sample or splits a prediction"
    if not main:
        return None, "no denoiser call"
    if any(_sample_grows(c, sample_arg) or c.output_selected for c in main):
        return None, "a denoiser call's sample is concatenated or repeated along the batch, or its output is sliced"
    if facts.contexts:
        if set(facts.contexts) - {"cond", "uncond"}:
            return None, f"cache contexts {sorted(set(facts.contexts))} besides cond / uncond"
        contexts = [c.context for c in main]
        if None in contexts:
            return None, "a denoiser call outside the cond / uncond cache contexts"
        if contexts.count("cond") != 1 or contexts.count("uncond") > 1:
            return None, "not one cond call (and at most one uncond call) per step"
        if "uncond" not in contexts:
            return {}, ""
        scale = next((s for s in ("true_cfg_scale", "guidance_scale") if s in facts.defaults), None)
        return _cfg_off(facts.defaults, scale), ""
    if len(main) != 1:
        return None, f"{len(main)} denoiser calls without cache contexts"
    if facts.cfg_words:
        return None, "a single denoiser call in a loop with classifier-free guidance (uncond / negative / cfg names)"
    return {}, ""


# class -> {(sample_arg, side_pass_arg): Detection}
_DETECTIONS: "weakref.WeakKeyDictionary[type, dict[tuple[str, str | None], Detection]]" = weakref.WeakKeyDictionary()


def detect_call_pattern(cls: type, architecture=None) -> Detection:
    """The built-in pattern whose markers the loop of pipeline class ``cls`` carries (module docstring), for a
    denoiser of registered ``architecture`` (its ``sample_arg`` and ``side_pass_arg``; None: ``hidden_states``
    / first positional argument, no side passes). Cached per class and architecture."""
    sample_arg = getattr(architecture, "sample_arg", "hidden_states")
    side_pass_arg = getattr(architecture, "side_pass_arg", None)
    key = (sample_arg, side_pass_arg)
    try:
        cached = _DETECTIONS.setdefault(cls, {})
    except TypeError:
        cached = {}
    if key in cached:
        return cached[key]
    facts = loop_facts(cls)
    if facts.error is not None:
        detection = Detection(None, (), facts.error)
    else:
        main = [c for c in facts.calls if side_pass_arg is None or side_pass_arg not in c.keywords]
        found, reasons = {}, []
        for name in PATTERN_NAMES:
            cfg_off, why = _match(name, facts, main, sample_arg)
            if cfg_off is None:
                reasons.append(f"not {name}: {why}")
            else:
                found[name] = cfg_off
        if len(found) == 1:
            (name, cfg_off), = found.items()
            builtin = CALL_PATTERNS[name]
            pattern = builtin if dict(builtin.cfg_off) == cfg_off else CallPattern(name, cfg_off)
            detection = Detection(pattern, (name,), f"{facts.owner} follows {name!r}")
        elif found:
            detection = Detection(None, tuple(found), f"{facts.owner} matches several patterns {sorted(found)}")
        else:
            detection = Detection(None, (), f"{facts.owner} matches none ({'; '.join(reasons)})")
    cached[key] = detection
    return detection
