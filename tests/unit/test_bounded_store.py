"""BoundedStore: every Store call of the agreement ends within its deadline."""

import threading
import time

import pytest
import torch.distributed as dist

from mooncake.control.store import BoundedStore, StoreTimeout


class Stuck:
    """A Store client whose ``check`` never returns (its server's host is cut off)."""

    def __init__(self):
        self.release = threading.Event()

    def check(self, keys):
        self.release.wait()
        return True

    def set(self, key, value):
        raise RuntimeError("refused")


def test_calls_pass_through_with_their_results_and_errors():
    store = BoundedStore(dist.HashStore(), lambda: 5.0)
    store.set("k", b"v")
    assert store.get("k") == b"v" and store.check(["k"]) and not store.check(["other"])
    assert store.compare_set("k", b"v", b"w") == b"w"
    with pytest.raises(RuntimeError, match="refused"):
        BoundedStore(Stuck(), lambda: 5.0).set("k", b"v")
    store.close()


def test_a_call_without_an_answer_raises_at_the_deadline_and_so_does_every_later_one():
    stuck = Stuck()
    store = BoundedStore(stuck, lambda: 0.3)
    began = time.monotonic()
    with pytest.raises(StoreTimeout, match=r"did not answer check\(\) within 0.3 s"):
        store.check(["k"])
    assert 0.3 <= time.monotonic() - began < 3
    began = time.monotonic()
    with pytest.raises(StoreTimeout):
        store.set("k", b"v")  # not queued behind the blocked call: refused at once
    assert time.monotonic() - began < 0.1
    stuck.release.set()
