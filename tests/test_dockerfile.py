"""Static checks of the Dockerfile, .dockerignore, requirements.txt and setup.py (Docker cannot run here).

The Dockerfile is parsed into instructions (comments and line continuations handled like Docker does),
and every RUN is split into shell commands with shlex, so a word that only appears in a comment
never satisfies a check. The requirement filter the image applies is executed for real on
requirements.txt to see exactly which lines it drops.
"""
from __future__ import annotations

import ast
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
REQUIREMENTS = REPO / "requirements.txt"

# What nvcr.io/nvidia/pytorch ships, built together, and the image therefore must not reinstall.
def _shipped_by_base_image(name: str) -> bool:
    return name in ("torch", "torchvision", "numpy", "pillow") or name.startswith("nvidia-dali")


# ------------------------------------------------------------------------------------------ parsing
def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)] with continuations joined and comment lines dropped."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # Docker drops comment lines inside a continued instruction
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        instr, _, args = buf.strip().partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a continued line"
    return out


def shell_commands(script: str) -> list[dict]:
    """Split a RUN script into simple commands: {'argv': [...], 'stdout': file or None}."""
    lex = shlex.shlex(script, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    cmds, argv, stdout, expect_redirect = [], [], None, False
    for tok in list(lex) + [";"]:
        if tok in ("&&", "||", ";", "|", "&"):
            if argv:
                cmds.append({"argv": argv, "stdout": stdout})
            argv, stdout = [], None
        elif tok in (">", ">>"):
            expect_redirect = True
        elif expect_redirect:
            stdout, expect_redirect = tok, False
        else:
            argv.append(tok)
    return cmds


def pip_install_args(argv: list[str]) -> list[str] | None:
    """The arguments after `install` if argv is a pip install (pip, pip3, python -m pip), else None."""
    a = list(argv)
    while a and "=" in a[0] and not a[0].startswith("-"):  # VAR=value prefix
        a.pop(0)
    if a and re.fullmatch(r"python[0-9.]*", Path(a[0]).name) and a[1:3] == ["-m", "pip"]:
        a = ["pip"] + a[3:]
    if a and re.fullmatch(r"pip[0-9.]*", Path(a[0]).name) and len(a) > 1 and a[1] == "install":
        return a[2:]
    return None


PIP_OPTS_WITH_VALUE = {"-r", "--requirement", "-c", "--constraint", "-i", "--index-url",
                       "--extra-index-url", "-f", "--find-links", "-t", "--target", "--prefix", "--root"}


def split_pip_args(args: list[str]) -> tuple[list[str], list[str], set[str]]:
    """(requirement files, positional targets, flags)."""
    req_files, targets, flags = [], [], set()
    it = iter(args)
    for a in it:
        if a in PIP_OPTS_WITH_VALUE:
            val = next(it)
            if a in ("-r", "--requirement"):
                req_files.append(val)
        elif a.startswith("--requirement=") or (a.startswith("-r") and len(a) > 2):
            req_files.append(a.split("=", 1)[1] if a.startswith("--") else a[2:])
        elif a.startswith("-"):
            flags.add(a.split("=", 1)[0])
        else:
            targets.append(a)
    return req_files, targets, flags


def requirement_lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def requirements() -> dict[str, Requirement]:
    reqs = [Requirement(ln) for ln in requirement_lines(REQUIREMENTS.read_text())]
    return {canonicalize_name(r.name): r for r in reqs}


def setup_kwargs() -> dict:
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            out = {}
            for kw in node.keywords:
                try:
                    out[kw.arg] = ast.literal_eval(kw.value)
                except ValueError:
                    pass
            return out
    raise AssertionError("no setup(...) call in setup.py")


@pytest.fixture(scope="module")
def instructions():
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def commands(instructions):
    cmds = []
    for instr, args in instructions:
        if instr == "RUN":
            assert not args.startswith("["), "use the shell form of RUN so it can be checked"
            cmds += shell_commands(args)
    return cmds


@pytest.fixture(scope="module")
def pip_installs(commands):
    out = [split_pip_args(a) for a in (pip_install_args(c["argv"]) for c in commands) if a is not None]
    assert out, "the Dockerfile runs no pip install"
    return out


def _filter_command(commands):
    """The command that reads requirements.txt and writes the filtered list (with its output file)."""
    found = [c for c in commands if c["argv"] and Path(c["argv"][0]).name == "grep"
             and "requirements.txt" in c["argv"]]
    assert len(found) == 1, f"expected one grep over requirements.txt, found {found}"
    return found[0]


def _run_filter(argv: list[str]) -> list[str]:
    """Run the image's grep on this repo's requirements.txt; kept requirement lines."""
    if shutil.which("grep"):
        res = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
        assert res.returncode in (0, 1), res.stderr
        return requirement_lines(res.stdout)
    # fallback: only `grep -vE PATTERN FILE` is understood
    opts = [a for a in argv[1:] if a.startswith("-")]
    pattern = [a for a in argv[1:] if not a.startswith("-")][0]
    assert set("".join(o[1:] for o in opts)) <= {"v", "E"}
    rx = re.compile(pattern)
    return [ln for ln in requirement_lines(REQUIREMENTS.read_text()) if not rx.search(ln)]


# ------------------------------------------------------------------------------------------ Dockerfile
def test_base_image_is_a_recent_ngc_pytorch(instructions):
    froms = [args for instr, args in instructions if instr == "FROM"]
    assert len(froms) == 1
    m = re.fullmatch(r"nvcr\.io/nvidia/pytorch:(\d\d)\.(\d\d)-py3", froms[0].split()[0])
    assert m, froms[0]
    assert (int(m.group(1)), int(m.group(2))) >= (25, 1)


def test_requirements_file_is_copied_from_the_build_context(instructions):
    """requirements.txt (this repo's, not another stage's) is in the image before the first RUN."""
    first_run = next(i for i, (instr, _) in enumerate(instructions) if instr == "RUN")
    copies = [(i, args.split()) for i, (instr, args) in enumerate(instructions[:first_run])
              if instr in ("COPY", "ADD")]
    assert any("requirements.txt" in argv[:-1] and not any(a.startswith("--from") for a in argv)
               for _, argv in copies), copies


def test_installs_the_filtered_requirements_file(commands, pip_installs):
    grep = _filter_command(commands)
    assert grep["stdout"], "the filtered requirements must be written to a file"
    installed_files = [f for files, _, _ in pip_installs for f in files]
    assert grep["stdout"] in installed_files, (grep["stdout"], installed_files)
    # no other requirements file: the pinned set is exactly requirements.txt's
    assert set(installed_files) <= {grep["stdout"], "requirements.txt"}


def test_filter_drops_exactly_what_the_base_image_ships(commands):
    argv = _filter_command(commands)["argv"]
    assert "-v" in argv or any(re.fullmatch(r"-[A-Za-z]*v[A-Za-z]*", a) for a in argv), argv
    all_lines = requirement_lines(REQUIREMENTS.read_text())
    kept = _run_filter(argv)
    dropped = {canonicalize_name(Requirement(ln).name) for ln in all_lines if ln not in kept}
    kept_names = {canonicalize_name(Requirement(ln).name) for ln in kept}
    assert dropped, "the filter drops nothing: torch would be reinstalled over the NGC build"
    assert all(_shipped_by_base_image(n) for n in dropped), f"filters out {dropped}"
    assert not any(_shipped_by_base_image(n) for n in kept_names), f"reinstalls {kept_names}"
    assert {"torch", "torchvision"} <= dropped
    assert any(n.startswith("nvidia-dali") for n in dropped)
    # and everything else in requirements.txt is kept
    assert kept_names | dropped == set(requirements())


def test_never_installs_apex_from_pypi(pip_installs, commands):
    for files, targets, _ in pip_installs:
        for t in targets:
            name = t if t.startswith((".", "/")) else Requirement(t).name
            assert canonicalize_name(name) != "apex", "PyPI `apex` is unrelated to NVIDIA apex"
    assert "apex" not in requirements()
    kept = _run_filter(_filter_command(commands)["argv"])
    assert all(canonicalize_name(Requirement(ln).name) != "apex" for ln in kept)


def test_does_not_reinstall_base_image_packages_by_name(pip_installs):
    for _, targets, _ in pip_installs:
        for t in targets:
            if not t.startswith((".", "/")):
                assert not _shipped_by_base_image(canonicalize_name(Requirement(t).name)), t


def test_installs_this_package_without_deps(pip_installs):
    own = [(targets, flags) for _, targets, flags in pip_installs if "." in targets]
    assert own, "pip install . is missing"
    assert all("--no-deps" in flags for _, flags in own)


def test_entrypoint_and_workdir(instructions):
    entry = [args for instr, args in instructions if instr == "ENTRYPOINT"]
    assert len(entry) == 1
    assert json.loads(entry[0]) == ["sslight"]
    workdirs = [args for instr, args in instructions if instr == "WORKDIR"]
    assert workdirs and workdirs[-1] == "/workspace"
    scripts = setup_kwargs()["entry_points"]["console_scripts"]
    assert any(s.replace(" ", "").startswith("sslight=") for s in scripts)


def test_run_example_in_comments():
    comments = "\n".join(ln for ln in DOCKERFILE.read_text().splitlines() if ln.lstrip().startswith("#"))
    assert "--gpus 'all,\"capabilities=compute,utility,video\"'" in comments
    assert "--ipc=host" in comments
    assert "-v /data/imagenet:/data" in comments
    assert "docker build" in comments


def test_dockerignore_excludes_local_state_but_not_sources():
    patterns = [ln.strip().lstrip("/") for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.strip().startswith("#")]

    def excluded(path: str) -> bool:
        hit = False
        for p in patterns:
            neg = p.startswith("!")
            p = p[1:] if neg else p
            parts = path.split("/")
            # a pattern excludes a path if it matches the path or one of its parent directories
            if any(fnmatch.fnmatchcase("/".join(parts[:i]), p) or
                   (p.startswith("**/") and fnmatch.fnmatchcase(parts[i - 1], p[3:]))
                   for i in range(1, len(parts) + 1)):
                hit = not neg
        return hit

    for path in (".venv/bin/python", "runs/x/ckpt.pt", "data/train/a.jpg", ".git/HEAD"):
        assert excluded(path), path
    for path in ("requirements.txt", "setup.py", "sslight_dali/config.py", "sslight_dali/data/sources.py",
                 "configs/dino/resnet18_sslight.yaml", "pipelines/cnn_sslight.yaml"):
        assert not excluded(path), path


# ------------------------------------------------------------------------------------------ pins
@pytest.mark.parametrize("prefix", ["torch", "torchvision", "nvidia-dali", "timm"])
def test_core_packages_pinned_exactly(prefix):
    reqs = requirements()
    names = [n for n in reqs if n == prefix or (prefix == "nvidia-dali" and n.startswith(prefix))]
    assert len(names) == 1, f"{prefix}: {names}"
    specs = list(reqs[names[0]].specifier)
    assert len(specs) == 1 and specs[0].operator == "==", f"{names[0]} must be pinned with ==: {specs}"
    Version(specs[0].version)  # a concrete version, no wildcard


def constraint_files(args: list[str]) -> list[str]:
    it = iter(args)
    return [next(it) if a in ("-c", "--constraint") else a.split("=", 1)[1]
            for a in it if a in ("-c", "--constraint") or a.startswith("--constraint=")]


def _venv_installs() -> list[list[str]]:
    """The arguments of each `$(PY) -m pip install` in the recipe that builds the venv."""
    recipe = [ln.strip() for ln in (REPO / "Makefile").read_text().splitlines()]
    installs = [pip_install_args(shlex.split(ln)[2:] if ln.startswith("$(PY) -m pip") else [])
                for ln in recipe]
    return [a for a in installs if a]


def test_makefile_installs_the_same_requirements_file():
    installs = _venv_installs()
    files = [f for a in installs for f in split_pip_args(a)[0]]
    assert files == ["requirements.txt"], installs
    # every install that resolves packages (all but this package's own --no-deps one) is constrained
    for a in installs:
        if "--no-deps" not in split_pip_args(a)[2]:
            assert constraint_files(a) == ["constraints.txt"], a


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for ln in requirement_lines(path.read_text()):
        r = Requirement(ln)
        specs = list(r.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{path.name}: {ln} is not an exact pin"
        pins[canonicalize_name(r.name)] = specs[0].version
    return pins


def test_requirements_and_constraints_agree_and_pin_exactly():
    reqs, cons = _pins(REQUIREMENTS), _pins(REPO / "constraints.txt")
    for name, version in reqs.items():
        assert cons.get(name) == version, f"{name}: requirements.txt {version}, constraints.txt {cons.get(name)}"
    assert "pip" in cons  # `make` upgrades pip to the pinned one, not to whatever is newest


def test_constraints_cover_every_package_the_requirements_pull_in():
    """Walk the installed dependency closure of requirements.txt (the environment running these tests,
    which `make test` built from the two files): every package in it is pinned, at the version here."""
    from importlib import metadata
    cons = _pins(REPO / "constraints.txt")
    seen, todo = set(), [(n, frozenset()) for n in _pins(REQUIREMENTS)]
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            pytest.skip(f"{name} is not installed here: run from the venv `make test` builds")
        assert cons.get(name) == dist.version, f"{name} {dist.version} is installed, constraints.txt pins {cons.get(name)}"
        for spec in dist.requires or []:
            r = Requirement(spec)
            if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in (extras or {""})):
                todo.append((canonicalize_name(r.name), frozenset(r.extras)))


def test_image_constrains_everything_but_what_the_base_image_builds(commands, pip_installs):
    grep = [c for c in commands if c["argv"] and Path(c["argv"][0]).name == "grep" and "constraints.txt" in c["argv"]]
    assert len(grep) == 1 and grep[0]["stdout"], grep
    installs = [a for a in (pip_install_args(c["argv"]) for c in commands) if a]
    req_install = [a for a in installs if _filter_command(commands)["stdout"] in split_pip_args(a)[0]]
    assert len(req_install) == 1 and constraint_files(req_install[0]) == [grep[0]["stdout"]], req_install
    from importlib import metadata
    cons = _pins(REPO / "constraints.txt")
    kept = {canonicalize_name(Requirement(ln).name) for ln in _run_filter(grep[0]["argv"])}
    dropped = set(cons) - kept
    # what torch and torchvision pull in (the base image's own builds of them), and the CUDA libraries
    closure, todo = set(), ["torch", "torchvision"]
    while todo:
        name = todo.pop()
        if name in closure:
            continue
        closure.add(name)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            pytest.skip(f"{name} is not installed here: run from the venv `make test` builds")
        todo += [canonicalize_name(r.name) for r in map(Requirement, requires)
                 if r.marker is None or r.marker.evaluate({"extra": ""})]
    built_with_torch = {n for n in cons if n in closure or n.startswith(("nvidia-", "cuda-"))}
    assert dropped == built_with_torch, sorted(dropped ^ built_with_torch)
    assert {"timm", "onnxruntime", "fvcore"} <= kept


def test_setup_py_names_the_same_packages_as_ranges():
    kw = setup_kwargs()
    install = [Requirement(s) for s in kw["install_requires"]]
    extras = [Requirement(s) for reqs in kw.get("extras_require", {}).values() for s in reqs]
    setup_names = {canonicalize_name(r.name) for r in install + extras}
    assert setup_names == set(requirements())
    pinned = requirements()
    for r in install:
        ops = {s.operator for s in r.specifier}
        assert ops and "==" not in ops and "===" not in ops, f"setup.py should give a range for {r}"
        pin = [s for s in pinned[canonicalize_name(r.name)].specifier if s.operator == "=="]
        if pin:  # the verified pin lies inside the advertised range
            assert r.specifier.contains(pin[0].version, prereleases=True), (str(r), pin[0].version)
