"""Shared fixtures for optc's tests.

Models: `mlp_proto`/`mlp` and friends build tiny random models from
`tests/fixtures/models.py` (protos, or optc IR models with the `_ir` fixtures).

Registry isolation: the pass registry is a module-level dict, so a test that
registers passes, analyses or pipelines must undo it, or `--list-passes`
output and name lookups change for every later test. Use the
`scratch_registry` fixture (function scope) or, for module-scoped setups and
hypothesis tests, the context manager of the same name:

    from tests.conftest import scratch_registry

    @pytest.fixture(scope="module")
    def my_passes():
        with scratch_registry():
            register_pass("test-foo")(Foo)
            yield

Everything registered inside the block is removed when it exits; built-in
passes are loaded before the snapshot so they survive it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from optc.passes.infra import registry
from tests.fixtures import models

_REGISTRY_TABLES = ("_passes", "_analyses", "_pipelines", "_plugin_origin")


@contextlib.contextmanager
def scratch_registry() -> Iterator[None]:
    """Undo every registration made inside the block (built-ins and plugins are kept)."""
    registry.load_builtins_and_plugins()
    saved = {table: dict(getattr(registry, table)) for table in _REGISTRY_TABLES}
    try:
        yield
    finally:
        for table, content in saved.items():
            live = getattr(registry, table)
            live.clear()
            live.update(content)


@pytest.fixture(name="scratch_registry")
def scratch_registry_fixture() -> Iterator[None]:
    """Register test passes freely in this test; they are removed afterwards."""
    with scratch_registry():
        yield


@pytest.fixture
def mlp_proto():
    return models.mlp()


@pytest.fixture
def mlp(mlp_proto):
    """The two-layer MLP as an optc IR model."""
    return models.to_ir(mlp_proto)


@pytest.fixture
def dead_nodes_ir():
    return models.to_ir(models.dead_nodes())


@pytest.fixture
def duplicated_ir():
    return models.to_ir(models.duplicated_subgraph())


@pytest.fixture
def constants_ir():
    return models.to_ir(models.constant_subgraph())


@pytest.fixture
def if_ir():
    return models.to_ir(models.if_model())


@pytest.fixture
def loop_ir():
    return models.to_ir(models.loop_model())


@pytest.fixture(params=models.BUILDERS)
def any_model_proto(request):
    """Each builder of tests/fixtures/models.py in turn (as a proto)."""
    return getattr(models, request.param)()
