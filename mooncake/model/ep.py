"""The EP (expert-parallel) contract as code: deterministic low-latency dispatch and combine.

Symbols: ``R`` ranks, ``E`` experts, ``L = E // R`` local experts per rank (expert ``e`` lives on rank
``e // L`` as local expert ``e % L``), ``T = num_max_dispatch_tokens_per_rank``, ``H`` hidden size,
``K`` top-k, ``N_r <= T`` tokens on rank ``r``, ``S = H // 128`` FP8 scale blocks.

The math is split into local pieces that a distributed implementation calls one rank at a time
(``select_rows_for_expert`` on the sender and ``place_dispatch`` on the receiver; ``combine_block`` on the
expert owner, ``place_combine``, ``combine_entry_active`` and ``combine_rows`` on the token owner).
``dispatch`` and ``combine`` compose them into a global view over all ranks, which tests and the
ref/fast data planes compare against bit for bit.

Order: inside local expert ``l``'s region, blocks are ordered by ascending source rank and rows inside a
block by ascending token index; ``layout_range[l, s] = (begin << 32) | count`` with ``begin`` the exclusive
prefix of the counts of lower sources (also when ``count == 0``).  Failure: a caller mask ``active_ranks``
(int32 [R], 1 = alive) and a simulated set ``failed`` of ranks that never respond; source ``s`` contributes
iff ``active_ranks[s] == 1 and s not in failed``, and the returned mask has ``failed`` ranks set to 0.
Only valid rows (``[:recv_count[l]]``) are normative; padding is filled with zeros (scales 0, ``src_info`` -1) so
that debugging is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AbstractSet, Mapping, Sequence

import torch

from mooncake.model.fp8 import FP8_BLOCK_CHANNELS, quantize_fp8

_COUNT_MASK = 0xFFFFFFFF


@dataclass
class DispatchResult:
    """What one rank receives from ``dispatch`` (upstream's returned tensors plus the handle's tensors).

    Attributes:
        recv_x: ``[L, R*T, H]`` float8_e4m3fn (FP8) or bfloat16; row ``i < recv_count[l]`` of expert ``l``
            is token ``src_info[l, i]`` of the source whose ``layout_range[l, s]`` covers ``i``.
        recv_scales: ``[L, R*T, S]`` float32 ``scale_inv`` with upstream's column-major storage (strides
            ``(S*R*T, 1, R*T)``); None for bf16 dispatch.
        recv_count: ``[L]`` int32, rows received per local expert.
        src_info: ``[L, R*T]`` int32, source token index of each received row.
        layout_range: ``[L, R]`` int64, ``(begin << 32) | count`` of each source's block.
    """

    recv_x: torch.Tensor
    recv_scales: torch.Tensor | None
    recv_count: torch.Tensor
    src_info: torch.Tensor
    layout_range: torch.Tensor


def get_ep_buffer_size_hint(
    num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
) -> int:
    """Bytes of communication buffer that upstream Mooncake asks for: ``16*E + 4*E*T*(2*H + 32)``.

    ``num_ranks`` is accepted for signature compatibility and not used (as upstream).
    """
    del num_ranks
    return 16 * num_experts + 4 * num_experts * num_max_dispatch_tokens_per_rank * (2 * hidden + 32)


def pack_layout(begin: int | torch.Tensor, count: int | torch.Tensor) -> int | torch.Tensor:
    """Encode one ``layout_range`` entry: ``(begin << 32) | count`` (int or int64 tensor).

    Little-endian this is upstream's ``pack2<int, int64>(count, begin)``: low 32 bits count, high 32 bits begin.
    """
    return (begin << 32) | count


def unpack_layout(packed: int | torch.Tensor) -> tuple[int | torch.Tensor, int | torch.Tensor]:
    """Decode a ``layout_range`` entry (int or int64 tensor) into ``(begin, count)``."""
    return packed >> 32, packed & _COUNT_MASK


def validate_routing(
    topk_idx: torch.Tensor,
    num_experts: int,
    num_max_dispatch_tokens_per_rank: int,
    num_ranks: int,
    name: str = "topk_idx",
) -> None:
    """Check the routing preconditions of dispatch and combine; raise ValueError naming the first violation.

    Arguments:
        topk_idx: ``[N, K]`` int64, each entry -1 (masked) or an expert in ``[0, num_experts)``, no expert
            repeated within a row, ``N <= num_max_dispatch_tokens_per_rank``.
        num_experts: ``E``, a positive multiple of ``num_ranks``.
        num_max_dispatch_tokens_per_rank: ``T``, positive.
        num_ranks: ``R``, positive.
        name: how ``topk_idx`` is called in messages.
    """
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be positive, got {num_ranks}")
    if num_experts < 1 or num_experts % num_ranks:
        raise ValueError(f"num_experts ({num_experts}) must be a positive multiple of num_ranks ({num_ranks})")
    if num_max_dispatch_tokens_per_rank < 1:
        raise ValueError(f"num_max_dispatch_tokens_per_rank must be positive, got {num_max_dispatch_tokens_per_rank}")
    if not isinstance(topk_idx, torch.Tensor) or topk_idx.dtype is not torch.int64:
        raise ValueError(f"{name} must be an int64 tensor, got {getattr(topk_idx, 'dtype', type(topk_idx))}")
    if topk_idx.dim() != 2:
        raise ValueError(f"{name} must be 2-D [num_tokens, num_topk], got shape {tuple(topk_idx.shape)}")
    num_tokens = topk_idx.shape[0]
    if num_tokens > num_max_dispatch_tokens_per_rank:
        raise ValueError(
            f"{name} has {num_tokens} tokens but num_max_dispatch_tokens_per_rank is "
            f"{num_max_dispatch_tokens_per_rank}; raise it to at least the largest per-rank token count"
        )
    bad = ((topk_idx < -1) | (topk_idx >= num_experts)).nonzero()
    if bad.numel():
        t, k = bad[0].tolist()
        raise ValueError(
            f"{name}[{t}, {k}] = {int(topk_idx[t, k])} is not an expert: entries must be -1 (masked) "
            f"or in [0, {num_experts})"
        )
    ordered = topk_idx.sort(dim=1).values
    repeated = ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).nonzero()
    if repeated.numel():
        t, j = repeated[0].tolist()
        raise ValueError(
            f"duplicate expert {int(ordered[t, j + 1])} in row {t} of {name}; each expert may appear once per token"
        )


def select_rows_for_expert(topk_idx: torch.Tensor, expert: int) -> torch.Tensor:
    """Sender side: the tokens routed to ``expert``, ascending.

    Arguments:
        topk_idx: ``[N, K]`` int64 routing (validated).
        expert: global expert id in ``[0, E)``.

    Returns:
        ``[n]`` int64 token indices ``t`` with ``expert in topk_idx[t]``, strictly increasing.
    """
    return (topk_idx == expert).any(dim=1).nonzero().flatten()


def _check_block(where: str, src_token_idx: torch.Tensor, rows: torch.Tensor, hidden: int, num_tokens: int) -> None:
    if src_token_idx.dtype is not torch.int64 or src_token_idx.dim() != 1:
        raise ValueError(
            f"{where}: token indices must be a 1-D int64 tensor, got {src_token_idx.dtype} {tuple(src_token_idx.shape)}"
        )
    if rows.dtype is not torch.bfloat16 or tuple(rows.shape) != (src_token_idx.numel(), hidden):
        raise ValueError(
            f"{where}: rows must be bfloat16 of shape {(src_token_idx.numel(), hidden)}, "
            f"got {rows.dtype} {tuple(rows.shape)}"
        )
    if src_token_idx.numel() and not (
        int(src_token_idx[0]) >= 0
        and int(src_token_idx[-1]) < num_tokens
        and bool((src_token_idx[1:] > src_token_idx[:-1]).all())
    ):
        raise ValueError(f"{where}: token indices must be strictly increasing in [0, {num_tokens})")


def place_dispatch(
    blocks: Mapping[tuple[int, int], tuple[torch.Tensor, torch.Tensor]],
    num_local_experts: int,
    num_ranks: int,
    num_max_dispatch_tokens_per_rank: int,
    hidden: int,
    use_fp8: bool,
    contributes: Sequence[bool],
    device: torch.device | str | None = None,
) -> DispatchResult:
    """Receiver side: lay out the blocks that the sources sent to this rank's local experts.

    FP8 rows are quantized here; quantization is a pure function of one token's row, so quantizing on the
    sender (as upstream's kernel does) gives the same bits.

    Arguments:
        blocks: ``blocks[(l, s)] = (src_token_idx, rows)``: the tokens of source ``s`` routed to local expert
            ``l`` (``[n]`` int64, strictly increasing, ``< T``) and their ``[n, H]`` bfloat16 rows.  Required
            for every ``l`` and every contributing ``s``; ignored for the others.
        num_local_experts: ``L``.
        num_ranks: ``R``.
        num_max_dispatch_tokens_per_rank: ``T``.
        hidden: ``H`` (a multiple of 128 when ``use_fp8``).
        use_fp8: quantize rows to float8_e4m3fn with per-128-channel scales.
        contributes: ``[R]`` flags; a non-contributing source gets count 0 and no rows.
        device: where the outputs live; default: the device of the blocks' rows, else CPU.

    Returns:
        ``DispatchResult`` with the packed ``[L, R*T, H]`` layout (padding: zeros, scales 0, src_info -1).
    """
    if len(contributes) != num_ranks:
        raise ValueError(f"contributes must have num_ranks ({num_ranks}) entries, got {len(contributes)}")
    if use_fp8 and hidden % FP8_BLOCK_CHANNELS:
        raise ValueError(f"FP8 dispatch needs hidden ({hidden}) to be a multiple of {FP8_BLOCK_CHANNELS}")
    if device is None:
        device = next((rows.device for _, rows in blocks.values()), torch.device("cpu"))
    capacity = num_ranks * num_max_dispatch_tokens_per_rank
    recv_x = torch.zeros(
        num_local_experts, capacity, hidden, dtype=torch.float8_e4m3fn if use_fp8 else torch.bfloat16, device=device
    )
    recv_scales = None
    if use_fp8:
        num_blocks = hidden // FP8_BLOCK_CHANNELS
        # upstream's column-major storage: logical [L, R*T, S], strides (S*R*T, 1, R*T)
        recv_scales = torch.zeros(num_local_experts, num_blocks, capacity, dtype=torch.float32, device=device)
        recv_scales = recv_scales.transpose(1, 2)
    recv_count = torch.zeros(num_local_experts, dtype=torch.int32, device=device)
    src_info = torch.full((num_local_experts, capacity), -1, dtype=torch.int32, device=device)
    layout_range = torch.zeros(num_local_experts, num_ranks, dtype=torch.int64, device=device)
    for local_expert in range(num_local_experts):
        begin = 0
        for src in range(num_ranks):
            count = 0
            if contributes[src]:
                if (local_expert, src) not in blocks:
                    raise ValueError(
                        f"place_dispatch: no block for local expert {local_expert} from contributing source {src}"
                    )
                src_token_idx, rows = blocks[(local_expert, src)]
                where = f"place_dispatch block ({local_expert}, {src})"
                _check_block(where, src_token_idx, rows, hidden, num_max_dispatch_tokens_per_rank)
                count = src_token_idx.numel()
                if count:
                    dst = slice(begin, begin + count)
                    src_info[local_expert, dst] = src_token_idx.to(torch.int32)
                    if use_fp8:
                        q, scale_inv = quantize_fp8(rows)
                        recv_x[local_expert, dst] = q
                        recv_scales[local_expert, dst] = scale_inv
                    else:
                        recv_x[local_expert, dst] = rows
            layout_range[local_expert, src] = pack_layout(begin, count)
            begin += count
        recv_count[local_expert] = begin
    return DispatchResult(recv_x, recv_scales, recv_count, src_info, layout_range)


def combine_block(
    result: DispatchResult, expert_output: torch.Tensor, local_expert: int, dst_rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert-owner side: the rows of ``local_expert`` that go back to ``dst_rank``.

    Arguments:
        result: this rank's ``DispatchResult`` (the handle).
        expert_output: ``[L, R*T, H]`` bfloat16, row ``i`` = the expert's output for received row ``i``.
        local_expert: ``l``.
        dst_rank: the rank that sent the tokens.

    Returns:
        ``([n] int64 token indices on dst_rank, [n, H] bfloat16 rows)``, in received order.
    """
    begin, count = unpack_layout(int(result.layout_range[local_expert, dst_rank]))
    rows = slice(begin, begin + count)
    return result.src_info[local_expert, rows].long(), expert_output[local_expert, rows]


def place_combine(
    topk_idx: torch.Tensor, blocks: Mapping[int, tuple[torch.Tensor, torch.Tensor]], hidden: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-owner side: put each returned row at the top-k slot ``(t, k)`` with ``topk_idx[t, k] == e``.

    Arguments:
        topk_idx: ``[N, K]`` int64 routing (validated: no repeated expert in a row).
        blocks: ``blocks[e] = (src_token_idx, rows)``: ``[n]`` int64 strictly increasing tokens and their
            ``[n, H]`` bfloat16 rows returned by global expert ``e``.
        hidden: ``H``.

    Returns:
        expert_rows: ``[N, K, H]`` bfloat16, zeros where nothing was returned.
        received: ``[N, K]`` bool, which slots were filled.
    """
    num_tokens, num_topk = topk_idx.shape
    device = topk_idx.device
    expert_rows = torch.zeros(num_tokens, num_topk, hidden, dtype=torch.bfloat16, device=device)
    received = torch.zeros(num_tokens, num_topk, dtype=torch.bool, device=device)
    for expert, (src_token_idx, rows) in blocks.items():
        _check_block(f"place_combine block of expert {expert}", src_token_idx, rows, hidden, num_tokens)
        hit = topk_idx[src_token_idx] == expert
        missing = (~hit.any(dim=1)).nonzero()
        if missing.numel():
            t = int(src_token_idx[int(missing[0])])
            raise ValueError(
                f"expert {expert} returned token {t}, which is not routed to it (handle from another dispatch?)"
            )
        token, k = hit.nonzero(as_tuple=True)
        expert_rows[src_token_idx[token], k] = rows
        received[src_token_idx[token], k] = True
    return expert_rows, received


def combine_entry_active(
    topk_idx: torch.Tensor, active_ranks: torch.Tensor, num_local_experts: int, rank: int
) -> torch.Tensor:
    """Which top-k entries of ``rank``'s tokens take part in combine.

    Entry ``(t, k)`` with expert ``e`` takes part iff ``e >= 0``, its owner is active
    (``active_ranks[e // L] == 1``) and ``rank`` itself is active (an inactive rank's tokens were not
    dispatched, so nothing comes back: its combined output is all +0.0).

    Arguments:
        topk_idx: ``[N, K]`` int64 routing.
        active_ranks: ``[R]`` int32 mask after dispatch (1 = active).
        num_local_experts: ``L``.
        rank: the token owner.

    Returns:
        ``[N, K]`` bool.
    """
    owner = topk_idx.clamp(min=0) // num_local_experts
    return (topk_idx >= 0) & (active_ranks[owner] == 1) & bool(active_ranks[rank] == 1)


def combine_rows(
    topk_idx: torch.Tensor, topk_weights: torch.Tensor, expert_rows: torch.Tensor, entry_active: torch.Tensor
) -> torch.Tensor:
    """Weighted top-k reduction of one rank's tokens.

    Per token and channel: ``acc = +0.0``; for ``k`` in top-k order, skipping entries with
    ``topk_idx < 0`` or ``not entry_active``: ``acc = fl32(acc + fl32(float(y) * w))`` (multiply and add
    rounded separately, never fused); the result is ``bf16_rne(acc)``, rounded once.

    Arguments:
        topk_idx: ``[N, K]`` int64 routing.
        topk_weights: ``[N, K]`` float32 weights (not normalised; any sign).
        expert_rows: ``[N, K, H]`` bfloat16, the row the expert returned for ``(t, k)``; read only where active.
        entry_active: ``[N, K]`` bool, see ``combine_entry_active``.

    Returns:
        ``[N, H]`` bfloat16.
    """
    if topk_weights.dtype is not torch.float32 or topk_weights.shape != topk_idx.shape:
        raise ValueError(
            f"topk_weights must be float32 of shape {tuple(topk_idx.shape)}, "
            f"got {topk_weights.dtype} {tuple(topk_weights.shape)}"
        )
    num_tokens, num_topk = topk_idx.shape
    if expert_rows.dtype is not torch.bfloat16 or expert_rows.dim() != 3 or expert_rows.shape[:2] != topk_idx.shape:
        raise ValueError(
            f"expert_rows must be bfloat16 of shape [{num_tokens}, {num_topk}, hidden], "
            f"got {expert_rows.dtype} {tuple(expert_rows.shape)}"
        )
    take = entry_active & (topk_idx >= 0)
    acc = torch.zeros(num_tokens, expert_rows.shape[2], dtype=torch.float32, device=expert_rows.device)
    for k in range(num_topk):
        product = expert_rows[:, k].float() * topk_weights[:, k : k + 1]
        acc = torch.where(take[:, k : k + 1], acc + product, acc)
    return acc.to(torch.bfloat16)


def _check_mask(active_ranks: torch.Tensor, num_ranks: int, name: str) -> None:
    if (
        not isinstance(active_ranks, torch.Tensor)
        or active_ranks.dtype is not torch.int32
        or tuple(active_ranks.shape) != (num_ranks,)
    ):
        raise ValueError(
            f"{name} must be an int32 tensor of shape [{num_ranks}] (1 = active), got "
            f"{getattr(active_ranks, 'dtype', type(active_ranks))} {tuple(getattr(active_ranks, 'shape', ()))}"
        )
    if not bool(((active_ranks == 0) | (active_ranks == 1)).all()):
        raise ValueError(f"{name} entries must be 0 or 1, got {active_ranks.tolist()}")


def dispatch(
    xs: Sequence[torch.Tensor],
    topk_idxs: Sequence[torch.Tensor],
    num_experts: int,
    num_max_dispatch_tokens_per_rank: int,
    active_ranks: torch.Tensor,
    failed: AbstractSet[int] = frozenset(),
    use_fp8: bool = True,
) -> tuple[list[DispatchResult], torch.Tensor]:
    """Global view of one dispatch call on all ``R = len(xs)`` ranks.

    Arguments:
        xs: per rank ``[N_r, H]`` bfloat16 tokens, finite; ``H`` the same on all ranks (multiple of 128 for FP8).
        topk_idxs: per rank ``[N_r, K]`` int64 routing (see ``validate_routing``).
        num_experts: ``E``.
        num_max_dispatch_tokens_per_rank: ``T``.
        active_ranks: ``[R]`` int32 mask shared by all ranks (1 = active); not modified.
        failed: ranks that never respond (simulated timeouts).
        use_fp8: FP8 (float8_e4m3fn + scales) or bfloat16 rows.

    Returns:
        Per-rank ``DispatchResult`` (those of ranks that do not contribute are what an alive but masked rank
        would see), and the new ``[R]`` int32 mask: ``active_ranks`` with ``failed`` ranks set to 0.
    """
    num_ranks = len(xs)
    if num_ranks < 1 or len(topk_idxs) != num_ranks:
        raise ValueError(f"xs and topk_idxs must have one entry per rank, got {len(xs)} and {len(topk_idxs)}")
    _check_mask(active_ranks, num_ranks, "active_ranks")
    if not set(failed) <= set(range(num_ranks)):
        raise ValueError(f"failed ranks {sorted(failed)} must be in [0, {num_ranks})")
    hidden = xs[0].shape[-1] if xs[0].dim() == 2 else -1
    for rank, (x, topk_idx) in enumerate(zip(xs, topk_idxs)):
        validate_routing(topk_idx, num_experts, num_max_dispatch_tokens_per_rank, num_ranks, f"topk_idxs[{rank}]")
        if x.dtype is not torch.bfloat16 or tuple(x.shape) != (topk_idx.shape[0], hidden):
            raise ValueError(
                f"xs[{rank}] must be bfloat16 of shape {(topk_idx.shape[0], hidden)} (hidden shared by all ranks), "
                f"got {x.dtype} {tuple(x.shape)}"
            )
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"xs[{rank}] must be finite")
    if use_fp8 and hidden % FP8_BLOCK_CHANNELS:
        raise ValueError(f"FP8 dispatch needs hidden ({hidden}) to be a multiple of {FP8_BLOCK_CHANNELS}")
    contributes = [int(active_ranks[src]) == 1 and src not in failed for src in range(num_ranks)]
    num_local_experts = num_experts // num_ranks
    results = []
    for rank in range(num_ranks):
        blocks = {}
        for local_expert in range(num_local_experts):
            for src in range(num_ranks):
                if contributes[src]:
                    tokens = select_rows_for_expert(topk_idxs[src], rank * num_local_experts + local_expert)
                    blocks[(local_expert, src)] = (tokens, xs[src][tokens])
        results.append(
            place_dispatch(
                blocks,
                num_local_experts,
                num_ranks,
                num_max_dispatch_tokens_per_rank,
                hidden,
                use_fp8,
                contributes,
                xs[0].device,
            )
        )
    active_out = active_ranks.clone()
    active_out[sorted(failed)] = 0
    return results, active_out


def combine(
    expert_outputs: Sequence[torch.Tensor],
    dispatch_results: Sequence[DispatchResult],
    topk_idxs: Sequence[torch.Tensor],
    topk_weights: Sequence[torch.Tensor],
    active_ranks: torch.Tensor,
) -> list[torch.Tensor]:
    """Global view of one combine call on all ``R = len(dispatch_results)`` ranks.

    Token ``t`` of rank ``r``, entry ``k`` with expert ``e`` (owner ``o = e // L``, local ``l = e % L``) reads
    ``expert_outputs[o][l, i]`` where ``i`` is the row of owner ``o``'s dispatch result with
    ``src_info[l, i] == t`` inside source ``r``'s block; see ``combine_entry_active`` and ``combine_rows``.

    Arguments:
        expert_outputs: per rank ``[L, R*T, H]`` bfloat16; only valid rows of active owners are read.
        dispatch_results: per rank, from the matching ``dispatch``.
        topk_idxs: per rank ``[N_r, K]`` int64, as given to that ``dispatch``.
        topk_weights: per rank ``[N_r, K]`` float32.
        active_ranks: ``[R]`` int32 mask returned by ``dispatch`` (zero further ranks to model a failure
            during combine).

    Returns:
        Per rank ``[N_r, H]`` bfloat16.
    """
    num_ranks = len(dispatch_results)
    if num_ranks < 1 or not (len(expert_outputs) == len(topk_idxs) == len(topk_weights) == num_ranks):
        raise ValueError(
            "expert_outputs, dispatch_results, topk_idxs and topk_weights must have one entry per rank, got "
            f"{len(expert_outputs)}, {num_ranks}, {len(topk_idxs)}, {len(topk_weights)}"
        )
    _check_mask(active_ranks, num_ranks, "active_ranks")
    num_local_experts, capacity, hidden = dispatch_results[0].recv_x.shape
    num_max_dispatch_tokens_per_rank = capacity // num_ranks
    for rank, expert_output in enumerate(expert_outputs):
        if expert_output.dtype is not torch.bfloat16 or expert_output.shape != (num_local_experts, capacity, hidden):
            raise ValueError(
                f"expert_outputs[{rank}] must be bfloat16 of shape {(num_local_experts, capacity, hidden)}, "
                f"got {expert_output.dtype} {tuple(expert_output.shape)}"
            )
    outputs = []
    for rank in range(num_ranks):
        topk_idx = topk_idxs[rank]
        validate_routing(
            topk_idx, num_local_experts * num_ranks, num_max_dispatch_tokens_per_rank, num_ranks, f"topk_idxs[{rank}]"
        )
        entry_active = combine_entry_active(topk_idx, active_ranks, num_local_experts, rank)
        blocks = {}
        if int(active_ranks[rank]) == 1:
            for owner in range(num_ranks):
                if int(active_ranks[owner]) == 1:
                    for local_expert in range(num_local_experts):
                        blocks[owner * num_local_experts + local_expert] = combine_block(
                            dispatch_results[owner], expert_outputs[owner], local_expert, rank
                        )
        expert_rows, received = place_combine(topk_idx, blocks, hidden)
        missing = (entry_active & ~received).nonzero()
        if missing.numel():
            t, k = missing[0].tolist()
            raise ValueError(
                f"token {t} of rank {rank} is routed to expert {int(topk_idx[t, k])}, whose owner did not receive it "
                "(dispatch_results and topk_idxs come from different dispatch calls?)"
            )
        outputs.append(combine_rows(topk_idx, topk_weights[rank], expert_rows, entry_active))
    return outputs
