"""A population of models trained side by side on one device.

Members are rows of stacked tensors `[M, *shape]`. One training step is one
vmapped forward of every member and one backward (each member's gradient
lands in its own row) plus a vectorised optimiser update whose
hyperparameters are tensors `[M]`, one value per member, so the whole
population trains in one pass. Exploit is a row copy (weights and optimiser
state); explore changes a member's hyperparameter values.

The optimisers follow `torch.optim`'s update rules exactly (SGD with
momentum, Adam, AdamW), so a member trains as it would alone.

A study that trains a population (`pbt`, `search`) describes it once in a
`PopulationPlan`; each worker starts its shard of the members from it
(`start_population`) and runs a round per `Train` batch (`train_round`):
apply the exploits and new values, train, evaluate. Nothing here reads a
study's config, and nothing here imports Ray.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .lazy import no_grad, torch
from .model import import_callable

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
        factor or, for choices, move to a neighbour.

        An integer is rounded after the factor, half to even: Ray Tune 2.60's
        `int(round(x))` (Python's `round`), after a resample too. Under the
        default factors 1.2 / 0.8, 3 → 4 or 2 and 2 → 2: a small integer can
        rise, and a walk down stops at 2 (or 1), not at 0 below `low` as it
        would if the product were truncated.
        """
        if self.distribution == "choice":
            values = [float(v) for v in self.values]
            if rng.random() < resample_probability or value not in values:
                return values[int(rng.integers(len(values)))]
            shift = -1 if rng.random() < 0.5 else 1
            return values[min(max(values.index(value) + shift, 0), len(values) - 1)]
        if rng.random() < resample_probability:
            new = self.sample(rng)
        else:
            new = value * float(factors[int(rng.integers(len(factors)))])
        if self.distribution == "int":
            new = float(round(new))
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


