"""Importable user code for the integration tests (workers import it by name)."""


def broken_metrics(output, y):
    return {"loss": 1 / 0}
