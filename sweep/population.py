"""A population of models trained side by side on one device.

Members are rows of stacked tensors `[M, *shape]`. One training step is
`vmap(grad(loss))` over the rows plus a vectorised optimiser update whose
hyperparameters are tensors `[M]`, one value per member, so the whole
population trains in one pass. Exploit is a row copy (weights and optimiser
state); explore changes a member's hyperparameter values.

The optimisers follow `torch.optim`'s update rules exactly (SGD with
momentum, Adam, AdamW), so a member trains as it would alone.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

# --------------------------------------------------------------------------- hyperparameter space


@dataclass
class Dimension:
    """One hyperparameter's distribution: uniform, loguniform, int (inclusive) or choice."""

    name: str
    distribution: str
    low: float = 0.0
    high: float = 1.0
    values: Tuple[float, ...] = ()

    @property
    def integer(self) -> bool:
        """Integer-valued: `int`, or choices that are all integers (an int64 results column)."""
        return self.distribution == "int" or (
            self.distribution == "choice" and all(isinstance(v, int) and not isinstance(v, bool) for v in self.values))

    def sample(self, rng: np.random.Generator) -> float:
        if self.distribution == "uniform":
            return float(rng.uniform(self.low, self.high))
        if self.distribution == "loguniform":
            return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        if self.distribution == "int":
            return float(rng.integers(int(self.low), int(self.high) + 1))
        return float(self.values[int(rng.integers(len(self.values)))])

    def grid(self, num: int) -> List[float]:
        """Grid points: every choice or integer, else `num` points (log-spaced for loguniform)."""
        if self.distribution == "choice":
            return [float(v) for v in self.values]
        if self.distribution == "int":
            return [float(v) for v in range(int(self.low), int(self.high) + 1)]
        if self.distribution == "loguniform":
            return [float(v) for v in np.geomspace(self.low, self.high, num)]
        return [float(v) for v in np.linspace(self.low, self.high, num)]

    def explore(self, value: float, rng: np.random.Generator, factors: Sequence[float], resample_probability: float,
                clip: bool = False) -> float:
        """Ray Tune's PBT explore: resample with `resample_probability`, else multiply by a random
        factor (integers truncated, as Ray Tune does) or, for choices, move to a neighbour."""
        if self.distribution == "choice":
            values = [float(v) for v in self.values]
            if rng.random() < resample_probability or value not in values:
                return values[int(rng.integers(len(values)))]
            shift = -1 if rng.random() < 0.5 else 1
            return values[min(max(values.index(value) + shift, 0), len(values) - 1)]
        if rng.random() < resample_probability:
            return self.sample(rng)
        new = value * float(factors[int(rng.integers(len(factors)))])
        if self.distribution == "int":
            new = float(int(new))
        if clip:
            new = min(max(new, self.low), self.high)
        return new


# --------------------------------------------------------------------------- vectorised optimisers

#: Each optimiser's hyperparameters and torch.optim's defaults for them.
OPTIMIZERS: Dict[str, Dict[str, float]] = {
    "sgd": {"lr": 0.001, "momentum": 0.0, "weight_decay": 0.0},
    "adam": {"lr": 0.001, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0},
    "adamw": {"lr": 0.001, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01},
}


