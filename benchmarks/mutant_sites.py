"""Mutation sites of ``@triton.jit`` functions, found with :mod:`ast` and applied as text edits.

Python's mutation tools rewrite whole functions (through the AST or bytecode), which ``@triton.jit`` cannot
parse: it reads the function's source text. So a site here is a span of the file's text plus its replacement;
applying it changes only that span and leaves decorators, comments and layout as Triton's parser expects.

Operators (one site each): arithmetic and bit operators (``+``<->``-``, ``*``->``/``, ``/``->``*``, ``//``->``*``,
``%``->``//``, ``&``<->``|``, ``^``->``|``, ``>>``<->``<<``, augmented assignments too), comparisons (``<``<->``<=``,
``>``<->``>=``, ``==``<->``!=``), integer constants (c -> c + 1, 1 -> 0), float constants (c -> 2c, 0.0 -> 1.0),
``tl.where(c, a, b)`` -> ``tl.where(c, b, a)``, and ``mask=`` (with its ``other=``) dropped from ``tl.load`` /
``tl.store``. Never sites: anything inside a ``tl.debug_barrier`` call, annotations (``tl.constexpr``
positions), decorators, string constants.

GPU-only sites (listed apart, never sampled): see :data:`GPU_RULE`.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import math

# Values the interpreter runs with: the launchers pick DOT16 = 2 (16-bit dots emulated with fp32 dots) when
# interpreting, 1 (tensor cores) on a GPU; tiny_attention's _INTERP is True under the interpreter.
# The phased pixel head's BARRIER (grid barriers) is False there: programs run one after another.
INTERP_VALUES = {"DOT16": 2, "_INTERP": True, "BARRIER": False}
GPU_RULE = ("a branch is GPU-only when its `if` test, evaluated with the interpreter's values "
            "(DOT16 == 2, _INTERP true, BARRIER false; every other name unknown), is decided against that branch: "
            "the `else` of `if DOT16 == 2`, the body of `if DOT16 == 1`, `if not _INTERP` or `if BARRIER`")

_BINOPS = {ast.Add: ("+", "-"), ast.Sub: ("-", "+"), ast.Mult: ("*", "/"), ast.Div: ("/", "*"),
           ast.FloorDiv: ("//", "*"), ast.Mod: ("%", "//"), ast.BitAnd: ("&", "|"), ast.BitOr: ("|", "&"),
           ast.BitXor: ("^", "|"), ast.RShift: (">>", "<<"), ast.LShift: ("<<", ">>")}
_CMPOPS = {ast.Lt: ("<", "<="), ast.LtE: ("<=", "<"), ast.Gt: (">", ">="), ast.GtE: (">=", ">"),
           ast.Eq: ("==", "!="), ast.NotEq: ("!=", "==")}


@dataclasses.dataclass(frozen=True)
class Site:
    """One mutation: replace ``source[start:end]`` with ``replacement``."""

    file: str        # path relative to the repository root
    func: str        # the @triton.jit function it lives in
    line: int        # 1-based line of the span's start
    kind: str        # binop, augop, cmp, int, float, where, mask
    desc: str        # e.g. "+ -> -"
    start: int
    end: int
    replacement: str
    gpu_only: bool
    sid: str = ""    # stable id: file, function, hash of the line's text, operator, occurrence
    anchor: tuple = ()  # (start, end) of the operator token itself: the order of the sites in a file

    def apply(self, source: str) -> str:
        """The mutated source text."""
        return source[:self.start] + self.replacement + source[self.end:]

    def diff(self, source: str) -> str:
        """``line N: <original> -> <mutated>`` for the report (the span's lines, whitespace collapsed)."""
        a = source.rfind("\n", 0, self.start) + 1
        b = source.find("\n", self.end)
        b = len(source) if b < 0 else b
        old = " ".join(source[a:b].split())
        new = " ".join((source[a:self.start] + self.replacement + source[self.end:b]).split())
        return f"line {self.line}: {old}  ->  {new}"


def _known(node: ast.expr):
    """The test's truth value under INTERP_VALUES: True / False, or None where it depends on anything else."""
    if isinstance(node, ast.Name) and node.id in INTERP_VALUES:
        return bool(INTERP_VALUES[node.id])
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        v = _known(node.operand)
        return None if v is None else not v
    if (isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.left, ast.Name)
            and node.left.id in INTERP_VALUES and isinstance(node.comparators[0], ast.Constant)
            and isinstance(node.ops[0], (ast.Eq, ast.NotEq))):
        eq = INTERP_VALUES[node.left.id] == node.comparators[0].value
        return eq if isinstance(node.ops[0], ast.Eq) else not eq
    if isinstance(node, ast.BoolOp):
        vals = [_known(v) for v in node.values]
        if isinstance(node.op, ast.And):
            return False if False in vals else (True if all(v is True for v in vals) else None)
        return True if True in vals else (False if all(v is False for v in vals) else None)
    return None


