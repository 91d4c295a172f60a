"""The README's library tour runs as written (so the front page cannot rot)."""

import re

import pytest
from conftest import REPO_ROOT


@pytest.mark.slow
def test_readme_tour_runs(capsys):
    readme = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"<!-- tour -->\n```python\n(.*?)```\n<!-- /tour -->", readme, re.S)
    assert block, "README.md lost its <!-- tour --> python block"
    exec(compile(block.group(1), "README.md:tour", "exec"), {})
    out = capsys.readouterr().out.split("\n")
    assert out[0] == "[4.0, 10.0, 6.0, 0.0]"
    assert out[1] == "True"
