"""eval/atomic.py: whole files or none, with the permissions of a newly created file."""

import os
import stat

import pytest

from eval.atomic import write_atomically, write_text


@pytest.fixture
def umask():
    """Set the process's umask for the test; the previous one is restored afterwards."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_get_the_mode_the_umask_gives_new_files(tmp_path, umask, mask, mode):
    umask(mask)
    write_text(tmp_path / "new.md", "a")
    plain = tmp_path / "plain.md"
    plain.write_text("a")  # how open() creates a file under the same umask
    assert stat.S_IMODE((tmp_path / "new.md").stat().st_mode) == mode == stat.S_IMODE(plain.stat().st_mode)
    umask(0o022)
    write_text(tmp_path / "new.md", "b")  # a rewrite takes the umask of its own time
    assert stat.S_IMODE((tmp_path / "new.md").stat().st_mode) == 0o644


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    write_text(tmp_path / "r.md", "old")

    def fail(file):
        file.write(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        write_atomically(tmp_path / "r.md", fail)
    assert (tmp_path / "r.md").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.md"]
