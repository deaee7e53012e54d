"""Import layering of the package, from its source (ast): no import cycle, not even through imports
inside functions; the layers of the README's Architecture list (a module imports its own layer or
lower ones); a reason on every import inside a function; `import sslight_dali` and `sslight --help`
load no third-party module."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "sslight_dali"

# The README's Architecture list, lowest layer first. Units are top-level modules and subpackages
# (`data` stands for sslight_dali.data and everything in it).
LAYERS = [
    ["settings", "backbones", "data_formats", "files", "runtime", "checkpoint", "logger", "synth"],
    ["augment", "dali_ops"],
    ["config"],
    ["data"],
    ["methods", "models", "optim"],
    ["run_config", "knn", "pretrained", "run_policy"],
    ["loop", "train"],
    ["evaluate", "export", "onnx_export", "hub_export", "classifier", "embed", "bench", "demo", "viewer"],
    ["api", "cli"],
]

# Imports that still close a cycle, each owned by the helper who is removing it. The lead deletes an
# entry when that branch merges; an entry whose import is gone fails test_known_cycles_are_current.
KNOWN_CYCLES: set[tuple[str, str]] = set()

# The allowed reasons for an import inside a function, as the comment on its line (or on the line
# just above a run of such imports) starts: `# light: ...` or `# optional: ...`.
REASONS = {
    "light": "keeps `import sslight_dali`, `sslight --help` or `sslight COMMAND --help` from loading torch, "
             "DALI, matplotlib, tensorboard or another heavy module (the import runs when the command does)",
    "optional": "an optional dependency (DALI; onnx and onnxruntime; tensorboard, whose absence turns only "
                "TensorBoard off): the rest works without it",
}
REASON = re.compile(r"#\s*(" + "|".join(REASONS) + r"):\s*\S")

# Files whose imports inside functions do not say their reason yet, with the helper whose branch
# rewrites them. The lead deletes an entry when that branch merges (test_unreasoned_files_are_current
# fails on an entry with nothing left to reason).
NOT_YET_REASONED: dict[str, str] = {}


@dataclass(frozen=True)
class Import:
    importer: str      # dotted module name
    imported: str      # dotted name of a module of the package
    path: str          # the importer's file, relative to the repository
    line: int
    in_function: bool


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules(pkg: Path = PKG) -> dict[str, Path]:
    return {module_name(p): p for p in sorted(pkg.rglob("*.py"))}


def _targets(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules) -> list[str]:
    """The modules of the package an import statement loads: the named module, a submodule named in
    `from X import name`, and the packages above them (their __init__ runs first) that are not
    already above the importer."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = importer.split(".") if is_package else importer.split(".")[:-1]
        base = base[:len(base) - node.level + 1] if node.level else []
        target = ".".join(base + ([node.module] if node.module else []))
        names = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]
    out = []
    for name in names:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            prefix = ".".join(parts[:k])
            above_importer = importer == prefix or importer.startswith(prefix + ".")
            if prefix in modules and (k == len(parts) or not above_importer):
                out.append(prefix)
    return out


