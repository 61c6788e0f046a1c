"""Checks for the notebooks: a trained result held to a stated tolerance around its stored value.

nbval compares a notebook's stored outputs with a fresh run character by character. That is the
right check for what cannot drift (derivations on fixed tensors, shapes, counts, configuration
tables), and the wrong one for anything computed by a network: PyTorch, oneDNN and MKL choose their
kernels by CPU, so the same seed gives results that differ in the last bits on another machine, and
a few dozen training steps turn that into a different second decimal.

Such a result is printed in a cell tagged ``nbval-ignore-output`` and checked by :func:`expect_close`
next to it: the notebook fails when the value leaves ``reference +- tolerance``, so a real
regression is still caught. Each tolerance is set from the spread measured across CPU kernel
settings by ``make nbval-matrix`` (``notebooks/nbval_matrix.py``, table in
``notebooks/nbval_matrix.md``).

With ``KDLAB_RESULTS_LOG=path`` set, every checked value is also appended to that JSON-lines file
(the matrix run reads them back to measure the spread). ``KDLAB_EXPECT_CLOSE=warn`` turns a value
outside its band into a warning instead of an error: ``notebooks/execute.py --update-references``
uses it to record new references after a deliberate change, then re-executes with the checks on.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

RESULTS_LOG_ENV = "KDLAB_RESULTS_LOG"
MODE_ENV = "KDLAB_EXPECT_CLOSE"


def expect_close(name: str, value: float, reference: float, tolerance: float, *, relative: bool = False,
                 quiet: bool = False) -> float:
    """Assert ``|value - reference| <= tolerance`` (or ``<= tolerance * |reference|`` with ``relative``).

    Args:
        name: what the value is, unique within the notebook suite (e.g. ``"00 student AP"``).
        value: the freshly computed result.
        reference: the value stored when the notebook was executed for the repository.
        tolerance: allowed absolute deviation (a fraction of ``|reference|`` with ``relative``).
        relative: interpret ``tolerance`` relative to ``|reference|``.
        quiet: do not print the one-line report.

    Returns:
        ``value``, so a cell can go on using it.

    Raises:
        AssertionError: the value is not finite or lies outside the band; the message names the
            value, the reference and the band.
    """
    value = float(value)
    if not tolerance >= 0:
        raise ValueError(f"expect_close({name!r}): tolerance must be >= 0, got {tolerance}")
    band = tolerance * abs(reference) if relative else tolerance
    _record(name, value, reference, band)
    shown = f"{tolerance:.0%} = {band:.3g}" if relative else f"{band:g}"
    if not (math.isfinite(value) and abs(value - reference) <= band):
        message = (f"{name} = {value:.6g}, outside the expected {reference:g} +- {shown} "
                   f"(stored reference +- the cross-CPU tolerance; see notebooks/nbval_matrix.md)")
        if os.environ.get(MODE_ENV) == "warn":
            warnings.warn(message, stacklevel=2)
        else:
            raise AssertionError(message)
    if not quiet:
        print(f"check: {name} = {value:.4g} (stored {reference:g}, tolerance +- {shown})")
    return value


def _record(name: str, value: float, reference: float, band: float) -> None:
    path = os.environ.get(RESULTS_LOG_ENV)
    if not path:
        return
    record = {"name": name, "value": value, "reference": reference, "band": band}
    with Path(path).open("a") as log:
        log.write(json.dumps(record) + "\n")
