"""The command line loads lazily: listing the subcommands imports none of them (nor torch or DALI)."""
import subprocess
import sys

CHILD = r"""
import sys
from sslight_dali.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = ("torch", "nvidia.dali", "sslight_dali.bench", "sslight_dali.viewer", "sslight_dali.demo", "sslight_dali.train")
print("LOADED", sorted(m for m in heavy if m in sys.modules))
"""


def _run(*argv: str) -> str:
    return subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, check=True).stdout


def test_help_imports_no_subcommand_module():
    out = _run("--help")
    assert "bench" in out and "views" in out and "demo" in out  # still listed
    assert out.strip().splitlines()[-1] == "LOADED []"


def test_a_subcommand_imports_its_own_module_only():
    out = _run("bench", "pipeline", "--help")
    assert "--profile-ops" in out  # the bench module's own flags
    assert out.strip().splitlines()[-1] == "LOADED ['sslight_dali.bench']"