def _function_nodes(tree: ast.Module) -> set[int]:
    """ids of the import statements inside a function (at any depth)."""
    inside = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside |= {id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return inside


def imports(pkg: Path = PKG) -> list[Import]:
    """Every import of a package module by a package module, function-level ones included."""
    modules = all_modules(pkg)
    out = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        inside = _function_nodes(tree)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(node, name, path.name == "__init__.py", modules):
                    if target != name:
                        out.append(Import(name, target, str(path.relative_to(pkg.parent)), node.lineno,
                                          id(node) in inside))
    return out


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def graph(found: list[Import], skip=frozenset()) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for i in found:
        if (i.importer, i.imported) not in skip:
            edges.setdefault(i.importer, set()).add(i.imported)
    return edges


def unit(module: str) -> str:
    """The layer unit of a module: sslight_dali.data.loader -> data."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_violations(found: list[Import], layers=LAYERS, skip=frozenset()) -> list[str]:
    level = {u: k for k, layer in enumerate(layers) for u in layer}
    bad = []
    for i in found:
        a, b = unit(i.importer), unit(i.imported)
        if a and b and a != b and (i.importer, i.imported) not in skip and level[a] < level[b]:
            bad.append(f"{i.path}:{i.line}: {a} (layer {level[a] + 1}) imports {i.imported} (layer {level[b] + 1})")
    return bad


def unreasoned(pkg: Path = PKG) -> dict[str, list[str]]:
    """{file: ['line: statement']} of the imports inside functions without a reason comment, and of
    any standard-library import inside a function (nothing to keep light there)."""
    out: dict[str, list[str]] = {}
    for path in sorted(pkg.rglob("*.py")):
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        inside = _function_nodes(tree)
        nodes = sorted((n for n in ast.walk(tree) if id(n) in inside), key=lambda n: n.lineno)
        starts = {n.lineno for n in nodes}
        for n in nodes:
            first = n.lineno
            while first - 1 in starts or _continues(lines, first) or (
                    first - 2 in starts and not lines[first - 2].strip()):
                first -= 1  # a run of imports (blank lines between groups) shares one reason
            reason = (REASON.search(lines[n.lineno - 1]) or REASON.search(lines[first - 1])
                      or REASON.match(lines[first - 2].strip()))
            top = (n.names[0].name if isinstance(n, ast.Import) else n.module or "").split(".")[0]
            stdlib = n.__class__ is ast.Import or n.level == 0
            if not reason or (stdlib and top in sys.stdlib_module_names):
                out.setdefault(str(path.relative_to(pkg.parent)), []).append(
                    f"{n.lineno}: {lines[n.lineno - 1].strip()}")
    return out


def _continues(lines: list[str], lineno: int) -> bool:
    """Whether the line above `lineno` is the tail of a multi-line import in the same run."""
    above = lines[lineno - 2].strip() if lineno >= 2 else ""
    return above.endswith(")") and "import" not in above and not above.startswith("#")


# --- the package ------------------------------------------------------------------------------
def test_no_import_cycle():
    found = imports()
    cycle = find_cycle(graph(found, skip=KNOWN_CYCLES))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_known_cycles_are_current():
    found = {(i.importer, i.imported) for i in imports()}
    gone = sorted(KNOWN_CYCLES - found)
    assert not gone, f"no longer imported, remove from KNOWN_CYCLES: {gone}"
    for edge in KNOWN_CYCLES:
        assert find_cycle(graph(imports(), skip=KNOWN_CYCLES - {edge})), f"{edge} closes no cycle now"


def test_layers_of_the_architecture_list():
    units = {unit(m) for m in all_modules()} - {""}
    listed = [u for layer in LAYERS for u in layer]
    assert sorted(listed) == sorted(units), f"not in LAYERS: {sorted(units - set(listed))}; " \
                                            f"not a module: {sorted(set(listed) - units)}"
    bad = layer_violations(imports(), skip=KNOWN_CYCLES)
    assert not bad, "a lower layer imports a higher one:\n" + "\n".join(bad)


def test_readme_architecture_list_is_the_layers():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    items = re.findall(r"^(\d+)\. (.*(?:\n(?!\d+\. |\n).*)*)", section, re.M)
    assert [int(n) for n, _ in items] == list(range(1, len(LAYERS) + 1))
    for (n, item), layer in zip(items, LAYERS):
        named = set(re.findall(r"`([\w/]+?)(?:\.py|/)[^`]*`", item))
        assert set(layer) <= named, f"README Architecture item {n} should name {sorted(set(layer) - named)}"


def test_imports_inside_functions_say_why():
    bad = {f: v for f, v in unreasoned().items() if f not in NOT_YET_REASONED}
    assert not bad, ("imports inside functions need a reason comment (# light: ... or # optional: ...; "
                     f"{REASONS}) and no standard-library module: {bad}")


def test_unreasoned_files_are_current():
    done = sorted(set(NOT_YET_REASONED) - set(unreasoned()))
    assert not done, f"every import inside a function there has its reason, remove from NOT_YET_REASONED: {done}"


HEAVY_CHILD = r"""
import sys
before = set(sys.modules)
{code}
new = sorted(m for m in set(sys.modules) - before if m.split(".")[0] not in sys.stdlib_module_names)
print(new)
"""


@pytest.mark.parametrize("code, allowed", [
    ("import sslight_dali", ["sslight_dali"]),
    ("from sslight_dali.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
     ["sslight_dali", "sslight_dali.api", "sslight_dali.backbones", "sslight_dali.cli"]),  # plain data and stdlib

])
def test_package_and_help_are_light(code, allowed):
    out = subprocess.run([sys.executable, "-c", HEAVY_CHILD.format(code=code)], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    assert out.strip().splitlines()[-1] == str(allowed)



@pytest.mark.parametrize("command", [["views"], ["demo"], ["bench"], ["bench", "train"], ["train"], ["eval", "linear"],
                                     ["export"], ["embed"]])
def test_each_command_help_loads_no_torch(command):
    code = f"from sslight_dali.cli import main\ntry:\n    main({command + ['--help']!r})\nexcept SystemExit:\n    pass"
    out = subprocess.run([sys.executable, "-c", HEAVY_CHILD.format(code=code)], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    heavy = [m for m in eval(out.strip().splitlines()[-1]) if m.split(".")[0] in ("torch", "nvidia", "timm", "torchvision")]
    assert not heavy, f"sslight {' '.join(command)} --help imports {heavy[:5]}"

# --- the checks catch what they are for --------------------------------------------------------
def _package(tmp_path: Path, monkeypatch, files: dict[str, str]) -> Path:
    """A package sslight_dali of `files` under tmp_path, which becomes ROOT."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    for name, text in {"__init__.py": "", **files}.items():
        p = tmp_path / "sslight_dali" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path / "sslight_dali"


def test_a_cycle_through_a_function_level_import_is_found(tmp_path, monkeypatch):
    pkg = _package(tmp_path, monkeypatch, {
        "augment.py": "def f():\n    from .data import dali_views  # optional: DALI\n",
        "data/__init__.py": "from .build import x\n",
        "data/build.py": "from ..config import y\nx = 1\n",
        "data/dali_views.py": "",
        "config.py": "from .augment import f\ny = 2\n",
    })
    cycle = find_cycle(graph(imports(pkg)))
    # augment -> data.dali_views runs data/__init__ first, which imports build -> config -> augment
    assert cycle == ["sslight_dali.augment", "sslight_dali.data", "sslight_dali.data.build",
                     "sslight_dali.config", "sslight_dali.augment"]
    assert unreasoned(pkg) == {}


def test_a_layer_violation_and_an_unreasoned_import_are_found(tmp_path, monkeypatch):
    pkg = _package(tmp_path, monkeypatch, {
        "config.py": "def f():\n    from .train import t\n    import json  # light: cheap\n",
        "train.py": "from .config import f\n\n\ndef g():\n    # light: torch\n    import torch\n    from . import config\n",
    })
    found = imports(pkg)
    assert find_cycle(graph(found)) == ["sslight_dali.config", "sslight_dali.train", "sslight_dali.config"]
    assert layer_violations(found, [["config"], ["train"]]) == [
        "sslight_dali/config.py:2: config (layer 1) imports sslight_dali.train (layer 2)"]
    assert unreasoned(pkg) == {"sslight_dali/config.py": ["2: from .train import t",
                                                         "3: import json  # light: cheap"]}
