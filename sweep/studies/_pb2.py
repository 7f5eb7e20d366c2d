"""PB2's explore: a receiver's new hyperparameters from a GP-UCB bandit (Parker-Holder et al. 2020).

PBT's exploit stays as it is (the bottom quantile copy the top). Where PBT
perturbs the donor's values, PB2 fits a Gaussian process to what the
population has seen so far: for every member and interval, the point
(time, the objective it started the interval with, its hyperparameters) and
how much the objective improved over that interval. A receiver takes the
hyperparameters that maximise the upper confidence bound of that improvement
at the next interval, starting from the donor's objective. Receivers of one
round are chosen in turn: each chosen point joins the population's running
configurations, so the next receiver's uncertainty there is lower and it
looks elsewhere (the batch rule of Ray Tune's `PB2`).

As Ray Tune's `pb2_utils` does: every input scaled to [0, 1] (a loguniform
hyperparameter on its log scale), the improvements standardised, the UCB's
κ = √(0.2 + max(0, log(0.4 · n))) for n observations, the acquisition
maximised over random points and then by L-BFGS-B from the best of them.
The GP is scikit-learn's `GaussianProcessRegressor` (a constant times an
anisotropic RBF kernel plus white noise) — scikit-learn is already one of
sweep's requirements. Ray Tune's time-varying kernel is replaced by time as
one more input with its own length scale, over the last `window`
observations. Every random choice comes from the study's generator.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np

from ..population import Dimension

#: Observations the GP is fitted on (the most recent); fitting it grows as the cube of their count.
WINDOW = 256
#: Random points the acquisition is evaluated at, and how many of the best are polished by L-BFGS-B.
RANDOM_POINTS = 2000
POLISHED = 1


class PB2Explore:
    """The data and the bandit of one PB2 study over `dims` (continuous and integer hyperparameters)."""

    def __init__(self, dims: Mapping[str, Dimension], mode: str, rng: np.random.Generator):
        choices = [n for n, d in dims.items() if d.distribution == "choice"]
        if choices:
            raise ValueError(f"{choices[0]}: PB2 searches continuous and integer hyperparameters (uniform, "
                             f"loguniform, int); a choice has no distance for its Gaussian process")
        if not dims:
            raise ValueError("PB2 needs at least one searched hyperparameter")
        self.dims = dict(dims)
        self.names = list(dims)
        self.sign = 1.0 if mode == "max" else -1.0
        self.rng = rng
        self.rows: List[Tuple[float, float, np.ndarray, float]] = []  # (time, start value, unit point, gain)
        self._kernel = None  # the GP's kernel as last fitted

    # ------------------------------------------------------------------ scaling

    def unit(self, values: Mapping[str, float]) -> np.ndarray:
        out = []
        for n in self.names:
            d, v = self.dims[n], float(values[n])
            if d.distribution == "loguniform":
                lo, hi, v = math.log(d.low), math.log(d.high), math.log(max(v, 1e-300))
            else:
                lo, hi = d.low, d.high
            out.append((v - lo) / (hi - lo))
        return np.asarray(out, dtype=np.float64)

    def values(self, point: np.ndarray) -> Dict[str, float]:
        out = {}
        for n, u in zip(self.names, np.clip(point, 0.0, 1.0)):
            d = self.dims[n]
            if d.distribution == "loguniform":
                v = math.exp(math.log(d.low) + float(u) * (math.log(d.high) - math.log(d.low)))
            else:
                v = d.low + float(u) * (d.high - d.low)
            out[n] = float(round(v)) if d.distribution == "int" else v
        return out

    # ------------------------------------------------------------------ data

    def observe(self, time: float, start: Mapping[int, float], end: Mapping[int, float],
                hyper: Mapping[int, Mapping[str, float]]) -> None:
        """One interval: member m started it at objective `start[m]`, ended at `end[m]`, trained with
        `hyper[m]`. Members with a value that is not finite at either end are left out."""
        for m, before in start.items():
            after = end.get(m, math.nan)
            if before is None or after is None or not (math.isfinite(before) and math.isfinite(after)):
                continue
            self.rows.append((float(time), float(before), self.unit(hyper[m]), self.sign * (after - before)))
        del self.rows[:-WINDOW]

    # ------------------------------------------------------------------ proposals

    def propose(self, time: float, starts: Sequence[float], running: Sequence[Mapping[str, float]]
                ) -> List[Dict[str, float]]:
        """New values for receivers that start the next interval at objectives `starts` (their donors'),
        while the members in `running` go on with their values: one GP-UCB choice per receiver, each
        joining `running` before the next. With fewer than two observations, uniform draws."""
        if len(self.rows) < 2:
            return [self.values(self.rng.random(len(self.names))) for _ in starts]
        from threadpoolctl import threadpool_limits

        # Matrices of a few hundred rows: BLAS's threads cost more than they give (5× on 2 busy cores).
        with threadpool_limits(1):
            return self._propose(time, starts, running)

    def _propose(self, time: float, starts: Sequence[float], running: Sequence[Mapping[str, float]]
                 ) -> List[Dict[str, float]]:
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

        t = np.array([r[0] for r in self.rows])
        v = np.array([r[1] for r in self.rows])
        t_lo, t_hi = float(min(t.min(), time)), float(max(t.max(), time))
        v_lo, v_hi = float(min(v.min(), min(starts))), float(max(v.max(), max(starts)))

        def scaled(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
            return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)

        X = np.column_stack([scaled(t, t_lo, t_hi), scaled(v, v_lo, v_hi), np.stack([r[2] for r in self.rows])])
        y = np.array([r[3] for r in self.rows])
        y = (y - y.mean()) / (y.std() if y.std() > 0 else 1.0)
        width = X.shape[1]
        # The last round's fitted kernel is where this round's fit starts: the data grew by one interval,
        # so its optimum moved little (a third of the likelihood evaluations of a cold start).
        kernel = self._kernel or (ConstantKernel(1.0, (1e-3, 1e3)) * RBF(np.ones(width), (1e-2, 1e2))
                                  + WhiteKernel(0.1, (1e-6, 1e1)))
        seed = int(self.rng.integers(2**31))
        with warnings.catch_warnings():  # a length scale at its bound is a fit, not a failure
            warnings.simplefilter("ignore")
            model = GaussianProcessRegressor(kernel, normalize_y=False, random_state=seed).fit(X, y)
        self._kernel = model.kernel_
        kappa = math.sqrt(0.2 + max(0.0, math.log(0.4 * len(X))))
        now = float(scaled(np.array(time), t_lo, t_hi))
        pending = [self.unit(h) for h in running]
        out = []
        for start in starts:
            fixed = np.array([now, float(scaled(np.array(start), v_lo, v_hi))])
            spread = self._spread(model, X, fixed, pending)
            point = self._maximise(model, spread, fixed, kappa)
            out.append(self.values(point))
            pending.append(point)
        return out

    @staticmethod
    def _spread(model, X: np.ndarray, fixed: np.ndarray, pending: List[np.ndarray]):
        """The GP's standard deviation once the running configurations (at this time and start) are
        observed too: their values do not matter for it, only where they are."""
        if not pending:
            return lambda points: model.predict(points, return_std=True)[1]
        from sklearn.gaussian_process import GaussianProcessRegressor

        extra = np.column_stack([np.tile(fixed, (len(pending), 1)), np.stack(pending)])
        both = np.vstack([X, extra])
        other = GaussianProcessRegressor(model.kernel_, optimizer=None, normalize_y=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            other.fit(both, np.zeros(len(both)))
        return lambda points: other.predict(points, return_std=True)[1]

    def _maximise(self, model, spread, fixed: np.ndarray, kappa: float) -> np.ndarray:
        from scipy.optimize import minimize

        d = len(self.names)

        def ucb(points: np.ndarray) -> np.ndarray:
            full = np.column_stack([np.tile(fixed, (len(points), 1)), points])
            return model.predict(full) + kappa * spread(full)

        candidates = self.rng.random((RANDOM_POINTS, d))
        scores = ucb(candidates)
        best = candidates[int(np.argmax(scores))]
        best_score = float(scores.max())
        for start in candidates[np.argsort(scores)[-POLISHED:]]:
            found = minimize(lambda p: -float(ucb(p.reshape(1, -1))[0]), start, method="L-BFGS-B",
                             bounds=[(0.0, 1.0)] * d, options={"maxiter": 50})
            if -found.fun > best_score:
                best, best_score = np.clip(found.x, 0.0, 1.0), float(-found.fun)
        return best
