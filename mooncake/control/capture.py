"""Calls captured into CUDA graphs: every active rank's n-th captured call of a view must be the same call.

A captured collective takes no sequence number and runs only at replay, where a rank whose graph holds
another call would wait on its peers until the deadline.  So ranks compare what they capture when they
capture it: each publishes the fingerprint of its n-th captured call of view epoch e in the Store
(``<prefix>/capture/<e>/<n>/<rank>``), waits for the other active ranks' and computes ``mismatch`` over
all of them; ranks that disagree all raise the same ``MismatchError``, naming each side, before the graph
holds anything.  The record also carries the plane's *offer* for the call (bytes, possibly empty: e.g. where
its tensor lies in memory peers can map), and every rank gets every rank's offer, so all decide alike.  Each rank deletes its record of call n - 2 when it publishes call n (every peer has
read it by then: it published call n - 1, which it does only after its check of call n - 2).
"""

from __future__ import annotations

import struct
from datetime import timedelta
from typing import Sequence

from .errors import MismatchError, OpTimeoutError, WireError
from .fingerprint import Fingerprint, mismatch


_HEAD = struct.Struct("<I")  # the record: the fingerprint's length, the fingerprint, the offer


def _key(prefix: str, epoch: int, index: int, rank: int) -> str:
    return f"{prefix}/capture/{epoch}/{index}/{rank}"


def agree_on_capture(store, prefix: str, epoch: int, index: int, rank: int, active: Sequence[int],
                     fingerprint: Fingerprint, timeout_s: float, name: str, offer: bytes = b"") -> dict[int, bytes]:
    """Check that every rank of ``active`` captures ``fingerprint``'s call as its ``index``-th captured call
    of view ``epoch`` (see the module docstring); ``name`` is the call's, for the messages.  Returns every
    active rank's offer.  Raises ``MismatchError`` (the same on every rank) or ``OpTimeoutError`` naming the
    ranks that did not capture a call within ``timeout_s``."""
    encoded = fingerprint.encode()
    store.set(_key(prefix, epoch, index, rank), _HEAD.pack(len(encoded)) + encoded + offer)
    if index >= 2:
        store.delete_key(_key(prefix, epoch, index - 2, rank))
    others = [r for r in active if r != rank]
    keys = {r: _key(prefix, epoch, index, r) for r in others}
    try:
        store.wait(list(keys.values()), timedelta(seconds=timeout_s))
    except Exception:  # noqa: BLE001 - torch raises DistStoreError / DistNetworkError; named below
        missing = tuple(r for r, k in keys.items() if not store.check([k]))
        raise OpTimeoutError(f"{name} captured in a CUDA graph: rank(s) {list(missing)} did not capture a "
                             f"call number {index} of view epoch {epoch} within {timeout_s:.3g} s (every rank of "
                             "the group must capture the same calls in the same order)", missing) from None
    prints, offers = {rank: fingerprint}, {rank: offer}
    for r, k in keys.items():
        raw = bytes(store.get(k))
        n = _HEAD.unpack_from(raw)[0] if len(raw) >= _HEAD.size else -1
        if n < 0 or _HEAD.size + n > len(raw):
            raise WireError(f"rank {r}'s captured call: a record of {len(raw)} bytes is malformed")
        prints[r] = Fingerprint.decode(raw[_HEAD.size:_HEAD.size + n], f"rank {r}'s captured call")
        offers[r] = raw[_HEAD.size + n:]
    problem = mismatch(index, prints)
    if problem is not None:
        problem = problem.replace(f"op {index}:", f"captured call {index} of view epoch {epoch}:", 1)
        raise MismatchError(f"{name} captured in a CUDA graph: {problem}")
    return offers