def optimizer_state(name: str, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Zeroed state for the members' flat weights [M, P]: each slot [M, P], and `step` [M, 1]."""
    state: Dict[str, torch.Tensor] = {"step": torch.zeros((flat.shape[0], 1), dtype=torch.float32, device=flat.device)}
    for slot in (("momentum_buffer",) if name == "sgd" else ("exp_avg", "exp_avg_sq")):
        state[slot] = torch.zeros_like(flat)
    return state


@no_grad
def optimizer_step(name: str, flat: torch.Tensor, grad: torch.Tensor, state: Dict[str, torch.Tensor],
                   hp: Mapping[str, torch.Tensor]) -> None:
    """One update of every member's flat weights [M, P] in place; `hp[name]` is [M, 1] (a value per member).

    The arithmetic is torch.optim's, member by member: SGD (dampening 0, no
    Nesterov), Adam (L2 weight decay added to the gradient) and AdamW
    (decoupled weight decay).
    """
    state["step"] += 1
    lr, wd = hp["lr"], hp["weight_decay"]
    if name == "sgd":
        # g += wd·p; buf = momentum·buf + g; p −= lr·buf
        buf = state["momentum_buffer"]
        buf.mul_(hp["momentum"]).add_(grad + wd * flat)
        flat.sub_(lr * buf)
        return
    beta1, beta2, eps, step = hp["beta1"], hp["beta2"], hp["eps"], state["step"]
    if name == "adamw":
        flat.mul_(1 - lr * wd)
    else:
        grad = grad + wd * flat
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad * (1 - beta2))
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = (1 - beta2 ** step).sqrt()
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    flat.sub_((lr / bias_correction1) * exp_avg / denom)


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

    Each member's weights are one row of a flat [M, P] tensor (`params` holds
    views of it by name), as is each optimiser slot, so an update is a few
    whole-population operations and an exploit copies three rows.
    """

    def __init__(self, module: torch.nn.Module, ids: Sequence[int], init: Mapping[str, torch.Tensor],
                 optimizer: str, hyper: Mapping[str, Sequence[float]], batches: Sequence[Tuple[Any, Any]],
                 loss: Callable[..., Any], device: Union[str, torch.device] = "cpu"):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
        device = torch.device(device)
        self.module = module.to(device)
        self.device = device
        self.ids = list(ids)
        self.index = {member: i for i, member in enumerate(self.ids)}
        self.optimizer = optimizer
        m = len(self.ids)
        for n, t in init.items():
            if t.shape[0] != m:
                raise ValueError(f"init['{n}'] has {t.shape[0]} rows for {m} members")
        self.names = list(init)
        self.shapes = [tuple(init[n].shape[1:]) for n in self.names]
        self.flat = torch.cat([init[n].detach().to(device, torch.float32).reshape(m, -1) for n in self.names], dim=1)
        self.params = self._views(self.flat)
        self.buffers = {n: b.detach().to(device) for n, b in module.named_buffers()}
        # functional_call works out tied weights on every call unless told there are none (a fifth of a step).
        self.tied = len(list(module.named_parameters(remove_duplicate=False))) != len(list(module.named_parameters()))
        self.state = optimizer_state(optimizer, self.flat)
        self.loss = loss
        self.loss_names = [n for n in hyper if n not in OPTIMIZERS[optimizer]]
        self.hyper: Dict[str, torch.Tensor] = {}  # each [M, 1]
        for n, default in OPTIMIZERS[optimizer].items():
            self.hyper[n] = torch.full((m, 1), default, dtype=torch.float32, device=device)
        for n, values in hyper.items():
            column = torch.as_tensor(np.asarray(values, dtype=np.float64), dtype=torch.float32)
            if column.shape != (m,):
                raise ValueError(f"hyperparameter '{n}' has {column.shape[0]} values for {m} members")
            self.hyper[n] = column.reshape(m, 1).to(device)
        self.batches = [(x.to(device), y.to(device)) for x, y in batches]
        if not self.batches:
            raise ValueError("the training loader gave no batches")
        self.steps_done = 0
        self._losses = torch.func.vmap(self._loss, in_dims=(0, None, None, 0), randomness="different")
        #: seed -> a module of this architecture built under that torch seed (a restarted member's start)
        self.factory: Optional[Callable[[int], torch.nn.Module]] = None

    def _views(self, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        """{name: [M, *shape]} views of a flat [M, P] tensor."""
        out, offset = {}, 0
        for n, shape in zip(self.names, self.shapes):
            size = int(np.prod(shape)) if shape else 1
            out[n] = flat[:, offset:offset + size].view((flat.shape[0],) + shape)
            offset += size
        return out

    def _loss(self, params: Dict[str, torch.Tensor], x: Any, y: Any, loss_hp: Dict[str, torch.Tensor]) -> torch.Tensor:
        out = torch.func.functional_call(self.module, {**params, **self.buffers}, (x,), tie_weights=self.tied)
        return self.loss(out, y, **loss_hp)

    def flat_gradient(self, x: Any, y: Any) -> torch.Tensor:
        """Every member's gradient on one batch, [M, P].

        The members' losses come from one vmapped forward; the gradient of
        their sum is each member's own gradient in its own row (a member's
        loss depends on its row only). Plain autograd on a vmapped forward
        matches `vmap(grad(...))` and spares its per-process start-up
        (torch.func's grad imports torch._dynamo on first use: about a second).
        """
        leaf = self.flat.detach().requires_grad_()
        loss_hp = {n: self.hyper[n].reshape(-1) for n in self.loss_names}
        if leaf.shape[0] == 1:  # one member (the last of a halving): vmap's own cost would double the step's
            params = {n: v[0] for n, v in self._views(leaf).items()}
            losses = self._loss(params, x, y, {n: h[0] for n, h in loss_hp.items()})
        else:
            losses = self._losses(self._views(leaf), x, y, loss_hp)
        (gradient,) = torch.autograd.grad(losses.sum(), leaf)
        return gradient

    def gradients(self, x: Any, y: Any) -> Dict[str, torch.Tensor]:
        """Every member's gradient on one batch, by parameter name ([M, *shape] each)."""
        return self._views(self.flat_gradient(x, y))

    def train(self, steps: int) -> None:
        """`steps` vectorised steps of every member (the module in training mode meanwhile)."""
        flags = [(mod, mod.training) for mod in self.module.modules()]
        self.module.train()
        try:
            for _ in range(steps):
                x, y = self.batches[self.steps_done % len(self.batches)]
                optimizer_step(self.optimizer, self.flat, self.flat_gradient(x, y), self.state, self.hyper)
                self.steps_done += 1
        finally:
            for mod, training in flags:
                mod.train(training)

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
                hyper={n: float(h[i, 0]) for n, h in self.hyper.items()},
            ))
        return out

    @no_grad
    def load(self, member: int, state: Member) -> None:
        """Overwrite `member` with `state` (weights, optimiser state and hyperparameters)."""
        i = self.index[member]
        for n, p in self.params.items():
            p[i].copy_(state.params[n])
        for n, s in self.state.items():
            s[i].copy_(state.state[n])
        for n, h in self.hyper.items():
            if n in state.hyper:
                h[i, 0] = state.hyper[n]

    @no_grad
    def retain(self, members: Sequence[int]) -> None:
        """Keep only `members` (the others stopped): their rows leave the stacked tensors, so every later
        step trains and evaluates fewer rows."""
        wanted = set(members)
        keep = [m for m in self.ids if m in wanted]
        if keep == self.ids:
            return
        rows = torch.tensor([self.index[m] for m in keep], dtype=torch.long, device=self.device)
        self.flat = self.flat.index_select(0, rows)
        self.params = self._views(self.flat)
        self.state = {n: s.index_select(0, rows) for n, s in self.state.items()}
        self.hyper = {n: h.index_select(0, rows) for n, h in self.hyper.items()}
        self.ids = keep
        self.index = {member: i for i, member in enumerate(self.ids)}

    @no_grad
    def restart(self, starts: Mapping[int, "Start"]) -> None:
        """Start each member of `starts` afresh (a new trial in its slot): weights from the factory under its
        seed (or the module's own weights for `MODEL_START`), optimiser state zeroed. A member not held yet
        gets a new row (its hyperparameters torch.optim's defaults until set). When every member held
        restarts, the batches start from the first again, as for a population just made."""
        new = [m for m in starts if m not in self.index]
        if new:
            grow = len(new)
            self.flat = torch.cat([self.flat, self.flat.new_zeros((grow, self.flat.shape[1]))])
            self.params = self._views(self.flat)
            self.state = {n: torch.cat([s, s.new_zeros((grow,) + tuple(s.shape[1:]))]) for n, s in self.state.items()}
            defaults = OPTIMIZERS[self.optimizer]
            self.hyper = {n: torch.cat([h, h.new_full((grow, 1), defaults.get(n, 0.0))]) for n, h in self.hyper.items()}
            self.ids = self.ids + new
            self.index = {member: i for i, member in enumerate(self.ids)}
        for member, start in starts.items():
            i = self.index[member]
            if start == MODEL_START:
                weights = dict(self.module.named_parameters())
            else:
                if self.factory is None:
                    raise ValueError(f"member {member} starts from seed {start}, but this population has no factory")
                weights = dict(self.factory(int(start)).named_parameters())
            for n, p in self.params.items():
                p[i].copy_(weights[n].detach())
            for slot in self.state.values():
                slot[i].zero_()
        if set(starts) >= set(self.ids):
            self.steps_done = 0

    @no_grad
    def copy(self, donor: int, receiver: int) -> None:
        """Exploit within this population: the receiver's row becomes the donor's, on the device."""
        d, r = self.index[donor], self.index[receiver]
        for t in (self.flat, *self.state.values(), *self.hyper.values()):
            t[r] = t[d]

    @no_grad
    def set_hyper(self, member: int, values: Mapping[str, float]) -> None:
        i = self.index[member]
        for n, v in values.items():
            self.hyper[n][i, 0] = v

    def hyper_of(self, member: int) -> Dict[str, float]:
        i = self.index[member]
        return {n: float(h[i, 0]) for n, h in self.hyper.items()}


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


