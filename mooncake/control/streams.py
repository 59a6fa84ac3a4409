"""The current CUDA stream, cheaply: the PG face and the CUDA plane switch streams on every operation.

``torch.cuda.stream(s)`` and ``torch.cuda.current_stream()`` cost microseconds each in Python (device
parsing, a new Stream object, the previous stream saved and restored); on the hot path the stream asked
for is almost always current already, which ``is_current`` tells from torch's C accessors.
"""

from __future__ import annotations

import contextlib

import torch

_current_stream = getattr(torch._C, "_cuda_getCurrentStream", None)  # (stream id, device, type)
_current_device = getattr(torch._C, "_cuda_getDevice", None)


def is_current(stream) -> bool:
    """``stream`` (a ``torch.cuda.Stream``) is the current stream and its device the current device."""
    index = stream.device_index
    if _current_stream is None or _current_device is None:
        return torch.cuda.current_device() == index and torch.cuda.current_stream(index) == stream
    return _current_device() == index and _current_stream(index)[0] == stream.stream_id


_current: dict[int, tuple] = {}  # device -> (torch's (stream id, device, type), that Stream); swapped whole


def current_stream(index: int):
    """``torch.cuda.current_stream(index)``, the Stream object reused while the same stream stays current
    (torch makes a new one on every call)."""
    if _current_stream is None:
        return torch.cuda.current_stream(index)
    key = _current_stream(index)
    have = _current.get(index)
    if have is None or have[0] != key:
        have = _current[index] = (key, torch.cuda.current_stream(index))
    return have[1]


def on_stream(stream) -> contextlib.AbstractContextManager:
    """Make ``stream`` current for the block (``torch.cuda.stream``); nothing to do when it already is,
    or when ``stream`` is None."""
    if stream is None or is_current(stream):
        return contextlib.nullcontext()
    return torch.cuda.stream(stream)
