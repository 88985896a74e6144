"""The README's Python examples run as written and print what their comments say."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_examples_run_and_print_what_they_claim(capsys):
    """Blocks run in order in one namespace (later ones build on the quickstart); the HF one needs a
    transformers config and is covered by test_hf_reference.py."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    runnable = [block for block in blocks if "hf_config" not in block]
    assert len(runnable) >= 2
    namespace: dict = {}
    for index, block in enumerate(runnable):
        exec(compile(block, f"README-block-{index}", "exec"), namespace)
        claimed = re.search(r"print\(.*\)\s+# (.*)", block).group(1)
        assert capsys.readouterr().out.split() == claimed.split(), block
