"""Fixtures for the command-line tests (the helpers themselves are in cli_support.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.cli_support import (
    EXAMPLE_PLUGIN,
    FAILING_PASSES,
    install_module_plugin,
    install_plugin,
)


@pytest.fixture(scope="session")
def example_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/plugins/optc-example-plugin, pip-installed into a folder to put on PYTHONPATH."""
    target = tmp_path_factory.mktemp("example-plugin-site")
    install_plugin(EXAMPLE_PLUGIN, target, tmp_path_factory.mktemp("example-plugin-build"))
    return target


@pytest.fixture(scope="session")
def failing_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plugin of passes that fail on purpose, installed into a folder to put on PYTHONPATH."""
    site = tmp_path_factory.mktemp("failing-plugin-site")
    return install_module_plugin(site, "failing", "optc_failing_passes", FAILING_PASSES)