def _per_member(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[M] → [M, 1, …, 1], broadcasting against a stacked tensor [M, *shape]."""
    return value.reshape((-1,) + (1,) * (like.dim() - 1))


def optimizer_state(name: str, params: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Zeroed state for stacked `params`: keys `<slot>/<param>` ([M, *shape]) and `step` ([M])."""
    m = next(iter(params.values())).shape[0]
    state: Dict[str, torch.Tensor] = {"step": torch.zeros(m, dtype=torch.float32, device=next(iter(params.values())).device)}
    slots = ("momentum_buffer",) if name == "sgd" else ("exp_avg", "exp_avg_sq")
    for slot in slots:
        for n, p in params.items():
            state[f"{slot}/{n}"] = torch.zeros_like(p)
    return state


@torch.no_grad()
def optimizer_step(name: str, params: Dict[str, torch.Tensor], grads: Mapping[str, torch.Tensor],
                   state: Dict[str, torch.Tensor], hp: Mapping[str, torch.Tensor]) -> None:
    """One update of every member, in place; `hp[name]` is [M] (one value per member)."""
    state["step"] += 1
    step = state["step"]
    for n, p in params.items():
        g = grads[n]
        lr = _per_member(hp["lr"], p)
        wd = _per_member(hp["weight_decay"], p)
        if name == "sgd":
            # torch.optim.SGD (dampening 0, no Nesterov): g += wd·p; buf = momentum·buf + g; p −= lr·buf.
            g = g + wd * p
            buf = state[f"momentum_buffer/{n}"]
            buf.mul_(_per_member(hp["momentum"], p)).add_(g)
            p.sub_(lr * buf)
            continue
        beta1, beta2 = _per_member(hp["beta1"], p), _per_member(hp["beta2"], p)
        eps = _per_member(hp["eps"], p)
        if name == "adamw":
            p.mul_(1 - lr * wd)
        else:
            g = g + wd * p
        exp_avg, exp_avg_sq = state[f"exp_avg/{n}"], state[f"exp_avg_sq/{n}"]
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g * (1 - beta2))
        t = _per_member(step, p)
        bias_correction1 = 1 - beta1 ** t
        bias_correction2_sqrt = (1 - beta2 ** t).sqrt()
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        p.sub_((lr / bias_correction1) * exp_avg / denom)


# --------------------------------------------------------------------------- the population


def loss_keywords(loss: Callable[..., Any]) -> Optional[set]:
    """The keyword arguments `loss(output, y, **kw)` takes; None when it takes any (**kwargs)."""
    try:
        signature = inspect.signature(loss)
    except (TypeError, ValueError):
        return set()
    names = set()
    for i, p in enumerate(signature.parameters.values()):
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        if i >= 2 and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            names.add(p.name)
    return names


@dataclass
class Member:
    """One member's state, moved between populations (another shard, the driver): CPU tensors."""

    params: Dict[str, torch.Tensor]
    state: Dict[str, torch.Tensor]
    hyper: Dict[str, float] = field(default_factory=dict)


