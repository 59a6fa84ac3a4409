"""Local resources are the job's user's own: the doorbell directory (another user's squat is refused),
the native-code cache (tests/fast_cpu/test_native.py covers its ownership and mode checks)."""

from __future__ import annotations

import os
import shutil

import pytest

from mooncake.control.errors import MooncakeError

group = pytest.importorskip("mooncake.fast.cpu.group")

FAKE_UID = 4242421


@pytest.fixture
def fake_uid(monkeypatch):
    path = f"/tmp/mooncake-{FAKE_UID}"
    shutil.rmtree(path, ignore_errors=True)
    monkeypatch.setattr(os, "getuid", lambda: FAKE_UID)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.getuid() != 0, reason="making a directory of another user needs root")
def test_doorbell_directory_is_private_and_squatting_is_refused(fake_uid):
    os.mkdir(fake_uid, 0o700)  # made first by "someone else" (root, not FAKE_UID)
    with pytest.raises(MooncakeError, match=r"must be a directory owned by uid 4242421 with mode 0700"):
        group.bell_dir()
    os.chown(fake_uid, FAKE_UID, 0)
    os.chmod(fake_uid, 0o755)  # ours, but open to others
    with pytest.raises(MooncakeError, match=r"mode 0755"):
        group.bell_dir()
    os.chmod(fake_uid, 0o700)
    assert group.bell_dir() == fake_uid


def test_doorbell_directory_is_created_0700():
    path = group.bell_dir()
    st = os.stat(path)
    assert path == f"/tmp/mooncake-{os.getuid()}"
    assert st.st_uid == os.getuid() and st.st_mode & 0o777 == 0o700


def test_stale_doorbells_of_dead_processes_are_removed():
    path = group.bell_dir()
    stale = os.path.join(path, "b999999999-test")
    mine = os.path.join(path, f"b{os.getpid()}-test")
    try:
        for p in (stale, mine):
            open(p, "w").close()
        group.bell_dir()
        assert not os.path.exists(stale) and os.path.exists(mine)
    finally:
        for p in (stale, mine):
            if os.path.exists(p):
                os.unlink(p)
