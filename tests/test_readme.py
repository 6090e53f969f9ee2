"""The examples of the README and of the documentation (docs/*.md) run as written."""
import glob
import os
import re

import pytest

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def examples():
    found = []
    for page in PAGES:
        with open(page) as f:
            for n, code in enumerate(re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)):
                found.append((f"{os.path.basename(page)}:{n}", code))
    return found


@pytest.mark.parametrize("code", [c for _, c in examples()], ids=[i for i, _ in examples()])
def test_example_runs(code):
    if "import torch" in code:
        pytest.importorskip("torch")
    if "fastattn.dask" in code:
        pytest.importorskip("dask.array", reason="needs dask (pip install 'fastattn[dask]')")
    if "fastattn.transformers" in code:
        pytest.importorskip("torch", reason="needs torch (pip install 'fastattn[transformers]')")
        pytest.importorskip("transformers", reason="needs transformers (pip install 'fastattn[transformers]')")
    exec(compile(code, "example", "exec"), {})


def test_pages_have_examples():
    assert len(examples()) >= 8
    with open(PAGES[0]) as f:
        assert "```python" in f.read()  # the README keeps one


def test_readme_links_resolve():
    with open(PAGES[0]) as f:
        links = re.findall(r"\]\((docs/[^)#]+)", f.read())
    assert links and all(os.path.exists(os.path.join(ROOT, link)) for link in links)
