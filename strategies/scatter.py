"""Moving LoRA factors between a pruned client's small layers and the full, unpruned model.

FedSpine prunes each client's local copy structurally: attention heads (rows of q/k/v,
columns of o) and MLP channels (rows of gate/up, columns of down); LLM-Drop can remove a
whole block. A pruned Linear keeps the rows ``kept_out`` and the columns ``kept_in`` of the
full weight W (out, in), so the client's adapter has lora_A (r, in_kept) and
lora_B (out_kept, r), and its update s · B @ A covers only W[kept_out][:, kept_in].

The global model stays unpruned, so the server works at full shape:

- `scatter_factors` (upload direction): place B's rows at ``kept_out`` and A's columns at
  ``kept_in``, zeros elsewhere. Then B_full @ A_full is the client's update written into a
  zero (out, in) matrix at [kept_out][:, kept_in]: exact, still rank r, and ready for
  FLoRA stacking (`lora_math.stack_factors`) with clients of any rank and kept set.
- `slice_factors` (download direction): a pruned client applies the global low-rank update
  to its smaller layers by taking B's rows at ``kept_out`` and A's columns at ``kept_in``;
  (B[kept_out]) @ (A[:, kept_in]) = (B @ A)[kept_out][:, kept_in], again exact.

Conventions follow peft and `strategies.lora_math`: factors are {module: (lora_A, lora_B)},
modules keyed as `get_peft_model_state_dict` keys them (without ``.lora_A.weight``).
A `kept` entry is (kept_out, kept_in), each a 1-D integer tensor of distinct indices into
the full layer, or None for "that side is not pruned". A module with no `kept` entry is
unpruned. A module whose kept set is empty on either side was dropped by the client.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import RecordDict

from strategies.lora_math import Factors, rank_of
from strategies.protocol import KEPT, KEPT_IN, KEPT_OUT
from strategies.replies import INDEX_DTYPES, RejectedReply, read_arrays

KeptIndices = tuple[torch.Tensor | None, torch.Tensor | None]
"""Per module: (kept_out, kept_in); each a 1-D integer tensor into the full layer, or None
when that side keeps every unit."""

Kept = Mapping[str, KeptIndices]


def _check_indices(module: str, side: str, index: torch.Tensor | None, size: int,
                   expected: int | None) -> torch.Tensor | None:
    """Validate one side's kept indices: 1-D, integer, in [0, size), distinct, and as many as
    the factor has units (`expected`, None when the client has no factor to compare with).

    Returns the indices as int64 (None stays None: every unit kept). Raises ValueError naming
    the module, the side and the bad value.
    """
    if index is None:
        if expected is not None and expected != size:
            raise ValueError(f"'{module}': {side} is not pruned (kept None) but the factor has "
                             f"{expected} units; allowed: exactly the full size {size}")
        return None
    if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.is_floating_point() \
            or index.is_complex() or index.dtype == torch.bool:
        shape = tuple(index.shape) if isinstance(index, torch.Tensor) else type(index).__name__
        raise ValueError(f"'{module}': kept {side} indices must be a 1-D integer tensor, got "
                         f"{shape}" + (f" of {index.dtype}" if isinstance(index, torch.Tensor)
                                       else ""))
    index = index.long()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
        raise ValueError(f"'{module}': kept {side} indices span [{int(index.min())}, "
                         f"{int(index.max())}]; allowed: 0 <= i < {size}")
    if index.unique().numel() != index.numel():
        raise ValueError(f"'{module}': kept {side} indices contain duplicates; each unit of "
                         f"the full layer may be kept at most once")
    if expected is not None and index.numel() != expected:
        raise ValueError(f"'{module}': {index.numel()} kept {side} indices but the factor has "
                         f"{expected} {side} units; they must match one to one")
    return index


def scatter_factors(factors: Factors, kept: Kept,
                    full_shapes: Mapping[str, tuple[int, int]]) -> Factors:
    """A pruned client's factors written back at full shape, zeros at the pruned units.

    Args:
        factors: {module: (lora_A (r, in_kept), lora_B (out_kept, r))} of one client.
        kept: {module: (kept_out, kept_in)}; a module without an entry is unpruned, and its
            factors must already have the full shape.
        full_shapes: {module: (out, in)} of the unpruned layers; the result has every one.

    Returns:
        {module: (lora_A (r, in), lora_B (out, r))} for every module of `full_shapes`, with
        B_full @ A_full = B @ A placed at [kept_out][:, kept_in] of a zero (out, in) matrix.
        A module the client lacks entirely (its block dropped, e.g. by LLM-Drop) contributes
        zero: zero factors of the client's rank, so that FLoRA stacking sees one rank r per
        client. The client's scaling is not applied here (it stays in its `LoraUpdate`).

    Raises:
        ValueError: naming the module, for a module outside `full_shapes`, mismatched rank,
            or kept indices that are out of range, duplicated, or not as many as the
            factor's rows/columns.
    """
    unknown = sorted((set(factors) | set(kept)) - set(full_shapes))
    if unknown:
        raise ValueError(f"modules {unknown} are not among the model's target modules "
                         f"{sorted(full_shapes)}")
    r = rank_of(factors)
    out: Factors = {}
    for module, (n_out, n_in) in full_shapes.items():
        kept_out, kept_in = kept.get(module, (None, None))
        if module not in factors:  # dropped by the client: a zero update of its rank
            _check_indices(module, "out", kept_out, n_out, None)
            _check_indices(module, "in", kept_in, n_in, None)
            like = next(iter(factors.values()))[0]
            out[module] = (like.new_zeros(r, n_in), like.new_zeros(n_out, r))
            continue
        a, b = factors[module]  # (r, in_kept), (out_kept, r)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"'{module}': lora_A {tuple(a.shape)} and lora_B "
                             f"{tuple(b.shape)}; expected (r, in_kept) and (out_kept, r)")
        rows = _check_indices(module, "out", kept_out, n_out, b.shape[0])
        cols = _check_indices(module, "in", kept_in, n_in, a.shape[1])
        if cols is None:
            a_full = a
        else:
            a_full = a.new_zeros(r, n_in)  # (r, in)
            a_full[:, cols] = a  # columns of A at kept_in
        if rows is None:
            b_full = b
        else:
            b_full = b.new_zeros(n_out, r)  # (out, r)
            b_full[rows] = b  # rows of B at kept_out
        out[module] = (a_full, b_full)
    return out


def slice_factors(factors: Factors, kept: Kept) -> Factors:
    """The part of full-shape factors that a pruned client's smaller layers can use.

    Args:
        factors: {module: (lora_A (R, in), lora_B (out, R))} at full shape, e.g. the global
            update G that a FLoRA-style client applies as a frozen low-rank term.
        kept: {module: (kept_out, kept_in)} of the client; a module without an entry is
            unpruned and passes through unchanged.

    Returns:
        {module: (A[:, kept_in] (R, in_kept), B[kept_out] (out_kept, R))}, so that
        B' @ A' = (B @ A)[kept_out][:, kept_in]. Modules whose kept set is empty on either
        side (dropped by the client) are left out: the client has no layer to apply them to.
        `slice_factors(scatter_factors(x, kept, shapes), kept) == x` for the modules of x.

    Raises:
        ValueError: naming the module, for a `kept` entry of a module not in `factors`, or
            kept indices that are out of range or duplicated.
    """
    unknown = sorted(set(kept) - set(factors))
    if unknown:
        raise ValueError(f"kept indices given for modules {unknown} that have no factors; "
                         f"known modules: {sorted(factors)}")
    out: Factors = {}
    for module, (a, b) in factors.items():
        kept_out, kept_in = kept.get(module, (None, None))
        rows = _check_indices(module, "out", kept_out, b.shape[0], None)
        cols = _check_indices(module, "in", kept_in, a.shape[1], None)
        if (rows is not None and rows.numel() == 0) or (cols is not None and cols.numel() == 0):
            continue  # dropped module: nothing of it left on the client
        a_kept = a if cols is None else a[:, cols]  # (R, in) -> (R, in_kept)
        b_kept = b if rows is None else b[rows]  # (out, R) -> (out_kept, R)
        out[module] = (a_kept, b_kept)
    return out


def read_kept(content: RecordDict, module_shapes: Mapping[str, tuple[int, int]]) -> Kept:
    """The reply's kept rows / columns per module ({} when it pruned nothing)."""
    if KEPT not in content.array_records:
        return {}
    record = content.array_records[KEPT]
    kept: dict = {}
    sizes: dict[str, int] = {}  # per key: the most indices it can hold
    for key in record:
        suffix = KEPT_OUT if key.endswith(KEPT_OUT) else KEPT_IN if key.endswith(KEPT_IN) \
            else None
        module = key.removesuffix(suffix) if suffix else key
        if suffix is None or module not in module_shapes:
            raise RejectedReply(f"kept record holds '{str(key)[:120]}'; allowed: '<target "
                                f"module>{KEPT_OUT}' and '<target module>{KEPT_IN}'")
        sizes[key] = module_shapes[module][0 if suffix == KEPT_OUT else 1]
    for key, index in read_arrays(record, sizes, "kept record", INDEX_DTYPES).items():
        suffix = KEPT_OUT if key.endswith(KEPT_OUT) else KEPT_IN
        kept.setdefault(key.removesuffix(suffix), {})[suffix] = index
    if half := sorted(m for m, sides in kept.items() if len(sides) != 2):
        raise RejectedReply(f"kept record has only one side for {half[:2]}; both "
                            f"{KEPT_OUT} and {KEPT_IN} are needed")
    return {m: (sides[KEPT_OUT], sides[KEPT_IN]) for m, sides in kept.items()}


def pruned_shapes(module_shapes: Mapping[str, tuple[int, int]],
                  kept: Kept) -> dict[str, tuple[int, int]]:
    """Shapes of the client's layers: kept counts where pruned; dropped modules left out."""
    shapes = {}
    for module, (n_out, n_in) in module_shapes.items():
        rows, cols = kept.get(module, (None, None))
        n_out = n_out if rows is None else rows.numel()
        n_in = n_in if cols is None else cols.numel()
        if n_out and n_in:
            shapes[module] = (n_out, n_in)
    return shapes