# --------------------------------------------------------------------------- plans and rounds


@dataclass
class PopulationPlan:
    """A population as a study plans it: what every worker needs to start its shard of the members.

    `hyper[name]` is every member's starting value of each optimiser and loss
    hyperparameter (constants included); `seeds[m]` is the torch seed under
    which member m's start comes from the model factory, or `seeds` is None
    when every member starts from the module's own weights. The study owns
    every formula (seeds, sampled values); a worker only reads the plan.
    """

    size: int
    optimizer: str
    loss: str  # 'package.module:function': (output, y, **hyperparameters) -> scalar
    loader: str  # 'package.module:function' returning the (x, y) training batches
    loader_kwargs: Dict[str, Any] = field(default_factory=dict)
    hyper: Dict[str, List[float]] = field(default_factory=dict)
    seeds: Optional[List[int]] = None

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"a population needs at least one member, got size {self.size}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {self.optimizer!r}")
        for name, values in self.hyper.items():
            if len(values) != self.size:
                raise ValueError(f"hyper['{name}'] has {len(values)} values for {self.size} members")
        if self.seeds is not None and len(self.seeds) != self.size:
            raise ValueError(f"seeds has {len(self.seeds)} values for {self.size} members")


def shards(size: int, count: int) -> List[List[int]]:
    """Contiguous, near-equal shards of the member ids 0 … size − 1 over min(count, size) workers (none empty)."""
    count = max(1, min(count, size))
    bounds = np.linspace(0, size, count + 1).round().astype(int)
    return [list(range(bounds[i], bounds[i + 1])) for i in range(count)]


