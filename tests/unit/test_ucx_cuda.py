"""Whether the ref plane hands CUDA memory to UCX: the decision, its override, the buffer chosen per
message, the CUDA groups' hand-over and the doctor's line -- all checked without a GPU (fakes stand in
for a CUDA-capable UCX context)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

ucx = pytest.importorskip("mooncake.ref.ucx")

from mooncake import doctor  # noqa: E402
from mooncake.control.errors import ArgumentError, MooncakeError  # noqa: E402
from mooncake.control.wire import HEADER_BYTES, Header, Kind, OpCode  # noqa: E402
from mooncake.model.reduce import DTYPE_CODES  # noqa: E402
from mooncake.ref import collectives, exchange, p2p  # noqa: E402

HOST = 1 << 0
HOST_AND_CUDA = (1 << 0) | (1 << 1)
CUDA_INFO = """#
# UCP context
#
#     component 0  :  self
#     component 1  :  tcp
#     component 2  :  cuda_cpy
#     component 3  :  cuda_ipc
#
#      resource 0  :  md 0  dev 0  flags -- self/memory
#      resource 1  :  md 1  dev 1  flags -- tcp/lo
#      resource 2  :  md 2  dev 2  flags -- cuda_copy/cuda
#      resource 3  :  md 3  dev 3  flags -- cuda_ipc/cuda
#      resource 4  :  md 4  dev 3  flags -- gdr_copy/cuda
#
"""


@pytest.fixture(autouse=True)
def no_override(monkeypatch):
    monkeypatch.delenv(ucx.CUDA_ENV, raising=False)


def choice(on: bool, mode: str = "auto", reason: str = "test") -> ucx.CudaChoice:
    return ucx.CudaChoice(on, mode, reason, HOST_AND_CUDA if on else HOST, ("cuda_copy",) if on else ())


# ------------------------------------------------------------------------------------------ decision

@pytest.mark.parametrize("mode, gpu, mem_types, transports, on, needle", [
    ("auto", True, HOST_AND_CUDA, ("cuda_copy", "cuda_ipc"), True, "cuda_copy, cuda_ipc"),
    ("on", True, HOST_AND_CUDA, ("cuda_copy",), True, "UCX takes CUDA memory"),
    ("off", True, HOST_AND_CUDA, ("cuda_copy",), False, "MOONCAKE_UCX_CUDA=off"),
    ("auto", False, HOST_AND_CUDA, ("cuda_copy",), False, "no CUDA device"),
    ("auto", True, None, ("cuda_copy",), False, "could not ask UCX"),
    ("auto", True, HOST, ("cuda_copy",), False, "does not support CUDA memory"),
    ("auto", True, HOST_AND_CUDA, ("cuda_ipc",), False, "no cuda_copy transport"),
])
def test_decide(mode, gpu, mem_types, transports, on, needle):
    got = ucx.decide_cuda(mode, gpu, mem_types, transports)
    assert got.on is on and got.mode == mode and needle in got.reason, got
    assert (got.memory_types, got.transports) == (mem_types, transports)


@pytest.mark.parametrize("raw, mode", [(None, "auto"), ("", "auto"), ("ON", "on"), (" off ", "off"), ("auto", "auto")])
def test_mode_from_env(monkeypatch, raw, mode):
    if raw is not None:
        monkeypatch.setenv(ucx.CUDA_ENV, raw)
    assert ucx.cuda_mode() == mode


def test_bad_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(ucx.CUDA_ENV, "yes")
    with pytest.raises(ArgumentError, match=r"MOONCAKE_UCX_CUDA must be one of auto, on, off, got 'yes'"):
        ucx.cuda_mode()


def test_cuda_transports_from_context_info():
    assert ucx.cuda_transports(CUDA_INFO) == ("cuda_copy", "cuda_ipc", "gdr_copy")
    assert ucx.cuda_transports("#      resource 0  :  md 0  dev 0  flags -- tcp/lo\n") == ()


def test_this_machine_stages():
    """The real context: UCX reports host memory; without a GPU nothing goes to UCX in device memory."""
    engine = ucx.engine()
    assert engine.cuda.memory_types is not None and engine.cuda.memory_types & HOST
    if not torch.cuda.is_available():
        assert not engine.cuda.on and engine.cuda.reason == "torch sees no CUDA device"
    assert ucx.cuda_choice(engine.context) == engine.cuda


def test_on_that_cannot_be_honoured_fails_a_cuda_group():
    engine = SimpleNamespace(cuda=choice(False, "on", "UCX does not support CUDA memory here"))
    with pytest.raises(MooncakeError, match="MOONCAKE_UCX_CUDA=on, but CUDA memory cannot go to UCX: UCX does not"):
        ucx.Engine.check_cuda(engine)
    engine.check_cuda = lambda: ucx.Engine.check_cuda(engine)
    with pytest.raises(MooncakeError):
        collectives.RefGroup(SimpleNamespace(device="cuda", engine=engine))
    assert not collectives.RefGroup(SimpleNamespace(device="cpu", engine=engine)).takes_device_tensors


@pytest.mark.parametrize("device, on, takes", [("cuda", True, True), ("cuda", False, False), ("cpu", True, False)])
def test_group_takes_device_tensors(device, on, takes):
    engine = SimpleNamespace(cuda=choice(on))
    engine.check_cuda = lambda: ucx.Engine.check_cuda(engine)
    assert collectives.RefGroup(SimpleNamespace(device=device, engine=engine)).takes_device_tensors is takes


def test_p2p_takes_device_tensors_only_where_ucx_does():
    assert not p2p.takes_device_tensors(SimpleNamespace(cuda=choice(True)), torch.ones(2))
    assert not p2p.takes_device_tensors(SimpleNamespace(cuda=choice(False)), torch.ones(2))


def _cuda_like(num_bytes: int):
    return SimpleNamespace(is_cuda=True, numel=lambda: num_bytes // 4, element_size=lambda: 4)


def test_p2p_stages_small_cuda_messages():
    """Device memory only from P2P_DEVICE_MIN_BYTES on (smaller ones were slower that way)."""
    on, off = SimpleNamespace(cuda=choice(True)), SimpleNamespace(cuda=choice(False))
    assert not p2p.takes_device_tensors(on, _cuda_like(p2p.P2P_DEVICE_MIN_BYTES - 4))
    assert p2p.takes_device_tensors(on, _cuda_like(p2p.P2P_DEVICE_MIN_BYTES))
    assert not p2p.takes_device_tensors(off, _cuda_like(p2p.P2P_DEVICE_MIN_BYTES))


# ------------------------------------------------------------------------------------------ buffers

CUDA0 = torch.device("cuda", 0)


@pytest.mark.parametrize("device, num_bytes, cuda_on, mac_payload, want", [
    (CUDA0, 8, True, False, True),
    (CUDA0, 8, False, False, False),        # UCX without CUDA: staged
    (CUDA0, 8, True, True, False),          # MOONCAKE_AUTH_PAYLOAD=1 MACs payload bytes on the host
    (CUDA0, 0, True, False, False),         # header-only messages stay on the host
    (torch.device("cpu"), 8, True, False, False),
    (None, 8, True, False, False),
])
def test_message_memory(device, num_bytes, cuda_on, mac_payload, want):
    assert exchange.on_device(device, num_bytes, cuda_on, mac_payload) is want


class _FakeRequest:
    completed = False

    def __init__(self, buffer):
        self.buffer, self.head = buffer, None

    def error(self):
        return None


class _FakeEngine:
    """A UCX engine that takes CUDA memory and records what is posted."""

    def __init__(self, on: bool):
        self.cuda = choice(on)
        self.posted: list[tuple[str, int, object]] = []

    def send(self, peer, tag, buffer):
        self.posted.append(("send", tag, buffer))
        return _FakeRequest(buffer)

    def recv(self, peer, tag, buffer):
        self.posted.append(("recv", tag, buffer))
        return _FakeRequest(buffer)


def _exchange(on: bool) -> list:
    payload = torch.arange(6, dtype=torch.float32)
    header = Header(Kind.P2P, OpCode.SEND, 7, 0, 1, 0, 3, payload.numel() * 4, DTYPE_CODES[payload.dtype], 0, 5)
    expected = Header(Kind.P2P, OpCode.SEND, 7, 1, 0, 0, 3, 24, DTYPE_CODES[payload.dtype], 0, 5)
    engine = _FakeEngine(on)
    exchange.Exchange(engine, {1: None}, "test", {1: (header, payload)}, {1: expected},
                      recv_devices={}, stream=None)
    return engine.posted


def test_host_tensors_keep_host_messages_when_ucx_takes_cuda():
    """Host tensors travel in host buffers, byte for byte as when UCX cannot take CUDA memory."""
    with_cuda, without = _exchange(True), _exchange(False)
    assert [k for k, _, _ in with_cuda] == [k for k, _, _ in without] == ["recv", "send"]
    assert [t for _, t, _ in with_cuda] == [t for _, t, _ in without]
    for (_, _, a), (_, _, b) in zip(with_cuda, without):
        assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and len(a) == len(b)
    sent = with_cuda[-1][2]
    assert bytes(sent) == bytes(without[-1][2])
    assert Header.unpack(memoryview(sent)).num_bytes == 24
    assert torch.equal(exchange.payload_tensor(sent, torch.float32, (6,)), torch.arange(6, dtype=torch.float32))
    assert len(with_cuda[0][2]) == HEADER_BYTES + 24


def test_cpu_tensors_have_no_op_stream():
    ctx = SimpleNamespace(group_key=1, seq=4)
    assert collectives.op_stream(ctx, torch.ones(3)) is None


# ------------------------------------------------------------------------------------------ doctor

def _doctor(monkeypatch, cuda_memory, gpu: bool = True):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    return doctor.check_ucx_cuda({"cuda_memory": cuda_memory})


def test_doctor_line_device_memory(monkeypatch):
    [line] = _doctor(monkeypatch, choice(True, reason="UCX takes CUDA memory (transports: cuda_copy)")._asdict())
    assert (line.name, line.verdict) == ("ucx.cuda", "ok")
    assert line.summary == "CUDA tensors go to UCX in device memory: UCX takes CUDA memory (transports: cuda_copy)"


def test_doctor_line_staged_with_a_gpu_warns(monkeypatch):
    [line] = _doctor(monkeypatch, choice(False, reason="UCX has no cuda_copy transport")._asdict())
    assert line.verdict == "warn" and "staged through host memory: UCX has no cuda_copy" in line.summary
    assert "libucx-cu13" in line.fix


def test_doctor_line_off_is_ok(monkeypatch):
    monkeypatch.setenv(ucx.CUDA_ENV, "off")
    [line] = _doctor(monkeypatch, choice(False, "off", "MOONCAKE_UCX_CUDA=off: ...")._asdict())
    assert line.verdict == "ok" and line.details["MOONCAKE_UCX_CUDA"] == "off"


def test_doctor_line_on_unavailable_fails(monkeypatch):
    monkeypatch.setenv(ucx.CUDA_ENV, "on")
    [line] = _doctor(monkeypatch, choice(False, "on", "torch sees no CUDA device")._asdict(), gpu=False)
    assert line.verdict == "fail" and "MOONCAKE_UCX_CUDA=on" in line.summary and line.fix


def test_doctor_line_bad_value_fails(monkeypatch):
    monkeypatch.setenv(ucx.CUDA_ENV, "maybe")
    [line] = _doctor(monkeypatch, {"error": "ArgumentError: MOONCAKE_UCX_CUDA must be one of auto, on, off"})
    assert line.verdict == "fail" and "auto, on or off" in line.fix


def test_doctor_no_line_without_gpu_or_override(monkeypatch):
    assert _doctor(monkeypatch, choice(False)._asdict(), gpu=False) == []


def test_doctor_probe_reports_the_choice():
    """The UCX probe (a child process) carries the engine's decision for the ucx.cuda line."""
    check, result = doctor.check_ucx(doctor.DEFAULT_TIMEOUT_S)
    assert check.verdict == "ok", check
    memory = result["cuda_memory"]
    assert set(memory) == set(ucx.CudaChoice._fields) and memory["mode"] == "auto"
    if not torch.cuda.is_available():
        assert memory["on"] is False


