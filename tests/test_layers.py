"""The package's layers hold: every import of every .py file is read (module level and inside functions,
absolute and relative) and checked against the project's rules.

* core/, sampling/ and trainers/ never import ComfyUI, jobs/, nodes/ or worlds/.
* jobs/ never imports nodes/.
* comfy_backend.py (everything that knows ComfyUI's objects) imports ComfyUI only inside functions, and
  none of jobs/, nodes/, worlds/ or the top-level api / cli / demo; it imports in a process where comfy_api
  (and the rest of ComfyUI) cannot be imported.
* The top-level cli.py, demo.py and api.py, tests/ and benchmarks/ may import anything.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the package
PACKAGE = "comfyui_distillery"
NOT_PYTHON_SOURCE = {"web", "workflows"}  # the panel's JS and the workflow files

# ComfyUI's top-level modules and packages (a checkout's root is on sys.path inside ComfyUI)
COMFYUI = {"comfy", "comfy_api", "comfy_api_nodes", "comfy_config", "comfy_execution", "comfy_extras",
           "folder_paths", "server", "execution", "nodes", "node_helpers", "latent_preview", "comfyui_version",
           "cuda_malloc", "hook_breaker_ac10a0", "new_updater", "protocol", "main", "app", "api_server",
           "middleware", "alembic_db"}


def _inside(*parts: str) -> str:
    return ".".join((PACKAGE,) + parts)


# what the pure layers may not reach: the packages above them and the top-level modules that import those
BELOW_WORLDS = {"jobs", "nodes", "worlds", "api", "cli", "cli_train", "cli_sample", "demo", "comfy_backend"}

# layer (first path part, or a top-level module's file name) -> (forbidden internal modules, ComfyUI forbidden
# everywhere / only at module level / allowed)
RULES = {
    "core": (BELOW_WORLDS, "everywhere"),
    "sampling": (BELOW_WORLDS, "everywhere"),
    "trainers": (BELOW_WORLDS, "everywhere"),
    "jobs": ({"nodes"}, "allowed"),
    "comfy_backend.py": ({"jobs", "nodes", "worlds", "api", "cli", "demo"}, "module level"),
}

# Violations that exist on purpose for now, each with the reason. An entry that no longer matches fails the
# test, so the list only shrinks.
KNOWN: dict[tuple[str, str], str] = {}


def python_files(package_files: list[Path]) -> list[Path]:
    return [rel for rel in package_files if rel.parts[0] not in NOT_PYTHON_SOURCE]


def module_name(rel: Path) -> tuple[str, str]:
    """(the file's module, the package its relative imports start from)."""
    parts = [PACKAGE, *rel.with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


def imports(source: str, rel: Path) -> list[tuple[int, str, bool]]:
    """(line, imported module, inside a function) for every import of a file, relative ones resolved.

    `from X import a, b` yields X and X.a, X.b (a name may be a submodule: `from .. import nodes`);
    importlib.import_module("...") / __import__("...") with a literal name count too."""
    _, package = module_name(rel)
    found = []

    def visit(node, in_function: bool):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, in_function) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level - 1 >= len(base):
                    found.append((node.lineno, "." * node.level + (node.module or ""), in_function))
                    return
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.append((node.lineno, module, in_function))
            found.extend((node.lineno, f"{module}.{alias.name}", in_function) for alias in node.names
                         if alias.name != "*")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__"):
                target = node.args[0].value
                if target.startswith("."):  # import_module(".x", package): our own package
                    level = len(target) - len(target.lstrip("."))
                    base = package.split(".")[:len(package.split(".")) - (level - 1)]
                    target = ".".join(base + ([target.lstrip(".")] if target.lstrip(".") else []))
                found.append((node.lineno, target, in_function))
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(source, filename=str(rel)), False)
    return found


def layer_of(rel: Path) -> str | None:
    if len(rel.parts) == 1:
        return rel.name if rel.name in RULES else None
    return rel.parts[0] if rel.parts[0] in RULES else None


def violations(source: str, rel: Path) -> list[tuple[int, str, str]]:
    """(line, module, why) for each import of `rel` (a path relative to the repository root) that its layer
    forbids."""
    layer = layer_of(rel)
    if layer is None:
        return []
    internal, comfy_rule = RULES[layer]
    where = layer if layer.endswith(".py") else f"{layer}/"
    bad = []
    for line, module, in_function in imports(source, rel):
        if module.startswith("."):
            bad.append((line, module, "a relative import above the package"))
            continue
        parts = module.split(".")
        if parts[0] == PACKAGE and len(parts) > 1 and parts[1] in internal:
            target = parts[1] + ("/" if (ROOT / parts[1]).is_dir() else "")
            bad.append((line, module, f"{where} never imports {target}"))
        elif parts[0] in COMFYUI and comfy_rule == "everywhere":
            bad.append((line, module, f"{where} never imports ComfyUI"))
        elif parts[0] in COMFYUI and comfy_rule == "module level" and not in_function:
            bad.append((line, module, f"{where} imports ComfyUI only inside functions"))
    return bad


