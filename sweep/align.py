"""Permutation alignment of two plain networks by weight matching.

Hidden units can be reordered without changing what a network computes.
`align(reference, other)` reorders `other`'s hidden units so its weights lie
as close as possible to `reference`'s: Algorithm 2 ("weight matching") of
Ainsworth, Hayase & Srinivasa, "Git Re-Basin" (ICLR 2023). Interpolating
between aligned endpoints usually crosses a much lower loss barrier.

Only plain MLPs and plain CNNs are supported: a chain of Linear / Conv
layers whose state dict lists them in forward order (nn.Sequential, or a
module whose attributes are declared in the order `forward` uses them), with
biases, norms and their running stats between them. Models with residual
connections, attention, embeddings or weight tying are not plain: their
permutation groups span several layers and need hand-written specs, which
this module does not support. `permutation_spec` raises AlignError on them
where the shapes show it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .errors import SweepError

Perms = Dict[str, torch.Tensor]


class AlignError(SweepError, ValueError):
    """The model is not a plain MLP/CNN, or the two state dicts don't match; the message names the key."""


@dataclass
class PermutationSpec:
    """Which axes of which tensors each permutation group reorders.

    `groups` lists one group per hidden layer ("P_0", "P_1", …). `axes` maps
    every key of the state dict to one entry per axis: the group that
    permutes that axis, or None. `blocks` maps (key, axis) to a block size b
    where the axis holds C channels × b positions, channel-major (a conv's
    output flattened into a linear); the group then moves whole blocks.
    """

    groups: List[str]
    axes: Dict[str, List[Optional[str]]]
    blocks: Dict[Tuple[str, int], int]

    def members(self, group: str) -> List[Tuple[str, int]]:
        """The (key, axis) pairs `group` permutes, in state-dict order."""
        return [(k, a) for k, names in self.axes.items() for a, g in enumerate(names) if g == group]

    def sizes(self, state: Mapping[str, torch.Tensor]) -> Dict[str, int]:
        """The number of units each group permutes in `state`."""
        out = {}
        for g in self.groups:
            key, axis = self.members(g)[0]
            out[g] = state[key].shape[axis] // self.blocks.get((key, axis), 1)
        return out


@dataclass
class AlignInfo:
    """What `align` did: coordinate-descent passes run, Σ⟨W_ref, W_other⟩ before
    and after (float64, over the floating tensors), and the number of groups."""

    iterations: int
    similarity_before: float
    similarity_after: float
    groups: int


def permutation_spec(state: Mapping[str, torch.Tensor]) -> PermutationSpec:
    """The permutation spec of a plain MLP/CNN, read from its state dict's order and shapes.

    Layers are the floating tensors with dim >= 2. Layer l's output axis is
    permuted by P_l (except the last layer's), its input axis by P_{l-1}.
    1-D floating tensors after layer l's weight (bias, norm weight and bias,
    running stats) follow P_l and must be as long as its output. 0-dim and
    integer tensors are left alone. A linear after a conv with
    in_features = C·b, b > 1, gets its input axis permuted in blocks of b.
    """
    layers = [k for k, t in state.items() if t.is_floating_point() and t.dim() >= 2]
    if len(layers) < 2:
        raise AlignError(f"a plain network needs at least 2 layers (floating tensors with dim >= 2), found {layers}")
    last = len(layers) - 1
    groups = [f"P_{i}" for i in range(last)]
    axes: Dict[str, List[Optional[str]]] = {}
    blocks: Dict[Tuple[str, int], int] = {}
    index = -1  # the layer whose output the tensors seen so far act on
    storages: Dict[Tuple[int, int], str] = {}
    for key, t in state.items():
        if not t.is_floating_point() or t.dim() == 0:
            axes[key] = [None] * t.dim()
            continue
        if t.dim() >= 2:
            index += 1
            if t.numel():
                at = (t.untyped_storage().data_ptr(), t.storage_offset())
                if at in storages:
                    raise AlignError(f"{key!r} shares its storage with {storages[at]!r}: tied weights are not plain")
                storages[at] = key
            names: List[Optional[str]] = [None] * t.dim()
            if index < last:
                names[0] = f"P_{index}"
            if index > 0:
                prev = state[layers[index - 1]]
                c, n = prev.shape[0], t.shape[1]
                names[1] = f"P_{index - 1}"
                if n != c:
                    if prev.dim() > 2 and t.dim() == 2 and n % c == 0:
                        blocks[(key, 1)] = n // c
                    else:
                        raise AlignError(
                            f"{key!r} takes {n} inputs but {layers[index - 1]!r} gives {c} outputs: "
                            "not a plain MLP/CNN")
            axes[key] = names
            continue
        if index < 0:
            raise AlignError(f"{key!r} comes before the first layer: not a plain MLP/CNN")
        out = state[layers[index]].shape[0]
        if t.shape[0] != out:
            raise AlignError(
                f"{key!r} has length {t.shape[0]} but follows {layers[index]!r} with {out} outputs: "
                "not a plain MLP/CNN")
        axes[key] = [f"P_{index}" if index < last else None]
    return PermutationSpec(groups, axes, blocks)


def _check_pair(reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor]) -> None:
    """Raise AlignError at the first key the two state dicts don't share with one shape."""
    for key in list(reference) + [k for k in other if k not in reference]:
        a = tuple(reference[key].shape) if key in reference else "missing"
        b = tuple(other[key].shape) if key in other else "missing"
        if a != b:
            raise AlignError(f"state dicts differ at {key!r}: reference {a}, other {b}")


