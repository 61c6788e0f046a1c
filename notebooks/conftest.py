"""Optional pinned CPU numerics for the notebooks' nbval run (off by default).

nbval compares verbatim only what cannot drift between CPUs; every result computed by a network is
printed in a cell tagged ``nbval-ignore-output`` and held to a tolerance by
``kdlab.notebook.expect_close`` (see ``notebooks/nbval_matrix.md`` for the spread measured across CPU
kernel settings). So the notebooks pass with whatever kernels a machine picks.

``KDLAB_PIN_NUMERICS=1`` still pins the kernels to code every x86-64 CPU with SSE4.1 runs the same way
(ATen's baseline vector code, oneDNN capped at SSE4.1, MKL's compatible path, 2 threads). On one machine
that reproduces a pinned execution bit for bit; across CPUs it does not (MKL takes other paths on Intel
and AMD even then), which is why the notebooks no longer rely on it. The settings are applied just before
a notebook's kernel starts (kernels inherit this process's environment), so the unit tests under tests/
keep the fast kernels; a variable already set in the environment is left alone.
"""

import os
from pathlib import Path

import pytest

PIN_SWITCH = "KDLAB_PIN_NUMERICS"
PINNED_CPU_NUMERICS = {
    "ATEN_CPU_CAPABILITY": "default",  # ATen's baseline vector code, not the AVX2/AVX-512 variants
    "ONEDNN_MAX_CPU_ISA": "SSE41",  # oneDNN convolutions/matmuls: the same kernels on every x86-64
    "MKL_CBWR": "COMPATIBLE",  # MKL's conditional numerical reproducibility: one code path per vendor
    "OMP_NUM_THREADS": "2",  # reductions split the same way whatever the core count
}


def pinning_requested() -> bool:
    return os.environ.get(PIN_SWITCH, "0") == "1"


def pin_cpu_numerics() -> None:
    for name, value in PINNED_CPU_NUMERICS.items():
        os.environ.setdefault(name, value)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # runs for the items of this directory only, before nbval's setup starts the notebook's kernel
    if pinning_requested():
        pin_cpu_numerics()


# Outputs that depend on the shared data beside the repository (``../shared``: minicoco's real COCO images,
# the docs' METHODS.md). A notebook that uses it runs without it too, on a generated stand-in, and says so;
# its cells tagged ``kdlab-shared-data-output`` are then executed but not compared verbatim (their stored
# outputs were made with ``../shared`` present, as CI has it). Their own asserts still run.
SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_DATA_TAG = "kdlab-shared-data-output"
SHARED_FILES = (SHARED / "data" / "minicoco" / "annotations" / "instances_val2017.json", SHARED / "docs" / "METHODS.md")


def shared_data_present() -> bool:
    return all(path.is_file() for path in SHARED_FILES)


def pytest_collection_modifyitems(config, items):
    if shared_data_present():
        return
    for item in items:
        cell, options = getattr(item, "cell", None), getattr(item, "options", None)
        if isinstance(options, dict) and cell is not None and SHARED_DATA_TAG in cell.get("metadata", {}).get("tags", []):
            options["check"] = False
