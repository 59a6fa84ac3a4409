"""Exception types every layer raises; users catch these (or their builtin bases).

Every one derives from ``torch.distributed.DistBackendError`` (itself a ``DistError`` and a
``RuntimeError``), so handlers written for torch's own backends (torchelastic's, a training loop's
``except DistBackendError``) catch them; ``ArgumentError`` is also a ``ValueError`` and
``OpTimeoutError`` a ``TimeoutError``.
"""

from __future__ import annotations

try:
    from torch.distributed import DistBackendError as _Base
except ImportError:  # torch without distributed support: keep the RuntimeError contract
    _Base = RuntimeError


class MooncakeError(_Base):
    """Base class of mooncake's runtime errors: a ``torch.distributed.DistBackendError`` (so a
    ``RuntimeError``, as upstream raises)."""


class ArgumentError(MooncakeError, ValueError):
    """A bad argument, raised before any communication; the group stays usable.

    It is both a ``ValueError`` (the Python convention) and a ``RuntimeError`` (what upstream
    Mooncake raises), so existing ``except`` clauses of either kind keep working.
    """


class OpTimeoutError(MooncakeError, TimeoutError):
    """An operation did not complete before its deadline."""

    def __init__(self, message: str, pending_ranks: tuple[int, ...] = ()):
        super().__init__(message)
        self.pending_ranks = tuple(pending_ranks)


class PeerFailureError(MooncakeError):
    """One or more peers failed (process died, connection lost) during an operation.

    ``failed_ranks`` holds group ranks, ascending.
    """

    def __init__(self, message: str, failed_ranks: tuple[int, ...]):
        super().__init__(message)
        self.failed_ranks = tuple(sorted(failed_ranks))


class WireError(MooncakeError):
    """A message that does not match what this rank expects (size, op, dtype, epoch...).

    Usually the ranks called different collectives, or the same one with different shapes.
    """


class NotApplicableError(MooncakeError, NotImplementedError):
    """An upstream API that has no meaning in this implementation; the message says why."""


class MismatchError(WireError, ValueError):
    """The ranks called one operation with different arguments (op, dtype, size, root, reduce op,
    slots, split sizes).  Raised on every rank with the same message, naming each side; the
    operation moved no data into any output, and the group stays usable."""


class RemovedError(PeerFailureError):
    """This rank was removed from the group by the survivors (it did not answer the failure
    agreement in time: dead, stalled, or blocked in a call that held the GIL); ``failed_ranks``
    names it.  Every later call on the group raises it; a replacement joins as a new rank."""
