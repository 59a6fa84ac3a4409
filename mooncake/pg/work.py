"""``MooncakeWork``: the handle every operation returns (a real ``dist.Work`` subclass, so errors
raised while completing reach ``wait()`` and finite wait timeouts are honoured)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from ..control.errors import OpTimeoutError, PeerFailureError

_PENDING, _DONE, _FAILED = range(3)


class MooncakeWork(dist.Work):
    """One operation in flight.

    ``wait(timeout)`` drives it to completion and re-raises its error; a finite ``timeout`` that
    expires first returns ``False`` and leaves the operation running (its own deadline, the group
    timeout, still applies).  ``failed_ranks`` lists the group ranks a failed operation lost.
    """

    def __init__(self, engine, op, timeout_s: float, outputs: list[torch.Tensor],
                 after: Callable[[], None] | None = None,
                 source_rank: int | Callable[[], int] = -1, name: str = "operation"):
        super().__init__()
        self._engine = engine
        self._name = name
        self._op = op
        self._after = after
        self._outputs = outputs
        self._timeout_s = timeout_s
        self._deadline = time.monotonic() + timeout_s
        self._lock = threading.Lock()
        self._state = _PENDING
        self._error: BaseException | None = None
        self._future: torch.futures.Future = torch.futures.Future()
        self._source_rank_value = source_rank
        self.failed_ranks: tuple[int, ...] = ()
        if op is None:
            self._complete()
        else:
            engine.add_poller(self._advance)

    # -- completion ------------------------------------------------------------------------------
    def _advance(self) -> bool:
        """Finish the operation once committed, or fail it on a lost peer or past its deadline."""
        with self._lock:
            if self._state != _PENDING:
                return True
            op = self._op
            op.progress()
            if op.committed:
                try:
                    op.finish()
                except BaseException as exc:  # noqa: BLE001 - delivered to wait()
                    self._fail(exc)
                else:
                    self._complete()
            elif op.failed_peers():
                failed = tuple(sorted(op.failed_peers()))
                op.abandon()
                self._fail(PeerFailureError(f"{self._name}: lost connection to rank(s) {list(failed)}",
                                            failed))
            elif time.monotonic() >= self._deadline:
                op.abandon()
                pending = op.pending_ranks()
                self._fail(OpTimeoutError(f"{self._name} did not complete within {self._timeout_s:.3g} s; "
                                          f"still waiting on rank(s) {list(pending)}", pending))
            return self._state != _PENDING

    def _complete(self) -> None:
        try:
            if self._after is not None:
                self._after()
        except BaseException as exc:  # noqa: BLE001
            self._fail(exc)
            return
        self._state = _DONE
        self._engine.remove_poller(self._advance)
        self._future.set_result(self._outputs)

    def _fail(self, exc: BaseException) -> None:
        self._state = _FAILED
        self._error = exc
        if isinstance(exc, PeerFailureError):
            self.failed_ranks = exc.failed_ranks
        elif isinstance(exc, OpTimeoutError):
            self.failed_ranks = exc.pending_ranks
        self._engine.remove_poller(self._advance)
        self._future.set_exception(exc)

    # -- dist.Work API -------------------------------------------------------------------------
    def wait(self, timeout: timedelta = timedelta(0)) -> bool:
        limit = self._deadline
        if timeout and timeout.total_seconds() > 0:
            limit = min(limit, time.monotonic() + timeout.total_seconds())
        if self._state == _PENDING:
            self._engine.wait_until(self._advance, limit)
            self._advance()
        if self._state == _FAILED:
            raise self._error
        return self._state == _DONE

    def is_completed(self) -> bool:
        return self._advance()

    def is_success(self) -> bool:
        return self._state == _DONE

    def exception(self):
        return self._error

    def get_future(self) -> torch.futures.Future:
        return self._future

    def result(self) -> list[torch.Tensor]:
        return self._outputs

    def source_rank(self) -> int:
        """The sender of a receive (resolved once a message matched, for receives from any source)."""
        value = self._source_rank_value
        return value() if callable(value) else value

    _source_rank = source_rank

    def synchronize(self) -> None:
        self.wait()


class ComposedWork(dist.Work):
    """Several operations issued by one call (coalesced forms); completes when all have."""

    def __init__(self, works: list[MooncakeWork], outputs: list[torch.Tensor]):
        super().__init__()
        self._works = works
        self._outputs = outputs
        self._future: torch.futures.Future | None = None

    def wait(self, timeout: timedelta = timedelta(0)) -> bool:
        return all([w.wait(timeout) for w in self._works])

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self._works)

    def is_success(self) -> bool:
        return all(w.is_success() for w in self._works)

    def exception(self):
        return next((w.exception() for w in self._works if w.exception() is not None), None)

    @property
    def failed_ranks(self) -> tuple[int, ...]:
        return tuple(sorted({r for w in self._works for r in w.failed_ranks}))

    def get_future(self) -> torch.futures.Future:
        if self._future is None:
            futures = torch.futures.collect_all([w.get_future() for w in self._works])
            self._future = futures.then(lambda f: [t for sub in f.value() for t in sub.value()])
        return self._future

    def result(self) -> list[torch.Tensor]:
        return self._outputs
