"""Every file in scripts/ is a command: ``--help`` works without the optional packages, and a
missing one stops the script before any work with a line naming the extra that installs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eval.optional import EXTRAS

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

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
    results[script] = [code, out.getvalue(), err.getvalue()]
print(json.dumps(results))
"""


def run_without_optional_packages(runs: list[tuple[str, list[str]]]) -> dict:
    """``{script: [exit code or message, stdout, stderr]}`` of each ``(script, arguments)``, run in
    one Python process in which the packages of :data:`eval.optional.EXTRAS` cannot be imported."""
    code = RUN_WITHOUT_OPTIONAL_PACKAGES.format(blocked=sorted(EXTRAS), runs=runs)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_help_works_for_every_script_without_the_optional_packages():
    results = run_without_optional_packages([(script, ["--help"]) for script in SCRIPTS])
    assert sorted(results) == SCRIPTS
    for script, (code, out, err) in results.items():
        assert code == 0, (script, code, err)
        assert out.startswith("usage: ") and len(out.splitlines()) > 3, (script, out)


def test_a_missing_optional_package_stops_the_script_with_a_line_naming_its_extra(tmp_path):
    runs = [
        ("bench_unet.py", ["--quick"]),
        ("bench_clustering.py", ["--quick"]),
        ("bench_gpu.py", ["--device", "cpu", "--quick", "--out", str(tmp_path / "b.md")]),
        ("fid_sweep.py", ["--preset", "smoke", "--output", str(tmp_path / "smoke")]),
    ]
    results = run_without_optional_packages(runs)
    expected = {
        "bench_unet.py": ["needs tomesd, which is not installed", 'pip install -e ".[bench]"'],
        "bench_clustering.py": ["needs scipy (for scipy.cluster.hierarchy)", 'pip install -e ".[bench]"'],
        "bench_gpu.py": ["needs tomesd", "needs scipy", 'pip install -e ".[bench]"'],
        "fid_sweep.py": ["needs accelerate (for eval.sweep)", 'pip install -e ".[sweep]"'],
    }
    for script, parts in expected.items():
        message = results[script][0]
        assert isinstance(message, str) and message.startswith(f"error: {script} needs "), (script, results[script])
        assert all(part in message for part in parts), message
        assert "Traceback" not in results[script][2]
        assert len(message.splitlines()) == len([part for part in parts if part.startswith("needs")])  # per package
    assert not (tmp_path / "b.md").exists() and not (tmp_path / "smoke").exists()  # stopped before any work


def test_each_optional_package_is_in_the_extra_its_message_names_and_in_dev():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    dev = {extra for requirement in extras["dev"] if requirement.startswith("sdmerge[")
           for extra in requirement.removeprefix("sdmerge[").removesuffix("]").split(",")}
    for package, extra in EXTRAS.items():
        assert any(requirement.startswith(package) for requirement in extras[extra]), (package, extra)
        assert extra in dev