def start_population(plan: PopulationPlan, members: Sequence[int], module: torch.nn.Module, device: torch.device,
                     factory: Callable[[int], torch.nn.Module]) -> Population:
    """Members `members` of `plan` on `device`, sharing `module` (its buffers stay shared, not trained).

    `factory(seed)` builds the module's architecture under a torch seed: each
    member's start when the plan has seeds.
    """
    names = [n for n, p in module.named_parameters() if p.is_floating_point()]
    if plan.seeds is None:
        own = dict(module.named_parameters())
        init = {n: own[n].detach().unsqueeze(0).expand(len(members), *own[n].shape) for n in names}
    else:
        starts = [dict(factory(plan.seeds[m]).named_parameters()) for m in members]
        init = {n: torch.stack([s[n].detach() for s in starts]) for n in names}
    batches = import_callable(plan.loader)(**plan.loader_kwargs)
    loss = import_callable(plan.loss)
    hyper = {n: [values[m] for m in members] for n, values in plan.hyper.items()}
    population = Population(module, members, init, plan.optimizer, hyper, list(batches), loss, device)
    population.factory = factory
    return population


#: A restarted member's start: the seed its weights are built under, or `MODEL_START` for the module's own.
Start = Union[int, str]
MODEL_START = "model"


@dataclass
class Train:
    """The source of a round's batch of a population study: per candidate (one member each), what happens to
    the member before it is evaluated. Per-candidate lists, so that a batch is cut by shard field by field.

    `donors[i]`: a member whose weights, optimiser state and hyperparameters
    member i takes first (exploit), or None; `hyper[i]`: values member i's
    hyperparameters take next (explore), or None; `steps[i]`: the training
    steps then (the same for every member a worker holds: they train together).

    `starts[i]` (when given): a start for member i before anything else — a new
    trial in its slot, from the factory under that seed or the module's own
    weights (`MODEL_START`) — or None. With `retire`, the members a worker holds
    that the batch does not list have stopped: their rows leave its population.
    """

    members: List[int]
    donors: List[Optional[int]]
    hyper: List[Optional[Dict[str, float]]]
    steps: List[int]
    starts: Optional[List[Optional[Start]]] = None
    retire: bool = False

    def __post_init__(self) -> None:
        n = len(self.members)
        for name in ("donors", "hyper", "steps") + (("starts",) if self.starts is not None else ()):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Train.{name} has {len(getattr(self, name))} entries for {n} members")


def train_round(population: Population, evaluator: Any, ids: Sequence[int], source: Train,
                imports: Optional[Mapping[int, Member]] = None) -> pa.Table:
    """One round of `population` (every member a worker holds): take the donors' rows (on this device, or from
    `imports`, {donor: its exported state} for donors held elsewhere), set the new hyperparameter values,
    train, then evaluate each member with `evaluator` (an `Evaluator`): its rows, keyed by `ids`, in the
    order of `source.members`. The training time is shared out over the rows' `eval_seconds`.
    """
    members = list(source.members)
    if len(set(members)) == len(members):
        if source.retire:
            population.retain(members)
        starts = {m: start for m, start in zip(members, source.starts or ()) if start is not None}
        if starts:
            population.restart(starts)
    if len(set(members)) != len(members) or set(members) != set(population.ids):
        raise ValueError(f"a round trains every member a worker holds, each once: the batch names members "
                         f"{_ids(members)}, this worker holds {_ids(population.ids)}")
    if len(ids) != len(members):
        raise ValueError(f"a round of {len(members)} members has {len(ids)} candidate ids")
    steps = set(source.steps)
    if len(steps) != 1:
        raise ValueError(f"the members of one worker train together: their steps must be equal, got {sorted(steps)}")
    imports = imports or {}
    receivers = {m for m, d in zip(members, source.donors) if d is not None}
    both = sorted(receivers & {d for d in source.donors if d is not None})
    if both:
        raise ValueError(f"member {both[0]} both gives and takes weights in one round")
    for member, donor in zip(members, source.donors):
        if donor is None:
            continue
        if donor in population.index:
            population.copy(donor, member)
        elif donor in imports:
            population.load(member, imports[donor])
        else:
            raise ValueError(f"member {member} takes member {donor}'s weights, which are neither on this worker "
                             f"nor among the states it was given ({_ids(sorted(imports))})")
    for member, values in zip(members, source.hyper):
        if values:
            population.set_hyper(member, values)
    start = time.perf_counter()
    population.train(steps.pop())
    trained = time.perf_counter() - start
    candidates = population.candidates()
    table = evaluator.run([candidates[population.index[m]] for m in members], ids=ids, timing=True)
    seconds = pc.add(table.column("eval_seconds"), trained / len(members))
    return table.set_column(table.schema.get_field_index("eval_seconds"), "eval_seconds", seconds)


def _ids(ids: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(str(i) for i in list(ids)[:limit])
    return f"[{shown}{', …' if len(ids) > limit else ''}]"
