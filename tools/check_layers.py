"""Check optc's dependency rule: layers import only downwards, targets stay apart, no private names.

    python tools/check_layers.py        # prints each violation; exit 1 when there is one

The layers, lowest first (a layer may import itself and any layer below it):

    base               leaf modules of the stdlib only: optc.errors (exception types), optc.memory
                       (sizes, the machine's memory), optc.files (what kind of file a path is)
    optc.ir            the graph IR, verifier, printer, ONNX I/O
    optc.architectures the architecture registry: one module per model family (data; imports base and ir)
    optc.runtime       running the IR (onnxruntime, torch) and feeding it data (calibration, text, tokenizers)
    optc.frontends     model files into the IR            (never passes or backends)
    optc.passes.infra  Pass, PassManager, analyses, registry, pipeline text (no concrete pass)
    optc.passes        the generic passes and analyses    (never frontends, backends or the driver)
    optc.backends      one package per target; a target imports no other target (`base` is shared)
    optc               the driver: cli, api, driver, report, evaluate

`frontends` and `passes` are siblings: neither imports the other. Every import counts, those inside
functions included, so a cycle cannot hide behind a late import. A module never imports another
module's private name (`_name`, imported or read as `module._name`), nor a private module (`_module`) from outside its package; the
scripts in tools/ are held to that rule too. The registry finds the built-in passes by module name (as it finds
plugins by entry point); that is not an import and is not checked here.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent

#: layer -> the layers it may import (itself included)
ALLOWED: dict[str, set[str]] = {
    "base": {"base"},
    "ir": {"base", "ir"},
    "architectures": {"base", "ir", "architectures"},
    "runtime": {"base", "ir", "architectures", "runtime"},
    "frontends": {"base", "ir", "architectures", "runtime", "frontends"},
    "passes.infra": {"base", "ir", "architectures", "runtime", "passes.infra"},
    "passes": {"base", "ir", "architectures", "runtime", "passes.infra", "passes"},
    "backends": {"base", "ir", "architectures", "runtime", "passes.infra", "passes", "backends"},
    "driver": {"base", "ir", "architectures", "runtime", "frontends", "passes.infra", "passes", "backends", "driver"},
}
#: The base layer: modules that import nothing but the standard library (and each other).
BASE = {"optc.errors", "optc.memory", "optc.files"}


def package_dirs() -> dict[str, Path]:
    """The `optc` packages and the folders they live in (pyproject's package-dir)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {name: ROOT / folder for name, folder in config["tool"]["setuptools"]["package-dir"].items()}


def modules() -> dict[str, Path]:
    """Every module of optc, by dotted name."""
    found: dict[str, Path] = {}
    dirs = package_dirs()
    for package, folder in dirs.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if any(p in dirs.values() for p in path.parents if p != folder and p.is_relative_to(folder)):
                continue
            name = ".".join((package, *parts))
            name = name.removesuffix(".__init__")
            # a folder mapped to its own package (optc.ir under optc/) is listed once, by its mapping
            if not any(name.startswith(other + ".") or name == other for other in dirs if other != package
                       and other.startswith(package + ".")):
                found[name] = path
    return found


def layer(module: str) -> str:
    if module in BASE:
        return "base"
    for prefix in ("ir", "architectures", "runtime", "frontends", "passes.infra", "backends"):
        if module == f"optc.{prefix}" or module.startswith(f"optc.{prefix}."):
            return prefix
    if module == "optc.passes":
        return "passes.infra"  # the package only re-exports the infrastructure
    if module.startswith("optc.passes."):
        return "passes"
    return "driver"


def target(module: str) -> str | None:
    """The target package a backend module belongs to (None for the shared `base`)."""
    parts = module.split(".")
    if len(parts) >= 3 and parts[1] == "backends" and parts[2] != "base":
        return parts[2]
    return None


def imports(path: Path, module: str, known: set[str]) -> list[tuple[int, str, str | None]]:
    """(line, imported module, imported name or None) for every optc import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    return [found for node in ast.walk(tree) for found in imports_of(node, path, module, known)]


def imports_of(node: ast.AST, path: Path, module: str, known: set[str]) -> list[tuple[int, str, str | None]]:
    """The optc imports of one statement (none when it is not an import)."""
    if isinstance(node, ast.Import):
        return [(node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] == "optc"]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        anchor = package.split(".")
        anchor = anchor[: len(anchor) - node.level + 1]
        base = ".".join([*anchor, base] if base else anchor)
    if base.split(".")[0] != "optc":
        return []
    found = []
    for alias in node.names:
        child = f"{base}.{alias.name}"
        found.append((node.lineno, child, None) if child in known else (node.lineno, base, alias.name))
    return found


def violations() -> list[str]:
    found = modules()
    known = set(found)
    problems = []
    for module, path in sorted(found.items()):
        where = path.relative_to(ROOT)
        for line, imported, name in imports(path, module, known):
            mine, theirs = layer(module), layer(imported)
            if theirs not in ALLOWED[mine]:
                problems.append(f"{where}:{line}: {module} ({mine}) imports {imported} ({theirs})")
            elif target(module) and target(imported) and target(module) != target(imported):
                problems.append(f"{where}:{line}: target {target(module)} imports target {target(imported)} ({imported})")
            problems += private(where, line, module, imported, name)
        for line, imported, name in attributes(path, module, known):
            problems += private(where, line, module, imported, name)
    for path in sorted((ROOT / "tools").glob("*.py")):
        module = f"tools.{path.stem}"
        where = path.relative_to(ROOT)
        for line, imported, name in [*imports(path, module, known), *attributes(path, module, known)]:
            problems += private(where, line, module, imported, name)
    return problems


def attributes(path: Path, module: str, known: set[str]) -> list[tuple[int, str, str]]:
    """(line, module, name) for every `alias.name` read where `alias` is an imported optc module."""
    aliases: dict[str, str] = {}
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update({a.asname: a.name for a in node.names if a.asname and a.name in known})
        elif isinstance(node, ast.ImportFrom):
            modules = {imported for _, imported, name in imports_of(node, path, module, known) if name is None}
            aliases.update({a.asname or a.name: m for a in node.names for m in modules if m.endswith("." + a.name)})
    return sorted((node.lineno, aliases[node.value.id], node.attr) for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases)


def private(where: Path, line: int, module: str, imported: str, name: str | None) -> list[str]:
    """The import's private name, if any: `name` of another module, or a `_module` outside its package."""
    if name and name.startswith("_") and not name.startswith("__") and imported != module:
        return [f"{where}:{line}: {module} imports the private name {name} of {imported}"]
    parts = imported.split(".")
    for i, part in enumerate(parts):
        package = ".".join(parts[:i])
        if part.startswith("_") and not part.startswith("__") and not module.startswith(package + "."):
            return [f"{where}:{line}: {module} imports {imported}, private to {package}"]
    return []


def main() -> int:
    problems = violations()
    for problem in problems:
        print(problem)
    print(f"check_layers: {len(modules())} modules, {len(problems)} violation(s)", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