class _LostRequest(_FakeRequest):
    """A receive that a lost connection ended."""
    completed = True

    def error(self):
        return ConnectionResetError("peer gone")


class _DoneRequest(_FakeRequest):
    completed = True


class _CollectiveEngine(_FakeEngine):
    """Rank 0 of three: rank 1's payload arrives, rank 2's connection is lost before its payload did."""

    def __init__(self, heads: dict):
        super().__init__(False)
        self.heads = heads  # tag -> the header rank 1's message carries

    def recv(self, peer, tag, buffer):
        self.posted.append(("recv", tag, buffer))
        if peer == 2:
            return _LostRequest(buffer)
        if tag in self.heads:
            self.heads[tag].pack_into(memoryview(buffer))
        return _DoneRequest(buffer)

    def send(self, peer, tag, buffer):
        self.posted.append(("send", tag, buffer))
        return _DoneRequest(buffer)


def test_a_lost_payload_sends_no_done():
    """A rank whose receive from a peer ended with a lost connection must not say DONE: a peer that has
    everything could otherwise commit the op while this rank lacks that payload (two verdicts)."""
    payload = torch.arange(4, dtype=torch.float32)
    code = DTYPE_CODES[payload.dtype]

    def header(src, dst, kind=Kind.COLLECTIVE, num_bytes=16):
        return Header(kind, OpCode.ALL_REDUCE, 7, src, dst, 0, 9, num_bytes, code, 0)

    engine = _CollectiveEngine({header(1, 0).tag(): header(1, 0)})
    ex = exchange.Exchange(engine, {1: 1, 2: 2}, "all_reduce", {p: (header(0, p), payload) for p in (1, 2)},
                           {p: header(p, 0) for p in (1, 2)}, {p: header(p, 0, Kind.DONE, 0) for p in (1, 2)},
                           me=0, recv_devices={}, stream=None)
    ex.progress()
    dones = [b for kind, tag, b in engine.posted if kind == "send" and Header.unpack(memoryview(b)).kind is Kind.DONE]
    assert dones == [] and not ex.data_complete and not ex.committed
    assert ex.failed_peers() == frozenset({2})
