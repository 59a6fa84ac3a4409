"""Compatibility import path of upstream Mooncake: ``from mooncake.mooncake_ep_buffer import Buffer``."""

from .ep import Buffer, EventOverlap

__all__ = ["Buffer", "EventOverlap"]