class Population:
    """`ids` members of one module's architecture, trained together on `device`.

    `init[name]` gives the stacked starting weights `[M, *shape]` of every
    floating parameter; buffers stay the module's own (shared, not trained).
    `hyper[name]` is one value per member for each optimiser hyperparameter
    (missing ones take torch.optim's default) and each keyword of `loss`.
    `batches` are (x, y) pairs, used in order and cycled: every member sees
    the same batches, so members differ only by their start and their
    hyperparameters.
    """

    def __init__(self, module: torch.nn.Module, ids: Sequence[int], init: Mapping[str, torch.Tensor],
                 optimizer: str, hyper: Mapping[str, Sequence[float]], batches: Sequence[Tuple[Any, Any]],
                 loss: Callable[..., Any], device: torch.device = torch.device("cpu")):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
        self.module = module.to(device)
        self.device = device
        self.ids = list(ids)
        self.index = {member: i for i, member in enumerate(self.ids)}
        self.optimizer = optimizer
        self.params = {n: init[n].detach().to(device, torch.float32).clone() for n in init}
        m = len(self.ids)
        for n, p in self.params.items():
            if p.shape[0] != m:
                raise ValueError(f"init['{n}'] has {p.shape[0]} rows for {m} members")
        self.buffers = {n: b.detach().to(device) for n, b in module.named_buffers()}
        self.state = optimizer_state(optimizer, self.params)
        self.loss = loss
        self.loss_names = [n for n in hyper if n not in OPTIMIZERS[optimizer]]
        self.hyper: Dict[str, torch.Tensor] = {}
        for n, default in OPTIMIZERS[optimizer].items():
            self.hyper[n] = torch.full((m,), default, dtype=torch.float32, device=device)
        for n, values in hyper.items():
            self.hyper[n] = torch.as_tensor(np.asarray(values, dtype=np.float64), dtype=torch.float32).to(device)
            if self.hyper[n].shape != (m,):
                raise ValueError(f"hyperparameter '{n}' has {self.hyper[n].shape[0]} values for {m} members")
        self.batches = [(x.to(device), y.to(device)) for x, y in batches]
        if not self.batches:
            raise ValueError("the training loader gave no batches")
        self.steps_done = 0
        self._grad = vmap(grad(self._loss), in_dims=(0, None, None, 0), randomness="different")

    def _loss(self, params: Dict[str, torch.Tensor], x: Any, y: Any, loss_hp: Dict[str, torch.Tensor]) -> torch.Tensor:
        out = functional_call(self.module, {**params, **self.buffers}, (x,))
        return self.loss(out, y, **loss_hp)

    def train(self, steps: int) -> None:
        """`steps` vectorised steps of every member (the module in training mode meanwhile)."""
        modes = [(mod, mod.training) for mod in self.module.modules()]
        self.module.train()
        try:
            for _ in range(steps):
                x, y = self.batches[self.steps_done % len(self.batches)]
                loss_hp = {n: self.hyper[n] for n in self.loss_names}
                grads = self._grad(self.params, x, y, loss_hp)
                optimizer_step(self.optimizer, self.params, grads, self.state, self.hyper)
                self.steps_done += 1
        finally:
            for mod, mode in modes:
                mod.train(mode)

    def candidates(self) -> List[Dict[str, torch.Tensor]]:
        """Each member's parameters as a dict of views (for evaluation)."""
        return [{n: p[i] for n, p in self.params.items()} for i in range(len(self.ids))]

    def export(self, members: Sequence[int]) -> List[Member]:
        """Copies of `members`' weights, optimiser state and hyperparameters, on the CPU."""
        out = []
        for member in members:
            i = self.index[member]
            out.append(Member(
                params={n: p[i].detach().cpu().clone() for n, p in self.params.items()},
                state={n: s[i].detach().cpu().clone() for n, s in self.state.items()},
                hyper={n: float(h[i]) for n, h in self.hyper.items()},
            ))
        return out

    @torch.no_grad()
    def load(self, member: int, state: Member) -> None:
        """Overwrite `member` with `state` (weights, optimiser state and hyperparameters)."""
        i = self.index[member]
        for n, p in self.params.items():
            p[i].copy_(state.params[n])
        for n, s in self.state.items():
            s[i].copy_(state.state[n])
        for n, h in self.hyper.items():
            if n in state.hyper:
                h[i] = state.hyper[n]

    @torch.no_grad()
    def copy(self, donor: int, receiver: int) -> None:
        """Exploit within this population: the receiver's row becomes the donor's, on the device."""
        d, r = self.index[donor], self.index[receiver]
        for tensors in (self.params, self.state, self.hyper):
            for t in tensors.values():
                t[r] = t[d]

    @torch.no_grad()
    def set_hyper(self, member: int, values: Mapping[str, float]) -> None:
        i = self.index[member]
        for n, v in values.items():
            self.hyper[n][i] = v

    def hyper_of(self, member: int) -> Dict[str, float]:
        i = self.index[member]
        return {n: float(h[i]) for n, h in self.hyper.items()}


# --------------------------------------------------------------------------- exploit


def exploit_pairs(scores: Mapping[int, float], quantile: float, mode: str,
                  rng: np.random.Generator) -> List[Tuple[int, int]]:
    """(receiver, donor) pairs: each member of the bottom `quantile` gets a random member of the top.

    The quantile holds ceil(M·quantile) members, at most half (Ray Tune's
    rule). Non-finite scores rank last. Ties are broken at random, so members
    with equal scores do not stay in the bottom by their position.
    """
    members = list(scores)
    order = [members[i] for i in rng.permutation(len(members))]
    sign = -1.0 if mode == "max" else 1.0

    def badness(member: int) -> float:
        value = scores[member]
        return math.inf if value is None or not math.isfinite(value) else sign * value

    ranked = sorted(order, key=badness)  # best first; stable over the random order
    count = int(math.ceil(len(members) * quantile))
    if count > len(members) // 2:
        count = len(members) // 2
    if count == 0:
        return []
    top, bottom = ranked[:count], ranked[-count:]
    return [(receiver, top[int(rng.integers(len(top)))]) for receiver in bottom]
