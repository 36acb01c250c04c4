"""Atomic writing: complete files appear under their final name, interrupted writes leave nothing."""

import os
import stat
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from xfel_spread.atomic import atomic_output, atomic_path


class SimulatedCrash(Exception):
    pass


def current_umask():
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def test_output_appears_complete_with_normal_permissions(tmp_path):
    target = tmp_path / "out.bin"
    with atomic_output(target) as stream:
        stream.write(b"complete")
        assert not target.exists()  # nothing under the final name while writing
    assert target.read_bytes() == b"complete"
    assert os.listdir(tmp_path) == ["out.bin"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~current_umask()


def test_text_mode_passes_open_arguments(tmp_path):
    target = tmp_path / "out.txt"
    with atomic_output(target, "w", encoding="utf-8") as stream:
        stream.write("Å\n")
    assert target.read_text(encoding="utf-8") == "Å\n"


def test_non_writing_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'a'"):
        with atomic_output(tmp_path / "out.bin", "a"):
            pass


def test_exception_leaves_no_final_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(SimulatedCrash):
        with atomic_output(target) as stream:
            stream.write(b"half")
            raise SimulatedCrash
    assert os.listdir(tmp_path) == []


def test_exception_keeps_the_existing_complete_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old and complete")
    with pytest.raises(SimulatedCrash):
        with atomic_output(target) as stream:
            stream.write(b"new but half")
            raise SimulatedCrash
    assert target.read_bytes() == b"old and complete"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_success_replaces_the_existing_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with atomic_output(target) as stream:
        stream.write(b"new")
    assert target.read_bytes() == b"new"


@pytest.mark.parametrize("existing", [None, b"old and complete"])
def test_killed_process_never_exposes_a_partial_file(tmp_path, existing):
    """A process dying mid-write (no exception handling runs) leaves the final name as it was."""
    target = tmp_path / "out.bin"
    if existing is not None:
        target.write_bytes(existing)
    writer = textwrap.dedent(
        f"""
        import os
        from xfel_spread.atomic import atomic_output
        with atomic_output({str(target)!r}) as stream:
            stream.write(b"partial")
            stream.flush()
            os._exit(3)
        """
    )
    assert subprocess.run([sys.executable, "-c", writer]).returncode == 3
    if existing is None:
        assert not target.exists()
    else:
        assert target.read_bytes() == existing
    # Only a hidden, recognisable leftover; never anything under the final name.
    leftovers = [name for name in os.listdir(tmp_path) if name != "out.bin"]
    assert all(name.startswith(".out.bin.") and name.endswith(".partial") for name in leftovers)


def test_next_writer_removes_what_a_killed_writer_left_and_nothing_else(tmp_path):
    target = tmp_path / "out.bin"
    stale = [tmp_path / ".out.bin.k3_x9q0a.partial", tmp_path / ".out.bin.zzzzzzzz.partial"]
    kept = [tmp_path / ".out.bin.gz.k3_x9q0a.partial",  # another file's temporary
            tmp_path / "out.bin.k3_x9q0a.partial",  # not hidden: not ours
            tmp_path / ".out.bin.notes"]
    for path in stale + kept:
        path.write_bytes(b"left behind")
    with atomic_output(target) as stream:
        stream.write(b"complete")
    assert sorted(os.listdir(tmp_path)) == sorted(["out.bin"] + [path.name for path in kept])


def test_atomic_path_for_h5py(tmp_path):
    target = tmp_path / "shard.h5"
    with atomic_path(target) as temporary:
        assert temporary.parent == tmp_path and temporary != target
        with h5py.File(temporary, "w") as h5:
            h5["data"] = np.arange(6, dtype=np.int32).reshape(2, 3)
    with h5py.File(target, "r") as h5:
        assert h5["data"][1, 2] == 5
    assert os.listdir(tmp_path) == ["shard.h5"]


def test_atomic_path_removes_temporary_on_exception(tmp_path):
    with pytest.raises(SimulatedCrash):
        with atomic_path(tmp_path / "shard.h5") as temporary:
            temporary.write_bytes(b"half")
            raise SimulatedCrash
    assert os.listdir(tmp_path) == []
