"""The job secret: who may talk to this job's ranks (docs/semantics.md, "Trust model").

One place defines the math.  A job secret (``MOONCAKE_JOB_SECRET``, or ``mooncake.pg.set_job_secret``;
``mooncake-run`` generates one per job) is 16-64 random bytes, written as hex.  It never goes to the
Store, to a log or to the wire.  From it come per-purpose subkeys (keyed BLAKE2b with a personalisation
string per purpose), and from those:

* ``WireAuth`` (one per group key): a 16-byte MAC in every wire header (bytes 40..56 of the 64-byte
  header) over the header's fields -- kind, op, group, source, destination, epoch, sequence number,
  size, dtype, reduce op, user tag -- and, for control messages (DONE with its fingerprint, NACK), over
  the whole message.  Data payloads are not MACed byte by byte unless ``MOONCAKE_AUTH_PAYLOAD=1``: a
  header and its payload travel as one UCX message, so a payload can only come with its sender's
  header, and nobody without the secret can make one.
* ``SealedStore``: every record mooncake writes to the Store carries a 32-byte MAC over its Store key
  and value, so a record copied to another key (another group, epoch, rank) fails to verify, and a
  forged, garbage or truncated one is never acted on.

Without a secret none of this runs (``keyring()`` is None): the job trusts every process that can
reach its ports and its Store, as NCCL and gloo do.

Rejected input is dropped and logged once per (source, reason) -- never acted on; ``drops()`` counts
them (tests and ``mooncake-doctor`` read it).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time

from .errors import ArgumentError, WireError

ENV = "MOONCAKE_JOB_SECRET"
PAYLOAD_ENV = "MOONCAKE_AUTH_PAYLOAD"
MIN_SECRET_BYTES = 16
MAX_SECRET_BYTES = 64
WIRE_MAC_OFFSET = 40       # the wire header's fields end here (control/wire.py: 40 bytes used)
WIRE_MAC_BYTES = 16
STORE_MAC_BYTES = 32
_STORE_MAGIC = b"MCS1"     # precedes a sealed Store record's MAC

log = logging.getLogger("mooncake.auth")


class AuthError(WireError):
    """Input that is not signed with this job's secret (or not signed at all)."""


# ---- the secret --------------------------------------------------------------------------------
def generate_secret() -> str:
    """A fresh secret, as ``mooncake-run`` hands it to its workers (32 random bytes, hex)."""
    return os.urandom(32).hex()


