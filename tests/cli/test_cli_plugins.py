"""Installed plugins: tests/plugins/optc-example-plugin is pip-installed (offline) and used through `optc`.

The plugin registers `drop-identity` through the `optc.passes` entry-point
group; once installed it must be listed, with its origin, and run in pipelines.
"""

from __future__ import annotations

import importlib.metadata
import zipfile
from pathlib import Path

import onnx
import pytest

from tests.cli.cli_support import (
    EXAMPLE_PLUGIN,
    Job,
    assert_same_outputs,
    install_module_plugin,
    list_passes_entries,
    run_in_process,
    run_many,
    wheel_from_pyproject,
)
from tests.fixtures.mlp_file import build_model


@pytest.fixture(scope="module")
def broken_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An installed plugin whose module fails to import."""
    site = tmp_path_factory.mktemp("broken-plugin-site")
    return install_module_plugin(site, "broken", "optc_broken_plugin", 'raise ImportError("this plugin is broken")\n')


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, example_plugin: Path, broken_plugin: Path):
    jobs: dict[str, Job] = {}

    def job(name: str, *args: str, sites: tuple[Path, ...] = (example_plugin,)) -> None:
        folder = tmp_path_factory.mktemp(name)
        build_model(folder / "model.onnx")
        jobs[name] = Job(args, folder, sites)

    # Listed with a broken plugin beside it, which must only cost a warning.
    job("list", "--list-passes", sites=(broken_plugin, example_plugin))
    job("default", "model.onnx", "--passes=drop-identity,dce", "-o", "out.onnx", "--statistics", "--verify-each")
    job("rewire", "model.onnx", "--passes=drop-identity{keep=mid_identity graph-outputs=rewire}", "-o", "out.onnx", "--statistics")
    results = run_many(jobs)
    return {name: (results[name], jobs[name].cwd) for name in jobs}


def _identity_nodes(path: Path) -> list[str]:
    return [node.name for node in onnx.load(str(path)).graph.node if node.op_type == "Identity"]


def test_example_plugin_is_installed_with_its_entry_point(example_plugin: Path) -> None:
    (dist,) = importlib.metadata.distributions(path=[str(example_plugin)])
    assert dist.metadata["Name"] == "optc-example-plugin"
    (ep,) = dist.entry_points.select(group="optc.passes")
    assert (ep.name, ep.value) == ("drop-identity", "optc_example_plugin:DropIdentity")
    assert (example_plugin / "optc_example_plugin.py").is_file()


def test_the_fallback_wheel_declares_what_pyproject_declares(tmp_path: Path) -> None:
    """Where setuptools cannot build wheels, `install_plugin` pip-installs a wheel assembled from pyproject.toml."""
    pytest.importorskip("tomllib")
    wheel = wheel_from_pyproject(EXAMPLE_PLUGIN, tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(tmp_path / "site")
    (dist,) = importlib.metadata.distributions(path=[str(tmp_path / "site")])
    assert dist.metadata["Name"] == "optc-example-plugin"
    (ep,) = dist.entry_points.select(group="optc.passes")
    assert (ep.name, ep.value) == ("drop-identity", "optc_example_plugin:DropIdentity")
    assert (tmp_path / "site" / "optc_example_plugin.py").read_bytes() == (EXAMPLE_PLUGIN / "optc_example_plugin.py").read_bytes()


def test_list_passes_shows_the_plugin_and_its_origin(runs) -> None:
    run, _ = runs["list"]
    assert run.returncode == 0, run
    entries = list_passes_entries(run.stdout)
    line, *options = entries["drop-identity"]
    assert "Remove Identity nodes, wiring their consumers straight to their input." in line
    assert line.endswith("[plugin: optc-example-plugin]")
    assert options[0].startswith("graph-outputs=keep ") and "one of keep, rewire" in options[0]
    assert options[1].startswith('keep="" ') and "list of str" in options[1]
    for builtin in ("cse", "dce", "fold-constants", "topo-sort"):
        assert "[plugin" not in entries[builtin][0], builtin


def test_plugin_pass_runs_in_a_pipeline(runs) -> None:
    run, folder = runs["default"]
    assert run.returncode == 0, run
    assert "drop-identity: nodes 8 -> 6, identities-removed=2" in run.stderr
    # The Identity that makes the graph output stays by default (graph-outputs=keep).
    assert _identity_nodes(folder / "out.onnx") == ["out_identity"]
    assert_same_outputs(folder / "model.onnx", folder / "out.onnx")


def test_plugin_pass_options_change_what_it_does(runs) -> None:
    run, folder = runs["rewire"]
    assert run.returncode == 0, run
    # Options print canonically: declared order, whatever order they were given in.
    assert "drop-identity{graph-outputs=rewire keep=mid_identity}: nodes 8 -> 6, identities-removed=2" in run.stderr
    assert _identity_nodes(folder / "out.onnx") == ["mid_identity"]
    out = onnx.load(str(folder / "out.onnx")).graph
    assert [o.name for o in out.output] == ["y"]  # the output keeps its name
    assert_same_outputs(folder / "model.onnx", folder / "out.onnx")


def test_a_broken_plugin_costs_only_a_warning(runs) -> None:
    run, _ = runs["list"]
    assert run.returncode == 0, run
    assert run.stderr_lines == [
        "optc: warning: plugin 'broken' (optc_broken_plugin) failed to load: this plugin is broken"
    ], run


def test_without_the_plugin_its_pass_is_unknown(tmp_path: Path) -> None:
    installed = {ep.name for ep in importlib.metadata.entry_points(group="optc.passes")}
    if "drop-identity" in installed:
        pytest.skip("the example plugin is installed in this environment")
    build_model(tmp_path / "model.onnx")
    run = run_in_process(Job(["model.onnx", "--passes=drop-identity", "-o", "out.onnx"], tmp_path))
    assert run.returncode == 2, run
    assert run.stderr.startswith("optc: error: unknown pass 'drop-identity'"), run
