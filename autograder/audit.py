"""Static scan of answer cells for the ways a learner could fake a passing test.

The judge makes these tricks useless; the scan names them, so the instructor sees intent. Findings:

- ``high``: assigning to, or ``setattr``/``delattr`` on, an attribute of a module or of a class that a
  module defines (``torch.allclose = ...``, ``torch.Tensor.__eq__ = ...``, ``np.testing.assert_allclose
  = ...``); anything touching ``builtins``/``__builtins__``, ``sys.modules``, ``sys.meta_path``, import
  hooks; importing ``lora_ref``, ``autograder`` or ``nbgrader``; defining or assigning ``check``;
  strings naming the reference package or the instructor's files.
- ``medium``: ``importlib``, ``ctypes``, ``inspect``/``gc``/frame introspection (``sys._getframe``,
  ``f_globals``, ``__globals__``), ``unittest.mock``, ``exec``/``eval``/``compile``, ``os._exit``,
  ``signal``, ``atexit``, ``subprocess``/``os.system``, ``open`` for writing.

``setattr(self, ...)`` and assignments to attributes of ``self`` or of local objects are ordinary
nn.Module code and are not reported.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass

MODULE_ROOTS = {"torch", "nn", "F", "np", "numpy", "math", "builtins", "sys", "os", "importlib", "functools",
                "unittest", "pytest", "lora_ref", "safetensors", "inspect", "gc"}
BLOCKED_IMPORTS = {"lora_ref", "autograder", "nbgrader"}
MEDIUM_IMPORTS = {"importlib", "ctypes", "inspect", "gc", "unittest", "signal", "atexit", "subprocess", "sys",
                  "builtins", "os", "pickle", "marshal", "types"}
HIGH_ATTRS = {"modules", "meta_path", "path_hooks", "__builtins__", "__import__", "builtins"}
MEDIUM_ATTRS = {"_getframe", "currentframe", "f_globals", "f_back", "f_locals", "__globals__", "__code__",
                "get_objects", "get_referrers", "settrace", "setprofile", "_exit", "system", "patch"}
MEDIUM_CALLS = {"exec", "eval", "compile", "__import__", "globals", "breakpoint"}
SUSPICIOUS_TEXT = ("lora_ref", "solutions/", "BEGIN HIDDEN", "gradebook", "autograder")


@dataclass(frozen=True)
class Finding:
    cell: str
    line: int
    severity: str     # "high" | "medium"
    what: str
    code: str

    def __str__(self) -> str:
        return f"[{self.severity}] {self.cell}:{self.line}: {self.what}: {self.code}"


def _root(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _dotted(node: ast.AST) -> str:
    try:
        return ast.unparse(node)
    except Exception:  # noqa: BLE001
        return type(node).__name__


class _Scanner(ast.NodeVisitor):
    def __init__(self, cell: str, lines: list[str], modules: set[str]):
        self.cell, self.lines, self.modules, self.found = cell, lines, modules, []

    def add(self, node: ast.AST, severity: str, what: str) -> None:
        line = getattr(node, "lineno", 0)
        code = self.lines[line - 1].strip() if 0 < line <= len(self.lines) else ""
        self.found.append(Finding(self.cell, line, severity, what, code[:160]))

    def _target(self, target: ast.AST, node: ast.AST, verb: str) -> None:
        if isinstance(target, (ast.Tuple, ast.List)):
            for t in target.elts:
                self._target(t, node, verb)
        elif isinstance(target, ast.Attribute) and _root(target) in self.modules:
            self.add(node, "high", f"{verb} module attribute {_dotted(target)}")
        elif isinstance(target, ast.Name) and target.id in ("check", "__builtins__", "allclose", "assert_close"):
            self.add(node, "high", f"{verb} the name {target.id}")

    def visit_Assign(self, node):
        for t in node.targets:
            self._target(t, node, "assigns")
        self.generic_visit(node)

    def visit_AugAssign(self, node):
        self._target(node.target, node, "assigns")
        self.generic_visit(node)

    def visit_AnnAssign(self, node):
        self._target(node.target, node, "assigns")
        self.generic_visit(node)

    def visit_Delete(self, node):
        for t in node.targets:
            self._target(t, node, "deletes")
        self.generic_visit(node)

    def visit_FunctionDef(self, node):
        if node.name in ("check", "allclose", "assert_close", "compare"):
            self.add(node, "high", f"defines a function named {node.name}")
        self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def _import(self, node, name: str) -> None:
        top = name.split(".")[0]
        if top in BLOCKED_IMPORTS:
            self.add(node, "high", f"imports {name} (answer cells must not use the reference or the grader)")
        elif top in MEDIUM_IMPORTS or name.startswith("unittest.mock"):
            self.add(node, "medium", f"imports {name}")

    def visit_Import(self, node):
        for alias in node.names:
            self._import(node, alias.name)
            self.modules.add((alias.asname or alias.name).split(".")[0])
        self.generic_visit(node)

    def visit_ImportFrom(self, node):
        self._import(node, node.module or "")
        self.generic_visit(node)

    def visit_Call(self, node):
        fn = node.func
        name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
        if name in ("setattr", "delattr") and node.args:
            root = _root(node.args[0])
            if root in self.modules:
                self.add(node, "high", f"{name} on {_dotted(node.args[0])}")
        elif name in MEDIUM_CALLS and isinstance(fn, ast.Name):
            self.add(node, "medium", f"calls {name}()")
        elif name == "open" and any(isinstance(a, ast.Constant) and isinstance(a.value, str) and
                                    any(m in a.value for m in "wax+") for a in node.args[1:2]):
            self.add(node, "medium", "opens a file for writing")
        self.generic_visit(node)

    def visit_Attribute(self, node):
        if node.attr in HIGH_ATTRS and _root(node) in ("sys", "builtins", "__builtins__", "importlib"):
            self.add(node, "high", f"uses {_dotted(node)}")
        elif node.attr in MEDIUM_ATTRS:
            self.add(node, "medium", f"uses .{node.attr}")
        self.generic_visit(node)

    def visit_Name(self, node):
        if node.id in ("__builtins__", "__import__"):
            self.add(node, "high", f"uses {node.id}")
        self.generic_visit(node)

    def visit_Constant(self, node):
        if isinstance(node.value, str) and any(t in node.value for t in SUSPICIOUS_TEXT):
            self.add(node, "high", f"string mentions {next(t for t in SUSPICIOUS_TEXT if t in node.value)!r}")


def scan(cells: list[tuple[str, str]]) -> list[Finding]:
    """Scan answer cells ``[(grade_id, source), ...]``; modules imported in earlier cells count."""
    from IPython.core.inputtransformer2 import TransformerManager

    modules = set(MODULE_ROOTS)
    found: list[Finding] = []
    for grade_id, source in cells:
        try:
            code = TransformerManager().transform_cell(source)
            tree = ast.parse(code)
        except SyntaxError:
            continue   # the judge reports the syntax error; nothing to scan
        scanner = _Scanner(grade_id, code.splitlines(), modules)
        scanner.visit(tree)
        seen = set()
        for f in scanner.found:
            if (f.line, f.what) not in seen:
                seen.add((f.line, f.what))
                found.append(f)
    return found
