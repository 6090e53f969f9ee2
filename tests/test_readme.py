"""The README's examples run as written."""
import os
import re

import pytest

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def examples():
    with open(README) as f:
        text = f.read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("code", examples(), ids=lambda c: c.strip().splitlines()[0][:40])
def test_readme_example_runs(code):
    if "import torch" in code:
        pytest.importorskip("torch")
    if "fastattn.dask" in code:
        pytest.importorskip("dask.array", reason="needs dask (pip install 'fastattn[dask]')")
    exec(compile(code, "README.md", "exec"), {})


def test_readme_has_examples():
    assert len(examples()) >= 3
