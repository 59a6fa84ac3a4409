"""Expert-parallel dispatch / combine: ``Buffer`` and ``EventOverlap`` (docs/ep-semantics.md)."""

from .buffer import Buffer, EventOverlap, Handle

__all__ = ["Buffer", "EventOverlap", "Handle"]
