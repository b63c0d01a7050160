"""The shapes world sits on top of the core: nothing outside ``lorakit/world/`` and the command layer
imports it (the world is a *user* of lorakit, like any other)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import lorakit

ROOT = Path(lorakit.__file__).parent
ALLOWED = ("world", "commands")  # folders under lorakit/ that may import lorakit.world


def world_imports(path: Path) -> list[str]:
    """'line: statement' for every import of lorakit.world in a module (top level or inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        if any(n == "lorakit.world" or n.startswith("lorakit.world.") for n in names):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            args = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            if any(a.startswith("lorakit.world") for a in args):
                found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_core_never_imports_the_world():
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ALLOWED:
            continue
        offenders += [f"lorakit/{rel.as_posix()}:{hit}" for hit in world_imports(path)]
    assert not offenders, "the core imports the shapes world:\n" + "\n".join(offenders)


def test_the_check_sees_every_form(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import lorakit.world.model\nfrom lorakit import world\nfrom lorakit.world import concept\n"
                      "def f():\n    from lorakit.world.tokenizer import build_vocab\n"
                      "import importlib\nimportlib.import_module('lorakit.world.quality')\n"
                      "from lorakit import vocab\nimport lorakit.worldly\n")
    assert [hit.split(":")[0] for hit in world_imports(module)] == ["1", "2", "3", "5", "7"]


def test_config_loads_without_torch():
    """`lorakit train --print-config` must stay fast: the config and the train command's own module import
    neither torch nor matplotlib (torch alone takes seconds)."""
    code = ("import sys, lorakit.config, lorakit.commands.train, lorakit.cli; "
            "print(sorted(m for m in ('torch', 'matplotlib', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT.parent).stdout
    assert out.strip() == "[]"
