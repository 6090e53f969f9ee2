"""Without pytest-benchmark the suite is skipped with one hint, not an error per benchmark."""
import pytest


def pytest_collection_modifyitems(config, items):
    if not config.pluginmanager.hasplugin("benchmark"):
        skip = pytest.mark.skip(reason="the benchmark suite needs pytest-benchmark: pip install -e '.[bench]'")
        for item in items:
            item.add_marker(skip)
