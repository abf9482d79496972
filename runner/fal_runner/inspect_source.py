"""Reads the `@isolated(...)` arguments of one function from a Python file's syntax tree,
without running the file (`fal-operator function serve` embeds this script and runs it
with the local python3).

    python3 inspect_source.py FILE FUNCTION   → one JSON object on stdout, or exit 1 with
                                               the reason (and the line) on stderr

The arguments must be literals, or (for `requirements`) a module-level name bound to a
list literal. Both `from fal_serverless import isolated` and `import fal_serverless`
(`@fal_serverless.isolated(...)`) are recognised, with `as` renames.
"""

from __future__ import annotations

import ast
import json
import sys

# What the deploy flow uses; other known arguments of fal-serverless are accepted and
# reported as ignored.
USED = {"requirements", "machine_type", "keep_alive", "exposed_port", "min_concurrency",
        "max_concurrency", "python_version"}
KNOWN_IGNORED = {"kind", "serve", "setup_function", "_scheduler", "max_multiplexing"}
TYPES = {"requirements": list, "machine_type": str, "keep_alive": int, "exposed_port": int,
         "min_concurrency": int, "max_concurrency": int, "python_version": str}


class Refusal(Exception):
    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line


def decorator_names(tree: ast.Module) -> tuple[set[str], set[str]]:
    """Names `isolated` is known by, and names the module `fal_serverless` is known by."""
    funcs, modules = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "fal_serverless":
            for a in node.names:
                if a.name == "isolated":
                    funcs.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "fal_serverless":
                    modules.add(a.asname or a.name)
    return funcs, modules


def is_isolated(expr: ast.expr, funcs: set[str], modules: set[str]) -> bool:
    target = expr.func if isinstance(expr, ast.Call) else expr
    if isinstance(target, ast.Name):
        return target.id in funcs
    return (isinstance(target, ast.Attribute) and target.attr == "isolated"
            and isinstance(target.value, ast.Name) and target.value.id in modules)


def module_lists(tree: ast.Module) -> dict[str, ast.expr]:
    """Module-level `NAME = [...]` bindings (the last one wins, as at run time)."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            out[node.targets[0].id] = node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            out[node.target.id] = node.value
    return out


def literal(name: str, value: ast.expr, bindings: dict[str, ast.expr]):
    if name == "requirements" and isinstance(value, ast.Name):
        bound = bindings.get(value.id)
        if bound is None:
            raise Refusal(f"requirements={value.id}: {value.id!r} is not bound to a list at module level", value.lineno)
        value = bound
    try:
        v = ast.literal_eval(value)
    except ValueError:
        example = '["flask"]' if name == "requirements" else "8080"
        raise Refusal(f"{name}= is not a literal the deploy flow can read without running the file "
                      f"(write it out, e.g. {name}={example})", value.lineno) from None
    want = TYPES[name]
    if name == "requirements":
        if not isinstance(v, (list, tuple)) or not all(isinstance(r, str) for r in v):
            raise Refusal("requirements= must be a list of strings (pip requirement specifiers)", value.lineno)
        return list(v)
    if not isinstance(v, want) or isinstance(v, bool):
        raise Refusal(f"{name}= must be {'a string' if want is str else 'an integer'}, not {v!r}", value.lineno)
    return v


def inspect_source(text: str, function: str, filename: str = "<source>") -> dict:
    try:
        tree = ast.parse(text, filename=filename)
    except SyntaxError as e:
        raise Refusal(f"{filename} does not parse: {e.msg}", e.lineno) from None
    funcs, modules = decorator_names(tree)
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    if function not in defs:
        names = ", ".join(sorted(defs)) or "none"
        raise Refusal(f"no function {function!r} at the top level of {filename} (functions there: {names})")
    fn = defs[function]
    decorators = [d for d in fn.decorator_list if is_isolated(d, funcs, modules)]
    if not decorators:
        raise Refusal(f"{function!r} is not decorated with @isolated(...) from fal_serverless "
                      f"(add `from fal_serverless import isolated` and `@isolated(...)`)", fn.lineno)
    dec = decorators[0]
    bindings = module_lists(tree)
    args, ignored = {}, []
    if isinstance(dec, ast.Call):
        if dec.args:
            raise Refusal("@isolated takes keyword arguments only", dec.lineno)
        for kw in dec.keywords:
            if kw.arg is None:
                raise Refusal("@isolated(**options) cannot be read without running the file", dec.lineno)
            if kw.arg in USED:
                args[kw.arg] = literal(kw.arg, kw.value, bindings)
            elif kw.arg in KNOWN_IGNORED:
                ignored.append(kw.arg)
            else:
                raise Refusal(f"@isolated has no argument {kw.arg!r} (known: {', '.join(sorted(USED | KNOWN_IGNORED))})",
                              kw.value.lineno)
    return {"function": function, "line": fn.lineno, "ignored": ignored, **args}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: inspect FILE FUNCTION", file=sys.stderr)
        return 2
    path, function = argv
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        print(f"cannot read {path}: {e.strerror}", file=sys.stderr)
        return 1
    try:
        print(json.dumps(inspect_source(text, function, path)))
    except Refusal as e:
        where = f"{path}:{e.line}: " if e.line else ""
        print(f"{where}{e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
