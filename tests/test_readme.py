"""The README's quickstart runs as written and prints what its comment says."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs_and_prints_what_it_claims(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    quickstart = next(block for block in blocks if "new_cache" in block)
    exec(compile(quickstart, "README-quickstart", "exec"), {})
    claimed = re.search(r"print\(.*\)\s+# (.*)", quickstart).group(1)
    assert capsys.readouterr().out.split() == claimed.split()
