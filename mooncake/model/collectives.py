"""The PG collective contract as code: a global view of every collective.

Each function takes every rank's inputs at once and returns every rank's outputs.  Ranks are the group
ranks ``0..C-1``, where ``C = len(active)`` is the capacity and ``active`` holds one 0/1 (or bool) entry per
rank.  Per-rank arguments are sequences of length ``C`` whose entries at inactive ranks are ignored (they
may be None); outputs are lists of length ``C`` with None at inactive ranks, which take no part.  "Slot"
ops (all_gather, gather, all_to_all, all_to_all_single and the slot lists of scatter / reduce_scatter)
have ``k`` slots, one per rank index, where ``num_slots`` picks ``k`` with ``size <= k <= C`` (``size`` =
highest active rank + 1; default ``C``); the slot of an inactive rank is zero-filled on output and
ignored on input.  Every reduction is ``reduce.fold`` over the active ranks in ascending order.  Results
are new contiguous tensors of the inputs' dtype, never aliases of inputs or of each other.  Malformed
arguments raise ValueError naming the argument and the expected value; a rooted op whose root is
inactive raises RootInactiveError.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, Callable

import torch

from mooncake.model.reduce import DTYPE_CODES, ReduceOp, check_reducible, fold

__all__ = [
    "RootInactiveError",
    "all_gather",
    "all_gather_into_tensor",
    "all_reduce",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "broadcast",
    "gather",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
]


class RootInactiveError(ValueError):
    """The root (src/dst) of a rooted collective is not in the active set; raised on every caller."""


# --- argument checks ---------------------------------------------------------------------------------


def _view(active: Any) -> tuple[int, list[int]]:
    """The capacity C and the ascending active ranks of an active mask."""
    if isinstance(active, torch.Tensor):
        if active.dim() != 1:
            raise ValueError(f"active must be a 1-D mask of length C, got shape {tuple(active.shape)}")
        active = active.tolist()
    if not isinstance(active, Sequence) or len(active) == 0:
        raise ValueError(f"active must be a non-empty sequence of 0/1 entries, one per rank, got {active!r}")
    for i, v in enumerate(active):
        if isinstance(v, torch.Tensor) or v not in (0, 1):
            raise ValueError(f"active[{i}] must be 0 or 1, got {v!r}")
    ranks = [i for i, v in enumerate(active) if v]
    if not ranks:
        raise ValueError(f"active must mark at least one rank active, got {list(active)}")
    return len(active), ranks


def _check_len(name: str, values: Any, expected: int, meaning: str) -> None:
    if not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a sequence of length {expected} ({meaning}), got {type(values).__name__}")
    if len(values) != expected:
        raise ValueError(f"{name} must have length {expected} ({meaning}), got {len(values)}")


def _num_slots(num_slots: Any, capacity: int, ranks: list[int]) -> int:
    """The slot count k, checked to lie in [size, C]."""
    if num_slots is None:
        return capacity
    size = ranks[-1] + 1
    try:
        k = operator.index(num_slots)
    except TypeError:
        k = None
    if k is None or not size <= k <= capacity:
        raise ValueError(
            f"num_slots must be an int in [{size}, {capacity}] (highest active rank + 1 .. capacity C), "
            f"got {num_slots!r}"
        )
    return k


def _root(name: str, root: Any, capacity: int, ranks: list[int]) -> int:
    try:
        value = operator.index(root)
    except TypeError:
        value = -1
    if isinstance(root, bool) or not 0 <= value < capacity:
        raise ValueError(f"{name} must be a group rank in [0, {capacity}), got {root!r}")
    if value not in ranks:
        raise RootInactiveError(f"root {name}={value} is inactive (active ranks: {ranks})")
    return value


def _uniform(labelled: list[tuple[str, Any]], same_dim0: bool = True) -> list[torch.Tensor]:
    """The tensors of ``(label, value)`` pairs, checked to share one supported dtype and one shape.

    With ``same_dim0=False`` only the dims after dim 0 must agree (and every tensor needs a dim 0).
    The first pair (the lowest active rank's) sets the expected dtype and shape.
    """
    for label, value in labelled:
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{label} must be a tensor (entries of active ranks are used), got {type(value).__name__}")
    ref_label, ref = labelled[0]
    if ref.dtype not in DTYPE_CODES:
        supported = ", ".join(map(str, DTYPE_CODES))
        raise ValueError(f"{ref_label} has dtype {ref.dtype}; expected one of {supported}")
    if not same_dim0 and ref.dim() == 0:
        raise ValueError(f"{ref_label} must have at least one dimension, got a 0-d tensor")
    start = 0 if same_dim0 else 1
    for label, value in labelled[1:]:
        if value.dtype != ref.dtype:
            raise ValueError(f"{label} has dtype {value.dtype}, expected {ref.dtype} (the dtype of {ref_label})")
        if value.dim() != ref.dim() or value.shape[start:] != ref.shape[start:]:
            what = "shape" if same_dim0 else "shape after dim 0"
            raise ValueError(
                f"{label} has shape {tuple(value.shape)}, expected {what} "
                f"{tuple(ref.shape[start:])} (that of {ref_label})"
            )
    return [value for _, value in labelled]


def _reduce_op(op: Any, dtype: torch.dtype) -> ReduceOp:
    try:
        op = ReduceOp(op)
    except ValueError:
        raise ValueError(f"op must be a ReduceOp ({', '.join(o.name for o in ReduceOp)}), got {op!r}") from None
    reason = check_reducible(op, dtype)
    if reason:
        raise ValueError(f"op {op.name} cannot reduce {dtype} inputs: {reason}")
    return op


def _split_sizes(name: str, sizes: Any, k: int, total: int | None) -> list[int]:
    """A list of k non-negative ints, checked to add up to ``total`` when it is given."""
    _check_len(name, sizes, k, "one block size per slot")
    out = []
    for i, v in enumerate(sizes):
        try:
            n = operator.index(v)
        except TypeError:
            n = -1
        if isinstance(v, bool) or n < 0:
            raise ValueError(f"{name}[{i}] must be a non-negative int, got {v!r}")
        out.append(n)
    if total is not None and sum(out) != total:
        raise ValueError(f"{name} must add up to {total} (dim 0 of the input), got sum {sum(out)} from {out}")
    return out


# --- output helpers ----------------------------------------------------------------------------------


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.clone(memory_format=torch.contiguous_format)


def _zeros(like: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    shape = like.shape if rows is None else (rows, *like.shape[1:])
    return torch.zeros(shape, dtype=like.dtype, device=like.device)


def _each(capacity: int, ranks: list[int], produce: Callable[[int], Any]) -> list[Any]:
    members = set(ranks)
    return [produce(r) if r in members else None for r in range(capacity)]


def _gathered(values: Any, ranks: list[int], k: int, like: torch.Tensor) -> list[torch.Tensor]:
    """k fresh slots: a copy of ``values[s]`` (indexable by rank) for active s, zeros otherwise."""
    members = set(ranks)
    return [_copy(values[s]) if s in members else _zeros(like) for s in range(k)]


# --- collectives -------------------------------------------------------------------------------------


def all_reduce(inputs: Sequence[Any], op: ReduceOp, active: Any) -> list[torch.Tensor | None]:
    """Every active rank gets ``fold(op, inputs of the active ranks in ascending order)``.

    All active inputs share one dtype and shape; each rank gets its own copy of the same bits.
    """
    capacity, ranks = _view(active)
    _check_len("inputs", inputs, capacity, "one entry per rank")
    xs = _uniform([(f"inputs[{r}]", inputs[r]) for r in ranks])
    result = fold(_reduce_op(op, xs[0].dtype), xs)
    return _each(capacity, ranks, lambda r: _copy(result))


def broadcast(inputs: Sequence[Any], src: int, active: Any) -> list[torch.Tensor | None]:
    """Every active rank gets a copy of ``inputs[src]``.

    Every active rank passes a tensor of the root's dtype and shape; an inactive ``src`` raises
    RootInactiveError.
    """
    capacity, ranks = _view(active)
    _check_len("inputs", inputs, capacity, "one entry per rank")
    src = _root("src", src, capacity, ranks)
    _uniform([(f"inputs[{r}]", inputs[r]) for r in ranks])
    return _each(capacity, ranks, lambda r: _copy(inputs[src]))


def reduce(inputs: Sequence[Any], op: ReduceOp, dst: int, active: Any) -> list[torch.Tensor | None]:
    """The root ``dst`` gets the fold of the active inputs (as all_reduce); other active ranks get a
    copy of their own input unchanged.  An inactive ``dst`` raises RootInactiveError.
    """
    capacity, ranks = _view(active)
    _check_len("inputs", inputs, capacity, "one entry per rank")
    dst = _root("dst", dst, capacity, ranks)
    xs = _uniform([(f"inputs[{r}]", inputs[r]) for r in ranks])
    result = fold(_reduce_op(op, xs[0].dtype), xs)
    return _each(capacity, ranks, lambda r: result if r == dst else _copy(inputs[r]))


def all_gather(inputs: Sequence[Any], active: Any, num_slots: int | None = None) -> list[list[torch.Tensor] | None]:
    """Every active rank gets k slots (k = ``num_slots``, default C): slot s is a copy of ``inputs[s]``
    for an active s and zeros of the common dtype and shape for an inactive s.
    """
    capacity, ranks = _view(active)
    _check_len("inputs", inputs, capacity, "one entry per rank")
    k = _num_slots(num_slots, capacity, ranks)
    xs = _uniform([(f"inputs[{r}]", inputs[r]) for r in ranks])
    return _each(capacity, ranks, lambda r: _gathered(inputs, ranks, k, xs[0]))


def all_gather_into_tensor(
    inputs: Sequence[Any], active: Any, num_slots: int | None = None
) -> list[torch.Tensor | None]:
    """Every active rank gets the k slots of all_gather concatenated along dim 0 (a 0-d input counts
    as shape (1,)), so the output has k times the input's dim 0.
    """
    capacity, ranks = _view(active)
    _check_len("inputs", inputs, capacity, "one entry per rank")
    k = _num_slots(num_slots, capacity, ranks)
    xs = _uniform([(f"inputs[{r}]", inputs[r]) for r in ranks])
    return _each(capacity, ranks, lambda r: torch.cat(list(map(torch.atleast_1d, _gathered(inputs, ranks, k, xs[0])))))


def gather(
    inputs: Sequence[Any], dst: int, active: Any, num_slots: int | None = None
) -> list[list[torch.Tensor] | None]:
    """The root ``dst`` gets the k slots of all_gather; every other rank gets None.  An inactive
    ``dst`` raises RootInactiveError.
    """
    capacity, ranks = _view(active)
    _check_len("inputs", inputs, capacity, "one entry per rank")
    dst = _root("dst", dst, capacity, ranks)
    k = _num_slots(num_slots, capacity, ranks)
    xs = _uniform([(f"inputs[{r}]", inputs[r]) for r in ranks])
    return [_gathered(inputs, ranks, k, xs[0]) if r == dst else None for r in range(capacity)]


def scatter(
    scatter_list: Sequence[Any], src: int, active: Any, num_slots: int | None = None
) -> list[torch.Tensor | None]:
    """``scatter_list`` is the root's list of k slots (k = ``num_slots``, default C); every active rank
    r gets a copy of ``scatter_list[r]``.  Slots of inactive ranks are ignored (may be None); the
    active ones share one dtype and shape.  An inactive ``src`` raises RootInactiveError.
    """
    capacity, ranks = _view(active)
    src = _root("src", src, capacity, ranks)
    k = _num_slots(num_slots, capacity, ranks)
    _check_len("scatter_list", scatter_list, k, "one slot per rank, num_slots")
    _uniform([(f"scatter_list[{r}]", scatter_list[r]) for r in ranks])
    return _each(capacity, ranks, lambda r: _copy(scatter_list[r]))


def reduce_scatter(
    inputs: Sequence[Any], op: ReduceOp, active: Any, num_slots: int | None = None
) -> list[torch.Tensor | None]:
    """``inputs[s]`` is rank s's list of k slots; active rank r gets ``fold(op, [inputs[s][r] for
    active s ascending])``.  Slots addressed to inactive ranks are ignored (may be None); all used
    slots share one dtype and shape.
    """
    capacity, ranks = _view(active)
    _check_len("inputs", inputs, capacity, "one entry per rank")
    k = _num_slots(num_slots, capacity, ranks)
    for s in ranks:
        _check_len(f"inputs[{s}]", inputs[s], k, "one slot per rank, num_slots")
    xs = _uniform([(f"inputs[{s}][{r}]", inputs[s][r]) for s in ranks for r in ranks])
    op = _reduce_op(op, xs[0].dtype)
    return _each(capacity, ranks, lambda r: fold(op, [inputs[s][r] for s in ranks]))


def reduce_scatter_tensor(
    inputs: Sequence[Any], op: ReduceOp, active: Any, num_slots: int | None = None
) -> list[torch.Tensor | None]:
    """Each input is split along dim 0 into k equal chunks (k = ``num_slots``, default C); active
    rank r gets ``fold(op, [chunk r of inputs[s] for active s ascending])``.
    """
    capacity, ranks = _view(active)
    _check_len("inputs", inputs, capacity, "one entry per rank")
    k = _num_slots(num_slots, capacity, ranks)
    xs = _uniform([(f"inputs[{r}]", inputs[r]) for r in ranks])
    if xs[0].dim() == 0 or xs[0].shape[0] % k:
        raise ValueError(
            f"inputs[{ranks[0]}] must split into num_slots={k} equal chunks along dim 0, "
            f"so its dim 0 must be a multiple of {k}; got shape {tuple(xs[0].shape)}"
        )
    op = _reduce_op(op, xs[0].dtype)
    rows = xs[0].shape[0] // k
    return _each(capacity, ranks, lambda r: fold(op, [x.narrow(0, r * rows, rows) for x in xs]))


def all_to_all(inputs: Sequence[Any], active: Any, num_slots: int | None = None) -> list[list[torch.Tensor] | None]:
    """``inputs[s]`` is rank s's list of k slots; active rank r gets k slots with slot s a copy of
    ``inputs[s][r]`` for an active s and zeros for an inactive s.  All used slots share one dtype and
    shape (ragged exchanges go through all_to_all_single); slots addressed to inactive ranks are ignored.
    """
    capacity, ranks = _view(active)
    _check_len("inputs", inputs, capacity, "one entry per rank")
    k = _num_slots(num_slots, capacity, ranks)
    for s in ranks:
        _check_len(f"inputs[{s}]", inputs[s], k, "one slot per rank, num_slots")
    xs = _uniform([(f"inputs[{s}][{r}]", inputs[s][r]) for s in ranks for r in ranks])
    return _each(capacity, ranks, lambda r: _gathered({s: inputs[s][r] for s in ranks}, ranks, k, xs[0]))


def all_to_all_single(
    inputs: Sequence[Any],
    active: Any,
    input_splits: Sequence[Any] | None = None,
    output_splits: Sequence[Any] | None = None,
    num_slots: int | None = None,
) -> list[torch.Tensor | None]:
    """Rank s's input is cut along dim 0 into k blocks (sizes ``input_splits[s]``, or k equal blocks
    when that is None); active rank r gets the concatenation over s < k of block r of rank s's input,
    with a zero block of ``output_splits[r][s]`` rows for an inactive s.  ``output_splits[r]`` (None =
    equal blocks, whose size every active sender must then agree on) must match what each active s sends.
    """
    capacity, ranks = _view(active)
    _check_len("inputs", inputs, capacity, "one entry per rank")
    k = _num_slots(num_slots, capacity, ranks)
    xs = _uniform([(f"inputs[{r}]", inputs[r]) for r in ranks], same_dim0=False)
    for name, splits in (("input_splits", input_splits), ("output_splits", output_splits)):
        if splits is not None:
            _check_len(name, splits, capacity, "one entry per rank, each None or k block sizes")

    sent: dict[int, list[int]] = {}  # sender s -> the k block sizes it cuts its input into
    for s in ranks:
        rows = inputs[s].shape[0]
        if input_splits is not None and input_splits[s] is not None:
            sent[s] = _split_sizes(f"input_splits[{s}]", input_splits[s], k, rows)
        elif rows % k:
            raise ValueError(
                f"inputs[{s}] has dim 0 = {rows}, which does not split into num_slots={k} equal blocks; "
                f"pass input_splits[{s}]"
            )
        else:
            sent[s] = [rows // k] * k

    def received(r: int) -> torch.Tensor:
        incoming = {s: sent[s][r] for s in ranks}
        if output_splits is not None and output_splits[r] is not None:
            sizes = _split_sizes(f"output_splits[{r}]", output_splits[r], k, None)
            for s, n in incoming.items():
                if sizes[s] != n:
                    raise ValueError(f"output_splits[{r}][{s}] must be {n} (the rows rank {s} sends to rank {r}), "
                                     f"got {sizes[s]}")
        elif len(set(incoming.values())) > 1:
            raise ValueError(f"output_splits[{r}] is None (equal blocks) but the active ranks send rank {r} "
                             f"different row counts {incoming}; pass output_splits[{r}]")
        else:
            sizes = [incoming[r]] * k
        blocks = []
        for s in range(k):
            if s in incoming:
                blocks.append(inputs[s].narrow(0, sum(sent[s][:r]), sizes[s]))
            else:
                blocks.append(_zeros(xs[0], sizes[s]))
        return torch.cat(blocks)

    return _each(capacity, ranks, received)


def barrier(active: Any) -> None:
    """Returns once every active rank has entered; it carries no data (the model only checks ``active``)."""
    _view(active)