def all_violations(package_files: list[Path]) -> list[tuple[str, int, str, str]]:
    out = []
    for rel in python_files(package_files):
        source = (ROOT / rel).read_text(encoding="utf-8")
        out.extend((rel.as_posix(), line, module, why) for line, module, why in violations(source, rel))
    return out


def test_every_import_stays_in_its_layer(package_python_files):
    found = all_violations(package_python_files)
    unexpected = [v for v in found if (v[0], ".".join(v[2].split(".")[:2])) not in KNOWN]
    assert not unexpected, "imports that go up a layer:\n" + "\n".join(
        f"  {path}:{line}: {module} ({why})" for path, line, module, why in unexpected)
    stale = [key for key in KNOWN if not any((v[0], ".".join(v[2].split(".")[:2])) == key for v in found)]
    assert not stale, f"known violations that are gone: remove them from KNOWN: {stale}"


def test_every_python_file_is_read(package_python_files, python_files_under, tmp_path):
    files = {rel.as_posix() for rel in python_files(package_python_files)}
    for expected in ("comfy_backend.py", "api.py", "cli_train.py", "jobs/worker.py", "core/schedules.py",
                     "worlds/tasks.py", "tests/test_layers.py"):
        assert expected in files
    assert not any(f.startswith((".git/", "web/")) for f in files)
    # the README's install makes .venv in the checkout, CI .ci-venv; a venv may have any name
    for rel in ("core/a.py", ".venv/lib/b.py", "env/lib/c.py", "x.egg-info/d.py", "core/__pycache__/e.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    (tmp_path / "env" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    assert [p.as_posix() for p in python_files_under(tmp_path)] == ["core/a.py"]


@pytest.mark.parametrize("rel, source, expected", [
    ("trainers/engine.py", "from ..jobs import store\n", ["comfyui_distillery.jobs"]),
    ("trainers/engine.py", "def f():\n    from ..jobs.store import JobStore\n", ["comfyui_distillery.jobs.store"]),
    ("core/models.py", "import comfyui_distillery.nodes\n", ["comfyui_distillery.nodes"]),
    ("sampling/tcd.py", "from comfy import sd\n", ["comfy"]),
    ("sampling/tcd.py", "def f():\n    import folder_paths\n", ["folder_paths"]),
    ("trainers/methods/dmd2.py", "from ... import worlds\n", ["comfyui_distillery.worlds"]),
    ("trainers/methods/dmd2.py", "from ...worlds.gmm import GaussianMixture\n", ["comfyui_distillery.worlds.gmm"]),
    ("trainers/__init__.py", "from ..nodes import samplers\n", ["comfyui_distillery.nodes"]),
    ("trainers/engine.py", "import importlib\nimportlib.import_module('comfy_api.latest')\n", ["comfy_api.latest"]),
    ("trainers/engine.py", "def run():\n    from ..api import make_task\n", ["comfyui_distillery.api"]),
    ("jobs/worker.py", "from ..nodes.jobs import x\n", ["comfyui_distillery.nodes.jobs"]),
    ("comfy_backend.py", "import comfy_api\n", ["comfy_api"]),
    ("comfy_backend.py", "from .jobs import store\n", ["comfyui_distillery.jobs"]),
    # allowed
    ("comfy_backend.py", "def f():\n    import comfy.sd\n", []),
    ("jobs/worker.py", "def f():\n    import comfy.sd\n    from ..comfy_backend import checkpoint_task\n", []),
    ("cli_train.py", "def run():\n    from .api import make_task\n    from .worlds import gmm\n", []),
    ("nodes/jobs.py", "from ..jobs import store\nimport folder_paths\n", []),
    ("cli.py", "from .nodes import x\nimport comfy\n", []),
    ("sampling/tcd.py", "from ..core.schedules import NoiseSchedule\nimport torch\n", []),
])
def test_the_check_catches_upward_imports(rel, source, expected):
    found = violations(source, Path(rel))
    assert [module for _, module, _ in found][:len(expected)] == expected
    assert bool(found) == bool(expected)


def test_a_violation_names_file_and_line():
    found = violations("import torch\n\n\ndef f():\n    from ..jobs import store\n", Path("trainers/x.py"))
    assert [(line, why) for line, _, why in found][:1] == [(5, "trainers/ never imports jobs/")]


BLOCKED_IMPORT = textwrap.dedent("""
    import sys

    BLOCKED = set(sys.argv[1].split(","))

    class NoComfyUI:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked by the test: ComfyUI is not importable here")
            return None

    sys.meta_path.insert(0, NoComfyUI())
    import comfyui_distillery.comfy_backend as backend

    for name in backend.__all__:
        getattr(backend, name)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED or
                    m.startswith(("comfyui_distillery.nodes", "comfyui_distillery.jobs", "comfyui_distillery.worlds")))
    assert not leaked, leaked
    print("ok", len(backend.__all__))
""")


def test_comfy_backend_imports_without_comfyui():
    proc = subprocess.run([sys.executable, "-c", BLOCKED_IMPORT, ",".join(sorted(COMFYUI))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stdout + proc.stderr
