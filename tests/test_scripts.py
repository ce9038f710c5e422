"""Every file in scripts/ is a command: ``--help`` works without the optional packages, and a
missing one stops the script before any work with a line naming the extra that installs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eval.optional import EXTRAS

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(path.name for path in (ROOT / "scripts").glob("*.py"))

RUN_WITHOUT_OPTIONAL_PACKAGES = """
import contextlib, io, json, runpy, sys
for name in {blocked!r}:
    sys.modules[name] = None  # as if not installed: importing it raises ModuleNotFoundError
sys.path.insert(0, "scripts")  # as when a script runs: its folder first
results = {{}}
for script, args in {runs!r}:
    sys.argv = ["scripts/" + script, *args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path("scripts/" + script, run_name="__main__")
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else str(exit.code)
    results[script + " " + args[0]] = [code, out.getvalue(), err.getvalue()]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def without_optional_packages(tmp_path_factory) -> tuple[dict, Path]:
    """Every script with ``--help``, and some started for real, in one Python process in which the
    packages of :data:`eval.optional.EXTRAS` cannot be imported: ``({(script, first argument):
    [exit code or message, stdout, stderr]}, the folder the real runs were told to write to)``."""
    out = tmp_path_factory.mktemp("out")
    runs = [(script, ["--help"]) for script in SCRIPTS] + [
        ("bench_unet.py", ["--quick"]),
        ("bench_clustering.py", ["--quick"]),
        ("bench_gpu.py", ["--device", "cpu", "--quick", "--out", str(out / "b.md")]),
        ("fid_sweep.py", ["--preset", "smoke", "--output", str(out / "smoke")]),
    ]
    code = RUN_WITHOUT_OPTIONAL_PACKAGES.format(blocked=sorted(EXTRAS), runs=runs)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.splitlines()[-1])
    return {tuple(key.split(" ", 1)): result for key, result in results.items()}, out


def test_help_works_for_every_script_without_the_optional_packages(without_optional_packages):
    results, _ = without_optional_packages
    helps = {script: result for (script, argument), result in results.items() if argument == "--help"}
    assert sorted(helps) == SCRIPTS
    for script, (code, out, err) in helps.items():
        assert code == 0, (script, code, err)
        assert out.startswith("usage: ") and len(out.splitlines()) > 3, (script, out)


def test_a_missing_optional_package_stops_the_script_with_a_line_naming_its_extra(without_optional_packages):
    results, out = without_optional_packages
    expected = {
        "bench_unet.py": ["needs tomesd, which is not installed", 'pip install -e ".[bench]"'],
        "bench_clustering.py": ["needs scipy (for scipy.cluster.hierarchy)", 'pip install -e ".[bench]"'],
        "bench_gpu.py": ["needs tomesd", "needs scipy", 'pip install -e ".[bench]"'],
        "fid_sweep.py": ["needs accelerate (for eval.sweep)", 'pip install -e ".[sweep]"'],
    }
    for script, parts in expected.items():
        (message, _, err), = [result for (name, argument), result in results.items() if name == script and argument != "--help"]
        assert isinstance(message, str) and message.startswith(f"error: {script} needs "), (script, message, err)
        assert all(part in message for part in parts), message
        assert "Traceback" not in err
        assert len(message.splitlines()) == len([part for part in parts if part.startswith("needs")])  # per package
    assert list(out.iterdir()) == []  # stopped before any work


def test_each_optional_package_is_in_the_extra_its_message_names_and_in_dev():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    dev = {extra for requirement in extras["dev"] if requirement.startswith("sdmerge[")
           for extra in requirement.removeprefix("sdmerge[").removesuffix("]").split(",")}
    for package, extra in EXTRAS.items():
        assert any(requirement.startswith(package) for requirement in extras[extra]), (package, extra)
        assert extra in dev
