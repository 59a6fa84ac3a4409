"""mooncake.control.auth without processes: secrets, wire MACs, sealed Store records."""

from __future__ import annotations

import os
from datetime import timedelta

import numpy as np
import pytest
import torch.distributed as dist

from mooncake.control import auth
from mooncake.control.agreement import Decision, Report, StoreAgreement
from mooncake.control.errors import ArgumentError
from mooncake.control.wire import HEADER_BYTES, Header, Kind, OpCode

SECRET = "5ec7e7" * 8


@pytest.fixture
def ring():
    return auth.Keyring(auth.parse_secret(SECRET))


@pytest.mark.parametrize("bad, needle", [
    ("xyz", "hex digits"),
    ("ab" * 8, "16-64 bytes"),
    ("ab" * 65, "16-64 bytes"),
    ("00" * 32, "copies of one byte"),
    (1234, "hex string or bytes"),
])
def test_malformed_secret_names_the_argument(bad, needle):
    with pytest.raises(ArgumentError, match=needle) as info:
        auth.parse_secret(bad)
    assert auth.ENV in str(info.value)


def test_set_job_secret_and_env(monkeypatch):
    monkeypatch.delenv(auth.ENV, raising=False)
    assert auth.keyring() is None
    monkeypatch.setenv(auth.ENV, SECRET)
    assert auth.keyring() is auth.keyring()
    import mooncake.pg as pg
    with pytest.raises(ArgumentError, match=r"set_job_secret\(secret\)"):
        pg.set_job_secret("nothex")
    pg.set_job_secret(os.urandom(32))
    try:
        assert auth.keyring().fingerprint != auth.Keyring(auth.parse_secret(SECRET)).fingerprint
    finally:
        pg.set_job_secret(None)
    assert auth.keyring().fingerprint == auth.Keyring(auth.parse_secret(SECRET)).fingerprint


def _msg(header: Header, payload: bytes = b"") -> np.ndarray:
    buf = np.zeros(HEADER_BYTES + len(payload), np.uint8)
    header.pack_into(memoryview(buf))
    buf[HEADER_BYTES:] = np.frombuffer(payload, np.uint8)
    return buf


def test_wire_mac_binds_every_header_field(ring):
    w = ring.wire(7)
    h = Header(Kind.COLLECTIVE, OpCode.ALL_REDUCE, 7, 1, 0, 3, 42, 8, 5, 0)
    buf = _msg(h, b"\x01" * 8)
    w.sign(buf)
    assert w.verify(buf)
    assert Header.unpack(memoryview(buf)) == h  # the MAC lives in the header's padding
    for field, value in (("epoch", 4), ("seq", 43), ("src", 2), ("dst", 1), ("num_bytes", 16),
                         ("kind", Kind.DONE)):
        other = _msg(Header(**{**h.__dict__, field: value}), b"\x01" * 8)
        other[40:56] = buf[40:56]  # a recorded MAC moved onto another header
        assert not w.verify(other), field
    assert not ring.wire(8).verify(buf)  # another group
    assert not auth.Keyring(os.urandom(32)).wire(7).verify(buf)  # another job
    unsigned = _msg(h, b"\x01" * 8)
    assert not w.verify(unsigned)
    assert not w.verify(buf[:20])  # truncated


def test_control_messages_mac_their_payload(ring):
    w = ring.wire(7)
    h = Header(Kind.DONE, OpCode.ALL_REDUCE, 7, 1, 0, 0, 1, 4)
    buf = _msg(h, b"abcd")
    w.sign(buf, control=True)
    assert w.verify(buf, control=True)
    buf[-1] ^= 1
    assert not w.verify(buf, control=True)


def test_store_records_are_bound_to_their_key(ring):
    sealed = ring.seal("g/agree/1/report/0", b"record")
    assert ring.open("g/agree/1/report/0", sealed) == b"record"
    for key, raw in (("g/agree/2/report/0", sealed),       # replayed to another epoch
                     ("g/agree/1/report/1", sealed),       # ... or another rank
                     ("g/agree/1/report/0", sealed[:-1]),  # truncated
                     ("g/agree/1/report/0", b"record"),    # unsigned
                     ("g/agree/1/report/0", b"")):
        with pytest.raises(auth.AuthError):
            ring.open(key, raw)


def _store():
    return dist.HashStore()


def test_sealed_store_replaces_a_forged_first_write(ring):
    raw = _store()
    raw.set("k", b"forged by someone without the secret")
    s = auth.SealedStore(raw, ring)
    assert s.compare_set("k", "", b"mine") == b"mine"
    assert s.compare_set("k", "", b"late") == b"mine"  # the first authentic write wins
    with pytest.raises(auth.AuthError):
        auth.SealedStore(raw, auth.Keyring(os.urandom(32))).get("k")


def _decision(epoch, active, failed):
    return Decision(epoch, tuple(active), tuple(failed))


@pytest.mark.parametrize("forgery", ["forged", "garbage", "truncated", "replayed"])
def test_agreement_ignores_bad_decisions_and_reports(ring, forgery):
    raw = _store()
    sealed = auth.SealedStore(raw, ring)
    key = "p/agree/0/decision"
    if forgery == "forged":
        raw.set(key, _decision(1, [0], [1]).encode())  # evicts rank 1, unsigned
    elif forgery == "garbage":
        raw.set(key, os.urandom(100))
    elif forgery == "truncated":
        raw.set(key, ring.seal(key, _decision(1, [0], [1]).encode())[:-5])
    else:  # an authentic decision of another epoch copied here
        raw.set(key, ring.seal("p/agree/5/decision", _decision(1, [0], [1]).encode()))
    raw.set("p/agree/0/report/1", Report(0, 1, (), 0, suspects=frozenset({0})).encode())  # forged report
    agreement = StoreAgreement(sealed, "p")
    assert agreement.decision(0, (0, 1)) is None
    for r in (0, 1):
        agreement.report(Report(0, r, ((0, 3),), 3))
    decision = agreement.run(0, (0, 1), window_s=2.0)
    assert decision.active == (0, 1) and decision.failed == ()
    assert agreement.decision(0, (0, 1)) == decision


def test_without_a_secret_the_store_is_trusted():
    """The documented outcome without a secret: a forged decision is adopted."""
    raw = _store()
    raw.set("p/agree/0/decision", _decision(1, [0], [1]).encode())
    agreement = StoreAgreement(auth.wrap_store(raw, None) if auth.keyring() is None else raw, "p")
    decision = agreement.run(0, (0, 1), window_s=timedelta(seconds=1).total_seconds())
    assert decision.failed == (1,)
