"""A Store client whose every call ends within a deadline.

torch's TCPStore client waits for the server's answer without a limit of its own: when the Store's host
is cut off (powered off, partitioned: no TCP reset ever comes) a ``check`` or ``get`` blocks until the
kernel gives up on the connection, many minutes later, whatever the Store's timeout says.  The agreement
runs on such a client, so survivors of a lost host would hang in it.  ``BoundedStore`` runs each call on a
thread of its own and stops waiting at the deadline: the call raises ``StoreTimeout`` and so does every
later one (the connection is given up; its blocked thread is a daemon left to the operating system).
"""

from __future__ import annotations

import queue
import threading
from typing import Callable


class StoreTimeout(RuntimeError):
    """The Store did not answer within the deadline (its host is gone or cut off)."""


class BoundedStore:
    """Forwards every method call of ``store`` and returns its result, or raises ``StoreTimeout`` once
    ``deadline_s()`` seconds pass without one (and for every call after that)."""

    def __init__(self, store, deadline_s: Callable[[], float]):
        self._store = store
        self._deadline_s = deadline_s
        self._lock = threading.Lock()  # one request at a time, as one client connection serves them
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._lost: str | None = None
        self._thread: threading.Thread | None = None  # started by the first call (a healthy group makes none)

    def _serve(self) -> None:
        while True:
            call, answer = self._requests.get()
            if call is None:
                return
            try:
                answer.put((True, call()))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                answer.put((False, exc))

    def _call(self, name: str, method, args, kwargs):
        with self._lock:
            if self._lost is not None:
                raise StoreTimeout(self._lost)
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="mooncake-store", daemon=True)
                self._thread.start()
            answer: queue.SimpleQueue = queue.SimpleQueue()
            self._requests.put((lambda: method(*args, **kwargs), answer))
            limit = self._deadline_s()
            try:
                ok, value = answer.get(timeout=limit)
            except queue.Empty:
                self._lost = (f"the Store did not answer {name}() within {limit:.3g} s: its host is gone or cut "
                              "off from this one (no later call on this connection is tried)")
                raise StoreTimeout(self._lost) from None
        if ok:
            return value
        raise value

    def clone(self):
        return BoundedStore(self._store.clone(), self._deadline_s)

    def close(self) -> None:
        """Stop the connection's thread (a call still blocked in it stays blocked)."""
        if self._lost is None and self._thread is not None:
            self._requests.put((None, None))

    def __getattr__(self, name: str):
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr
        return lambda *args, **kwargs: self._call(name, attr, args, kwargs)
