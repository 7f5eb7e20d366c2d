"""Importable user code for the integration tests (workers import it by name)."""


def broken_metrics(output, y):
    return {"loss": 1 / 0}


import os
import signal

import torch


class Fragile(torch.nn.Module):
    """y = x·w + scale; a candidate whose |scale| exceeds 100 kills the worker process outright."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4, 1))
        self.scale = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        if bool((self.scale.abs() > 100).any()):  # data-dependent: evaluated one candidate at a time
            os.kill(os.getpid(), signal.SIGKILL)
        return x @ self.w + self.scale


def fragile():
    return Fragile()


def fragile_data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g))]


def mse(output, y):
    return {"mse": ((output - y) ** 2).mean()}


def slow_digits_metrics(output, y):
    """The digits metrics, 30 ms slower per call: a batch is still running when a test kills its worker."""
    import time

    from sweep.examples import digits

    time.sleep(0.03)
    return digits.metrics(output, y)