def parse_secret(value, what: str = ENV) -> bytes:
    """The secret's bytes; raises ``ArgumentError`` naming ``what`` and the expected form."""
    if isinstance(value, (bytes, bytearray)) and not isinstance(value, str):
        raw = bytes(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise ArgumentError(f"{what} must be {2 * MIN_SECRET_BYTES}-{2 * MAX_SECRET_BYTES} hex digits "
                                f"(e.g. the output of `python -c 'import os; print(os.urandom(32).hex())'`), "
                                f"got {len(text)} characters that are not all hex digits") from None
    else:
        raise ArgumentError(f"{what} must be a hex string or bytes, got {type(value).__name__}")
    if not MIN_SECRET_BYTES <= len(raw) <= MAX_SECRET_BYTES:
        raise ArgumentError(f"{what} must hold {MIN_SECRET_BYTES}-{MAX_SECRET_BYTES} bytes "
                            f"({2 * MIN_SECRET_BYTES}-{2 * MAX_SECRET_BYTES} hex digits), got {len(raw)} bytes")
    if len(set(raw)) == 1:
        raise ArgumentError(f"{what} is {len(raw)} copies of one byte: use random bytes "
                            "(mooncake-run generates one)")
    return raw


_lock = threading.Lock()
_explicit: bytes | None = None      # set_job_secret
_explicit_set = False
_keyrings: dict[bytes, "Keyring"] = {}
_env_cache: "tuple[str, Keyring] | None" = None


def set_job_secret(secret) -> None:
    """Use ``secret`` (hex string or bytes; None: go back to ``MOONCAKE_JOB_SECRET``) for groups
    created from now on.  Every rank of the job must use the same secret."""
    global _explicit, _explicit_set
    raw = None if secret is None else parse_secret(secret, "set_job_secret(secret)")
    with _lock:
        _explicit, _explicit_set = raw, secret is not None


def keyring() -> "Keyring | None":
    """The job's keys (None without a secret).  Read when a group is created."""
    global _env_cache
    with _lock:
        raw = _explicit if _explicit_set else None
    if raw is None:
        text = os.environ.get(ENV)
        if not text:
            return None
        cached = _env_cache
        if cached is not None and cached[0] == text:
            return cached[1]
        raw = parse_secret(text, ENV)
        ring = keyring_of(raw)
        _env_cache = (text, ring)
        return ring
    return keyring_of(raw)


def keyring_of(raw: bytes) -> "Keyring":
    with _lock:
        ring = _keyrings.get(raw)
        if ring is None:
            ring = _keyrings[raw] = Keyring(raw)
        return ring


def enabled() -> bool:
    return keyring() is not None


def _subkey(secret: bytes, purpose: bytes) -> bytes:
    return hashlib.blake2b(b"", key=secret, digest_size=32, person=purpose.ljust(16, b"\0")[:16]).digest()


class Keyring:
    """Per-purpose subkeys of one secret (the secret itself is used for nothing else)."""

    def __init__(self, secret: bytes):
        self._wire = _subkey(secret, b"mooncake-wire")
        self._store = _subkey(secret, b"mooncake-store")
        self.fingerprint = _subkey(secret, b"mooncake-id")[:4].hex()  # loggable: names the secret, reveals nothing
        self._wires: dict[int, WireAuth] = {}
        self._store_mac = hashlib.blake2b(key=self._store, digest_size=STORE_MAC_BYTES)
        self.mac_payload = os.environ.get(PAYLOAD_ENV, "0") == "1"

    def wire(self, group_key: int) -> "WireAuth":
        w = self._wires.get(group_key)
        if w is None:
            key = hashlib.blake2b(group_key.to_bytes(4, "little"), key=self._wire, digest_size=32,
                                  person=b"mooncake-group").digest()
            w = self._wires[group_key] = WireAuth(key, self.mac_payload)
        return w

    # -- Store records ----------------------------------------------------------------------------
    def _record_mac(self, key: str, value: bytes) -> bytes:
        h = self._store_mac.copy()
        k = key.encode()
        h.update(len(k).to_bytes(4, "little"))
        h.update(k)
        h.update(value)
        return h.digest()

    def seal(self, key: str, value) -> bytes:
        value = value.encode() if isinstance(value, str) else bytes(value)
        return value + _STORE_MAGIC + self._record_mac(key, value)

    def open(self, key: str, raw) -> bytes:
        """The value of a sealed record; ``AuthError`` when it is not sealed for ``key`` with this secret."""
        raw = bytes(raw)
        n = len(_STORE_MAGIC) + STORE_MAC_BYTES
        if len(raw) < n or raw[-n:-STORE_MAC_BYTES] != _STORE_MAGIC:
            raise AuthError(f"Store record {key!r} ({len(raw)} bytes) is not signed: dropped (every rank "
                            f"of the job must have the same {ENV})")
        value = raw[:-n]
        if not hmac.compare_digest(raw[-STORE_MAC_BYTES:], self._record_mac(key, value)):
            raise AuthError(f"Store record {key!r} has a bad signature: dropped (written by a process "
                            "without this job's secret, or copied from another key)")
        return value


class WireAuth:
    """MACs of one group's wire messages (see the module docstring)."""

    __slots__ = ("_base", "mac_payload")

    def __init__(self, key: bytes, mac_payload: bool):
        self._base = hashlib.blake2b(key=key, digest_size=WIRE_MAC_BYTES)
        self.mac_payload = mac_payload

    def _mac(self, mv: memoryview, end: int) -> bytes:
        h = self._base.copy()
        h.update(mv[:WIRE_MAC_OFFSET])
        if end > 64:
            h.update(mv[64:end])
        return h.digest()

    def sign(self, buffer, control: bool = False) -> None:
        """Write the MAC into a packed message (header, then payload): over the header, and over the
        payload too for control messages (or with ``MOONCAKE_AUTH_PAYLOAD=1``)."""
        mv = memoryview(buffer)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        end = len(mv) if (control or self.mac_payload) else 64
        mv[WIRE_MAC_OFFSET:WIRE_MAC_OFFSET + WIRE_MAC_BYTES] = self._mac(mv, end)

    def verify(self, buffer, length: int | None = None, control: bool = False) -> bool:
        """Whether a received message (its first ``length`` bytes) carries this group's MAC."""
        mv = memoryview(buffer)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        n = len(mv) if length is None else length
        if n < 64:
            return False
        end = n if (control or self.mac_payload) else 64
        return hmac.compare_digest(mv[WIRE_MAC_OFFSET:WIRE_MAC_OFFSET + WIRE_MAC_BYTES], self._mac(mv, end))


_groups: dict[int, "WireAuth | None"] = {}   # group key -> the MACs it chose when it was created


def bind_group(group_key: int) -> "WireAuth | None":
    """Fix a new group's wire MACs (the job secret as of its creation; None without one): later
    ``set_job_secret`` calls do not change a running group."""
    ring = keyring()
    w = None if ring is None else ring.wire(group_key)
    with _lock:
        _groups[group_key] = w
    return w


def wire_auth(group_key: int) -> "WireAuth | None":
    """The group's wire MACs (as bound at its creation; the current secret for a group not bound)."""
    try:
        return _groups[group_key]
    except KeyError:
        ring = keyring()
        return None if ring is None else ring.wire(group_key)


# ---- drop and log once -----------------------------------------------------------------------------
_drops: dict[tuple[str, str], int] = {}


def drop(source: str, reason: str) -> None:
    """Record a dropped input; the first from each (source, reason) is logged (a warning)."""
    with _lock:
        n = _drops.get((source, reason), 0)
        _drops[(source, reason)] = n + 1
    if n == 0:
        log.warning(f"mooncake: dropped unauthenticated input from {source}: {reason} (logged once per source)")


def drops() -> int:
    """How many inputs were dropped so far in this process."""
    with _lock:
        return sum(_drops.values())


# ---- the Store ---------------------------------------------------------------------------------------
class SealedStore:
    """A c10d Store whose values mooncake writes sealed (key-bound MAC) and reads verified.

    ``get`` raises ``AuthError`` (a ``WireError``) on a record that does not verify;
    ``compare_set`` with an empty expectation treats such a record as absent and replaces it (the
    first *authentic* write wins).  Keys and everything else pass through."""

    _REPLACE_TRIES = 16

    def __init__(self, store, ring: Keyring):
        self._inner = store
        self._ring = ring

    @property
    def inner(self):
        return self._inner

    def over(self, store) -> "SealedStore":
        """``store`` sealed with this one's keys."""
        return SealedStore(store, self._ring)

    def set(self, key: str, value) -> None:
        self._inner.set(key, self._ring.seal(key, value))

    def get(self, key: str) -> bytes:
        raw = self._inner.get(key)
        try:
            return self._ring.open(key, raw)
        except AuthError as exc:
            drop(f"the Store key {key!r}", "bad or missing signature")
            raise exc from None

    def get_valid(self, key: str, wait_s: float) -> bytes:
        """``get``, but a record that does not verify is waited past (for up to ``wait_s``: the
        authentic writer's ``set`` replaces it) before ``AuthError`` is raised."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self.get(key)
            except AuthError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.005)

    def compare_set(self, key: str, expected, desired) -> bytes:
        sealed = self._ring.seal(key, desired)
        empty = expected in ("", b"")
        want = b"" if empty else self._ring.seal(key, expected)
        for _ in range(self._REPLACE_TRIES):
            won = bytes(self._inner.compare_set(key, want, sealed))
            try:
                return self._ring.open(key, won)
            except AuthError:
                drop(f"the Store key {key!r}", "bad or missing signature")
                if not empty or won == want:
                    raise AuthError(f"Store record {key!r} has a bad signature and cannot be replaced") from None
                want = won  # a forged record counts as absent: replace it with ours
        raise AuthError(f"Store record {key!r} keeps being overwritten with unsigned data")

    def clone(self):
        return SealedStore(self._inner.clone(), self._ring)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def wrap_store(store, ring: "Keyring | None" = None):
    """``store`` sealed with the job's keys, or ``store`` itself without a secret."""
    ring = keyring() if ring is None else ring
    if ring is None or isinstance(store, SealedStore):
        return store
    return SealedStore(store, ring)


def raw_store(store):
    """The Store under a ``SealedStore`` (tests and tools that write by hand)."""
    return store.inner if isinstance(store, SealedStore) else store
