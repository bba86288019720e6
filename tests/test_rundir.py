"""Atomic writes: a failure leaves the old artifact (or none), never a partial one."""

import os
import stat

import pytest

from hone.errors import HoneError
from hone.rundir import atomic_dir, atomic_path, ensure_dir, is_done, mark_done, read_json, write_json


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("{half")
            raise RuntimeError("crash")
    assert read_json(target) == {"v": 1}
    assert os.listdir(tmp_path) == ["a.json"]


def test_failed_dir_write_keeps_the_old_dir(tmp_path):
    target = tmp_path / "final"
    with atomic_dir(target) as tmp:
        (tmp / "w").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "w").write_text("2")
            raise RuntimeError("crash")
    assert (target / "w").read_text() == "1"
    with atomic_dir(target) as tmp:
        (tmp / "w").write_text("3")
    assert (target / "w").read_text() == "3"
    assert sorted(os.listdir(tmp_path)) == ["final"]


def test_artifacts_get_ordinary_permissions(tmp_path):
    write_json(tmp_path / "x.json", {})
    mode = stat.S_IMODE((tmp_path / "x.json").stat().st_mode)
    assert mode & 0o044 == 0o044  # readable by group and others under the usual umask 022
    with atomic_dir(tmp_path / "d"):
        pass
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) & 0o055 == 0o055


def test_markers_and_bad_json(tmp_path):
    assert not is_done(tmp_path / "stage")
    mark_done(tmp_path / "stage", {"n": 3})
    assert is_done(tmp_path / "stage")
    (tmp_path / "bad.json").write_text('{"a": 1,\n oops}')
    with pytest.raises(HoneError, match=r"bad.json:2: invalid JSON"):
        read_json(tmp_path / "bad.json")


def test_unwritable_dir_is_one_line(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(HoneError, match="is not writable"):
        ensure_dir(tmp_path / "f" / "sub")
