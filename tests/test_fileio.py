"""Atomic writes (a failure or a full disk keeps the previous file), temporary-file clean-up, torn JSON lines."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from maskrcnn.fileio import DiskFullError, JsonlError, atomic_write, read_jsonl, remove_temp_files, write_text_atomic


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    write_text_atomic(path, "one")
    write_text_atomic(path, "two")
    assert path.read_text() == "two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.txt"]


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "a.txt"
    write_text_atomic(path, "old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(path, "w") as handle:
            handle.write("half of the new")
            raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def raise_no_space() -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def raise_like_torch_save() -> None:
    """torch.save turns a failed write into a RuntimeError raised while handling the OSError."""
    try:
        raise_no_space()
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904


@pytest.mark.parametrize("failing_write", [raise_no_space, raise_like_torch_save])
def test_no_space_names_the_folder_and_keeps_the_previous_file(tmp_path, failing_write):
    """The portable version of a full disk (a real one: test_real_full_disk_keeps_the_previous_checkpoint)."""
    path = tmp_path / "last.pt"
    write_text_atomic(path, "old")
    with pytest.raises(DiskFullError) as info:
        with atomic_write(path, "w"):
            failing_write()
    assert str(info.value) == f"no space left on {tmp_path} while writing last.pt; the previous version is kept"
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (needs root and mount permission; skipped elsewhere, where the test above covers ENOSPC)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    needs = ("a real full disk needs a 1 MiB tmpfs, mounted as root with mount permission (in a container: "
             "CAP_SYS_ADMIN); test_no_space_names_the_folder_and_keeps_the_previous_file covers ENOSPC everywhere")
    if os.geteuid() != 0:
        pytest.skip(f"{needs}; not root here")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"{needs}; mount failed: {mounted.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_real_full_disk_keeps_the_previous_checkpoint(small_tmpfs):
    import torch

    from maskrcnn.engine.checkpoint import load_checkpoint, save_checkpoint

    path = small_tmpfs / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(150_000)}, "iteration": 1}, path)  # 600 kB of 1 MiB
    with pytest.raises(DiskFullError, match=f"no space left on {small_tmpfs} while writing last.pt"):
        save_checkpoint({"model": {"w": torch.zeros(150_000)}, "iteration": 2}, path)  # old + new do not fit
    state = load_checkpoint(path)
    assert state["iteration"] == 1 and bool((state["model"]["w"] == 1).all())
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["last.pt"]


def test_remove_temp_files_only_touches_temporaries(tmp_path):
    (tmp_path / ".last.pt.x1y2.tmp").write_bytes(b"half")
    (tmp_path / ".metrics.json.abc.tmp").write_text("{")
    (tmp_path / "last.pt").write_bytes(b"kept")
    (tmp_path / "notes.tmp").write_text("not ours: no leading dot")
    removed = remove_temp_files(tmp_path)
    assert sorted(p.name for p in removed) == [".last.pt.x1y2.tmp", ".metrics.json.abc.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "notes.tmp"]


def test_read_jsonl_drops_a_torn_last_line_and_names_a_bad_middle_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 1}\n\n{"iteration": 2}\n{"iteration": 3, "lo')
    assert read_jsonl(path) == [{"iteration": 1}, {"iteration": 2}]
    path.write_text('{"iteration": 1}\n{"iterat\n{"iteration": 3}\n')
    with pytest.raises(JsonlError, match=r"metrics.jsonl:2: not a JSON record"):
        read_jsonl(path)
    path.write_text('[1, 2]\n{"iteration": 3}\n')
    with pytest.raises(JsonlError, match=r"metrics.jsonl:1: expected a JSON object, got list"):
        read_jsonl(path)