def _check_spec(spec: PermutationSpec, state: Mapping[str, torch.Tensor]) -> None:
    for key, t in state.items():
        if key not in spec.axes or len(spec.axes[key]) != t.dim():
            raise AlignError(f"the spec does not describe {key!r} with shape {tuple(t.shape)}")


def _permute(x, axis: int, perm, block: int):
    """x with `axis` reordered by `perm` (blocks of `block` moved whole); numpy or torch."""
    shape = tuple(x.shape)
    if block > 1:
        x = x.reshape(shape[:axis] + (shape[axis] // block, block) + shape[axis + 1:])
    if isinstance(x, torch.Tensor):
        x = x.index_select(axis, perm.to(x.device))
    else:
        x = np.take(x, perm, axis=axis)
    return x.reshape(shape)


def _rows(x: np.ndarray, axis: int, block: int) -> np.ndarray:
    """x as one row per unit of `axis` (a block's positions go with their unit)."""
    shape = x.shape
    if block > 1:
        x = x.reshape(shape[:axis] + (shape[axis] // block, block) + shape[axis + 1:])
    return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


def _similarity(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Σ⟨a[k], b[k]⟩ in float64 over the floating tensors with dim >= 1."""
    total = 0.0
    for key, t in a.items():
        if t.is_floating_point() and t.dim() >= 1:
            total += float(torch.sum(t.detach().double() * b[key].detach().double().to(t.device)))
    return total


def _match(spec: PermutationSpec, reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor],
           max_iter: int, seed: int) -> Tuple[Perms, int]:
    _check_pair(reference, other)
    _check_spec(spec, reference)
    as64 = lambda t: t.detach().cpu().double().numpy()  # noqa: E731
    ref = {k: as64(t) for k, t in reference.items() if k in spec.axes and any(spec.axes[k])}
    oth = {k: as64(other[k]) for k in ref}
    members = {g: spec.members(g) for g in spec.groups}
    perms = {g: np.arange(n) for g, n in spec.sizes(reference).items()}
    rng = np.random.default_rng(seed)
    iterations = 0
    for _ in range(max_iter):
        iterations += 1
        progress = False
        for gi in rng.permutation(len(spec.groups)):
            g = spec.groups[gi]
            n = len(perms[g])
            cost = np.zeros((n, n))
            for key, axis in members[g]:
                w = oth[key]
                for other_axis, h in enumerate(spec.axes[key]):
                    if h is not None and other_axis != axis:
                        w = _permute(w, other_axis, perms[h], spec.blocks.get((key, other_axis), 1))
                block = spec.blocks.get((key, axis), 1)
                cost += _rows(ref[key], axis, block) @ _rows(w, axis, block).T
            _, cols = linear_sum_assignment(cost, maximize=True)
            rows = np.arange(n)
            old, new = cost[rows, perms[g]].sum(), cost[rows, cols].sum()
            if new - old > 1e-12 * max(abs(old), abs(new)):
                perms[g] = cols
                progress = True
        if not progress:
            break
    return {g: torch.as_tensor(p, dtype=torch.long) for g, p in perms.items()}, iterations


def weight_matching(spec: PermutationSpec, reference: Mapping[str, torch.Tensor],
                    other: Mapping[str, torch.Tensor], *, max_iter: int = 100, seed: int = 0) -> Perms:
    """The permutations that bring `other` closest to `reference` (Git Re-Basin, Algorithm 2).

    Coordinate descent: each pass visits the groups in an order drawn from
    `seed` and replaces a group's permutation with the linear assignment that
    maximises Σ⟨W_ref, W_other⟩ over the tensors it touches (biases and norm
    statistics included), the other groups held fixed. Stops after a pass
    that changes nothing, or after `max_iter` passes. A permutation is only
    replaced when it raises the similarity, so the result never lowers it.
    Returns group → LongTensor; `apply_permutation` applies it to `other`.
    """
    return _match(spec, reference, other, max_iter, seed)[0]


def apply_permutation(spec: PermutationSpec, perms: Mapping[str, torch.Tensor],
                      state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A new state dict: `state` with each axis reordered by its group's permutation.

    Position i of a permuted axis takes unit perms[group][i] of `state`. The
    inputs are not modified; tensors no group touches are cloned.
    """
    _check_spec(spec, state)
    sizes = spec.sizes(state)
    for g in spec.groups:
        p = perms.get(g)
        if p is None or p.dim() != 1 or not torch.equal(torch.sort(p.cpu()).values, torch.arange(sizes[g])):
            raise AlignError(f"perms[{g!r}] must be a permutation of range({sizes[g]})")
    out = {}
    for key, t in state.items():
        moved = t.detach()
        for axis, g in enumerate(spec.axes[key]):
            if g is not None:
                moved = _permute(moved, axis, perms[g].long(), spec.blocks.get((key, axis), 1))
        out[key] = moved if any(spec.axes[key]) else moved.clone()
    return out


def align(reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], *, max_iter: int = 100,
          seed: int = 0) -> Tuple[Dict[str, torch.Tensor], AlignInfo]:
    """`other` with its hidden units reordered to match `reference`'s, and what that took.

    Both are state dicts of one plain MLP/CNN architecture; the spec is read
    from `reference` (see `permutation_spec`). Raises AlignError naming the
    key where the two differ or the model is not plain.
    """
    _check_pair(reference, other)
    spec = permutation_spec(reference)
    perms, iterations = _match(spec, reference, other, max_iter, seed)
    aligned = apply_permutation(spec, perms, other)
    info = AlignInfo(iterations, _similarity(reference, other), _similarity(reference, aligned),
                     len(spec.groups))
    return aligned, info
