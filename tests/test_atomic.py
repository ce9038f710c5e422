"""eval/atomic.py: whole files and folders or none, with the permissions of newly created ones."""

import os
import stat

import pytest

from eval.atomic import write_atomically, write_folder_atomically, write_text


@pytest.fixture
def umask():
    """Set the process's umask for the test; the previous one is restored afterwards."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_and_folders_get_the_mode_the_umask_gives_new_ones(tmp_path, umask, mask, mode):
    umask(mask)
    write_text(tmp_path / "new.md", "a")
    plain = tmp_path / "plain.md"
    plain.write_text("a")  # how open() creates a file under the same umask
    assert stat.S_IMODE((tmp_path / "new.md").stat().st_mode) == mode == stat.S_IMODE(plain.stat().st_mode)
    write_folder_atomically(tmp_path / "model", lambda folder: (folder / "weights").write_text("w"))
    (tmp_path / "plain").mkdir()
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o777 & ~mask
    umask(0o022)
    write_text(tmp_path / "new.md", "b")  # a rewrite takes the umask of its own time
    assert stat.S_IMODE((tmp_path / "new.md").stat().st_mode) == 0o644


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_temporary(tmp_path):
    write_text(tmp_path / "r.md", "old")

    def fail(file):
        file.write(b"half")
        raise RuntimeError("killed")

    def fail_in_folder(folder):
        (folder / "weights").write_bytes(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        write_atomically(tmp_path / "r.md", fail)
    with pytest.raises(RuntimeError, match="killed"):
        write_folder_atomically(tmp_path / "model", fail_in_folder)
    assert (tmp_path / "r.md").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.md"]
