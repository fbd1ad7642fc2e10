"""The dependency rule (tools/check_layers.py) holds: layers import downwards, targets stay apart."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def check_layers():
    """tools/check_layers.py as a module."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import check_layers
    finally:
        sys.path.pop(0)
    return check_layers


def test_dependency_rule_holds():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "check_layers.py")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
    assert "0 violation(s)" in proc.stderr


def test_checker_catches_an_upward_import(tmp_path, check_layers):
    assert check_layers.layer("optc.ir.core") == "ir"
    assert check_layers.layer("optc.passes") == "passes.infra"
    assert check_layers.layer("optc.passes.transforms.dce") == "passes"
    assert check_layers.layer("optc.backends.ort.lower_ort_int8") == "backends"
    assert check_layers.layer("optc.driver") == "driver"
    assert "backends" not in check_layers.ALLOWED["passes"]
    assert "frontends" not in check_layers.ALLOWED["passes"]
    assert "passes" not in check_layers.ALLOWED["frontends"]
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from optc.backends.ort import lower_ort_int8\n    from optc.passes.transforms.smoothquant import _x\n")
    found = check_layers.imports(bad, "optc.passes.transforms.bad", {"optc.backends.ort.lower_ort_int8"})
    assert (2, "optc.backends.ort.lower_ort_int8", None) in found
    assert (3, "optc.passes.transforms.smoothquant", "_x") in found
    assert check_layers.target("optc.backends.gguf.kquant") == "gguf"
    assert check_layers.target("optc.backends.base") is None


def test_every_pass_and_analysis_lives_in_a_file_named_like_it():
    import inspect

    from optc.passes import all_analyses, all_passes
    from optc.passes.infra.registry import plugin_origin

    containers = {"fixpoint"}  # pass-manager containers live with the pass manager
    misplaced = []
    for name, cls in [*all_passes().items(), *all_analyses().items()]:
        if name in containers or plugin_origin(name):
            continue
        path = Path(inspect.getsourcefile(cls))
        if path.stem != name.replace("-", "_"):
            misplaced.append(f"{name}: {path}")
    assert not misplaced


def test_checker_catches_private_names_and_private_modules(check_layers):
    where = Path("x.py")
    assert check_layers.private(where, 1, "optc.passes.transforms.awq", "optc.passes.transforms.smoothquant", "_x")
    assert not check_layers.private(where, 1, "optc.passes.transforms.awq", "optc.passes.transforms.smoothquant", "x")
    # a private module is shared inside its package, not outside it
    assert not check_layers.private(where, 1, "optc.passes.transforms.prune_heads", "optc.passes.transforms._structure", "f")
    assert check_layers.private(where, 1, "tools.bench_pruning", "optc.passes.transforms._structure", "f")
    assert check_layers.private(where, 1, "optc.passes.lowbit", "optc.passes.transforms._structure", None)


def test_checker_reads_private_attributes_of_imported_modules(tmp_path, check_layers):
    bad = tmp_path / "bad.py"
    bad.write_text("from optc.passes.transforms import rotate\nimport optc.ir.core as core\n"
                   "x = rotate._private(4)\ny = core._oir\nz = rotate.hadamard(4)\n")
    known = {"optc.passes.transforms.rotate", "optc.ir.core"}
    found = check_layers.attributes(bad, "tools.bad", known)
    assert (3, "optc.passes.transforms.rotate", "_private") in found and (4, "optc.ir.core", "_oir") in found
    assert [p for line, m, name in found for p in check_layers.private(bad, line, "tools.bad", m, name)] == [
        f"{bad}:3: tools.bad imports the private name _private of optc.passes.transforms.rotate",
        f"{bad}:4: tools.bad imports the private name _oir of optc.ir.core",
    ]
