"""Pinned CPU numerics for the notebooks' nbval run.

The stored outputs of the notebooks are compared digit by digit, and a few dozen training steps turn the
last bit of a float into a different second decimal. Which kernels PyTorch runs on a CPU depends on the
instruction set the machine offers (ATen's AVX2/AVX-512 code, oneDNN's convolutions, MKL's BLAS, which
also takes other paths on AMD than on Intel), and on the number of threads a reduction is split over. So
the same seed gives the same numbers on one machine, and different ones on the next.

These settings pin all of it to code every x86-64 CPU with SSE4.1 runs the same way, on two threads (the
CI machine's cores). They are set just before the first notebook's kernel starts (kernels inherit this
process's environment), so the unit tests under tests/ keep the fast kernels; `make notebooks`
(notebooks/execute.py) re-executes the notebooks under the same settings, so stored and re-computed
outputs agree across machines. A variable already set in the environment is left alone.
"""

import os

import pytest

PINNED_CPU_NUMERICS = {
    "ATEN_CPU_CAPABILITY": "default",  # ATen's baseline vector code, not the AVX2/AVX-512 variants
    "ONEDNN_MAX_CPU_ISA": "SSE41",  # oneDNN convolutions/matmuls: the same kernels on every x86-64
    "MKL_CBWR": "COMPATIBLE",  # MKL's conditional numerical reproducibility: one code path for all CPUs
    "OMP_NUM_THREADS": "2",  # reductions split the same way whatever the core count
}


def pin_cpu_numerics() -> None:
    for name, value in PINNED_CPU_NUMERICS.items():
        os.environ.setdefault(name, value)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # runs for the items of this directory only, before nbval's setup starts the notebook's kernel
    pin_cpu_numerics()
