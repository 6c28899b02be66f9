"""The app of the preload section's memory figure: it imports a heavy
library (numpy, from the venv's bench extra), as a model-serving app would."""

from typing import Any

import numpy

from pyfleet import App

app = App()
_table = numpy.arange(1 << 16, dtype=numpy.float64)


@app.function
def echo(payload: Any) -> Any:
    return payload


@app.function
def total(payload: Any) -> float:
    return float(_table.sum())
