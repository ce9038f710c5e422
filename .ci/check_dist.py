"""The built sdist and wheel hold the library, README.md, LICENSE and py.typed, and no tests (they
need the whole repository: eval/, scripts/, notebooks/, docs/; they run from a clone).

    python .ci/check_dist.py DIST_DIR      # the folder `python -m build --outdir DIST_DIR` wrote
"""

import sys
import tarfile
import zipfile
from pathlib import Path

dist = Path(sys.argv[1])
(sdist,), (wheel,) = sorted(dist.glob("sdmerge-*.tar.gz")), sorted(dist.glob("sdmerge-*.whl"))
with tarfile.open(sdist) as archive:
    sdist_files = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
with zipfile.ZipFile(wheel) as archive:
    wheel_files = set(archive.namelist())
library = {path.relative_to(Path(__file__).resolve().parent.parent).as_posix()
           for path in (Path(__file__).resolve().parent.parent / "sdmerge").rglob("*.py")}

problems = []
for name in sorted(library | {"sdmerge/py.typed", "README.md", "LICENSE", "pyproject.toml"}):
    if name not in sdist_files:
        problems.append(f"sdist: {name} missing")
for name in sorted(library | {"sdmerge/py.typed"}):
    if name not in wheel_files:
        problems.append(f"wheel: {name} missing")
if not any(name.endswith(".dist-info/licenses/LICENSE") for name in wheel_files):
    problems.append("wheel: no LICENSE in its .dist-info")
problems += [f"{kind}: {name} is not the library's" for kind, files in (("sdist", sdist_files), ("wheel", wheel_files))
             for name in sorted(files) if name.startswith(("tests/", "eval/", "scripts/"))]
if problems:
    sys.exit("\n".join(problems))
print(f"{sdist.name}: {len(sdist_files)} files, {wheel.name}: {len(wheel_files)} files; the library, LICENSE and "
      "py.typed in both, no tests")
