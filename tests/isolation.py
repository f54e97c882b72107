"""Import a module in a fresh interpreter and see what it loaded, or that it needs nothing it
must not: a meta-path finder refuses the named top-level packages."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_SCRIPT = """
import importlib, json, sys
refused = set(json.loads(sys.argv[2]))

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in refused:
            raise ImportError(f"refused in this test: {name}")
        return None

sys.meta_path.insert(0, Refuse())
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(sys.modules)))
"""


def import_alone(module: str, refuse: Iterable[str] = ()) -> list[str]:
    """The modules loaded by importing ``module`` alone, with ``refuse`` (top-level package
    names) made unimportable; AssertionError with the child's stderr if the import failed."""
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, module, json.dumps(sorted(refuse))],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded: list[str] = json.loads(proc.stdout)
    return loaded