def _is_jit(dec: ast.expr) -> bool:
    f = dec.func if isinstance(dec, ast.Call) else dec
    return isinstance(f, ast.Attribute) and f.attr == "jit" and isinstance(f.value, ast.Name) \
        and f.value.id == "triton"


def _is_tl_call(node: ast.AST, names: tuple) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in names \
        and isinstance(node.func.value, ast.Name) and node.func.value.id == "tl"


class _Finder:
    def __init__(self, source: str, rel: str, func: str):
        self.src, self.rel, self.func = source, rel, func
        lines = source.splitlines(keepends=True)
        self.lines = lines
        self.starts = [0]
        for ln in lines:
            self.starts.append(self.starts[-1] + len(ln))
        self.sites: list[Site] = []

    def pos(self, lineno: int, col: int) -> int:
        # ast columns are UTF-8 byte offsets; the text edits work on str indices
        line = self.lines[lineno - 1]
        return self.starts[lineno - 1] + len(line.encode()[:col].decode())

    def span(self, node: ast.AST) -> tuple:
        return self.pos(node.lineno, node.col_offset), self.pos(node.end_lineno, node.end_col_offset)

    def text(self, node: ast.AST) -> str:
        a, b = self.span(node)
        return self.src[a:b]

    def add(self, node: ast.AST, kind: str, desc: str, start: int, end: int, repl: str, gpu: bool,
            anchor: tuple = ()):
        self.sites.append(Site(self.rel, self.func, node.lineno, kind, desc, start, end, repl, gpu,
                               anchor=anchor or (start, end)))

    def token_in_gap(self, left: ast.AST, right: ast.AST, sym: str):
        # the operator token between two operands (parentheses, spaces and line breaks around it)
        a, b = self.span(left)[1], self.span(right)[0]
        gap = self.src[a:b]
        code = "".join(ch if ch not in "()\\" else " " for ch in gap)
        if "#" in code or code.split() != [sym]:
            return None
        i = gap.index(sym)
        return a + i, a + i + len(sym)

    def visit(self, node: ast.AST, gpu: bool):
        if _is_tl_call(node, ("debug_barrier",)):
            return
        if isinstance(node, ast.If):
            v = _known(node.test)
            self.visit(node.test, gpu)
            for s in node.body:
                self.visit(s, gpu or v is False)
            for s in node.orelse:
                self.visit(s, gpu or v is True)
            return
        if isinstance(node, ast.AnnAssign):  # the annotation is a constexpr marker, not code
            self.visit(node.target, gpu)
            if node.value is not None:
                self.visit(node.value, gpu)
            return
        self.sites_of(node, gpu)
        for child in ast.iter_child_nodes(node):
            self.visit(child, gpu)

    def sites_of(self, node: ast.AST, gpu: bool):
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            sym, new = _BINOPS[type(node.op)]
            at = self.token_in_gap(node.left, node.right, sym)
            if at and isinstance(node.op, (ast.BitAnd, ast.BitOr, ast.BitXor)):
                # &, ^, | bind differently: parenthesise both operands so the mutant keeps the tree's shape
                (a0, a1), (b0, b1) = self.span(node.left), self.span(node.right)
                repl = f"({self.src[a0:a1]}){self.src[a1:at[0]]}{new}{self.src[at[1]:b0]}({self.src[b0:b1]})"
                self.add(node, "binop", f"{sym} -> {new}", a0, b1, repl, gpu, anchor=at)
            elif at:
                self.add(node, "binop", f"{sym} -> {new}", *at, new, gpu)
        elif isinstance(node, ast.AugAssign) and type(node.op) in _BINOPS:
            sym, new = _BINOPS[type(node.op)]
            at = self.token_in_gap(node.target, node.value, sym + "=")
            if at:
                self.add(node, "augop", f"{sym}= -> {new}=", *at, new + "=", gpu)
        elif isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _CMPOPS:
            sym, new = _CMPOPS[type(node.ops[0])]
            at = self.token_in_gap(node.left, node.comparators[0], sym)
            if at:
                self.add(node, "cmp", f"{sym} -> {new}", *at, new, gpu)
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
            self.constant(node, gpu)
        elif _is_tl_call(node, ("where",)) and len(node.args) == 3 and not node.keywords:
            a, b = node.args[1], node.args[2]
            s0, s1 = self.span(a)[0], self.span(b)[1]
            repl = self.text(b) + self.src[self.span(a)[1]:self.span(b)[0]] + self.text(a)
            self.add(node, "where", "tl.where(c, a, b) -> tl.where(c, b, a)", s0, s1, repl, gpu)
        elif _is_tl_call(node, ("load", "store")) and any(k.arg == "mask" for k in node.keywords):
            parts = [self.text(a) for a in node.args]
            parts += [f"{k.arg}={self.text(k.value)}" for k in node.keywords if k.arg not in ("mask", "other")]
            repl = f"{self.text(node.func)}({', '.join(parts)})"
            dropped = "mask=, other=" if any(k.arg == "other" for k in node.keywords) else "mask="
            self.add(node, "mask", f"tl.{node.func.attr}: drop {dropped}", *self.span(node), repl, gpu)

    def constant(self, node: ast.Constant, gpu: bool):
        c, old = node.value, self.text(node)
        if isinstance(c, int):
            new = 0 if c == 1 else c + 1
            repl = hex(new) if old.lower().startswith("0x") else str(new)
        else:
            new = 1.0 if c == 0.0 else c * 2.0
            if not math.isfinite(new):  # FLT_MAX * 2: halve instead
                new = c / 2.0
            repl = repr(new)
        self.add(node, "int" if isinstance(c, int) else "float", f"{old} -> {repl}", *self.span(node), repl, gpu)


