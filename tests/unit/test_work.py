"""MooncakeWork's end states as other threads see them: a thread that reads the state (``wait``,
``get_future`` on the engine's thread) must find everything that state promises already in place."""

import torch

from mooncake.control.errors import OpTimeoutError, PeerFailureError
from mooncake.pg import work as W

from test_commit import CommittedOp, Engine


class Observed(W.MooncakeWork):
    """Records, at each write of ``_state``, the error another thread would raise for it."""

    def __setattr__(self, name, value):
        if name == "_state":
            self.__dict__.setdefault("seen", []).append((value, self.__dict__.get("_error"),
                                                         self.__dict__.get("failed_ranks")))
        super().__setattr__(name, value)


def test_a_failed_state_is_never_seen_without_its_error():
    for exc in (OpTimeoutError("late", (1,)), PeerFailureError("dead", (2,))):
        work = Observed(Engine(), CommittedOp(), 2.0, [torch.zeros(1)], name="all_reduce")
        work._fail(exc)
        state, error, failed = work.seen[-1]
        assert state == W._FAILED and error is exc
        assert tuple(failed) == (exc.pending_ranks if isinstance(exc, OpTimeoutError) else exc.failed_ranks)
        future = work.get_future()
        assert future.done()
        try:
            future.wait()
        except Exception as raised:  # noqa: BLE001 - torch wraps it
            assert str(exc) in str(raised)
        else:
            raise AssertionError("the future of a failed operation completed without its error")
