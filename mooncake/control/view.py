"""Views: who takes part in a group's operations, and how that is derived at start-up.

A group has a fixed capacity ``C`` (``max_world_size``, else the world size) and a view
``(epoch, active ranks)``.  Views change only between operations, and every member adopts a new
view at the same operation sequence number.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class View:
    """An epoch-numbered active set over ``capacity`` rank slots."""

    epoch: int
    capacity: int
    active: tuple[int, ...]  # ascending group ranks

    def is_active(self, rank: int) -> bool:
        return rank in self.active

    def mask(self) -> list[int]:
        return [1 if r in self.active else 0 for r in range(self.capacity)]

    @property
    def visible_size(self) -> int:
        """``dist.get_world_size()``: highest active rank + 1."""
        return self.active[-1] + 1 if self.active else 0


def initial_view(mask: Sequence[int] | None, world_size: int, capacity: int, rank: int,
                 is_extension: bool) -> View:
    """The view a rank starts in.

    * An extension rank (``is_extension=True``) is local-only: its view is just itself until
      ``join_group`` returns.
    * Otherwise the active set is ``{r < world_size : mask[r] == 1}``; slots at or above
      ``world_size`` are reserved and start inactive whatever the mask says; no mask, or an
      all-zero mask (upstream's test default), means every rank below ``world_size`` is active.
    """
    if is_extension:
        return View(epoch=0, capacity=capacity, active=(rank,))
    if mask is None or not any(mask):
        active = tuple(range(world_size))
    else:
        active = tuple(r for r in range(world_size) if mask[r])
    return View(epoch=0, capacity=capacity, active=active)