def _stable_ids(sites: list, source: str) -> list:
    # file : function : hash of the stripped line : operator : occurrence of that (line, operator) pair,
    # so an id survives edits elsewhere in the file (an EQUIVALENT entry stays attached to its site)
    lines = source.splitlines()
    seen: dict = {}
    out = []
    for s in sorted(sites, key=lambda s: (*s.anchor, s.kind)):
        h = hashlib.sha1(lines[s.line - 1].strip().encode()).hexdigest()[:8]
        key = (s.func, h, s.desc)
        n = seen.get(key, 0)
        seen[key] = n + 1
        out.append(dataclasses.replace(s, sid=f"{s.file}:{s.func}:{h}:{s.desc}:{n}"))
    return out


def find_sites(source: str, rel: str) -> list:
    """Every mutation site of the ``@triton.jit`` functions of one file (GPU-only ones flagged), in file order.
    Each mutant is valid Python by construction (checked when it runs: :func:`benchmarks.mutants.run_family`)."""
    tree = ast.parse(source)
    sites = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(_is_jit(d) for d in node.decorator_list):
            finder = _Finder(source, rel, node.name)
            for stmt in node.body:  # body only: decorators and argument annotations are not code
                finder.visit(stmt, False)
            sites.extend(finder.sites)
    return _stable_ids(sites, source)
