"""The optional pinned CPU numerics of the notebooks (notebooks/conftest.py, KDLAB_PIN_NUMERICS=1) and the runner
that re-executes them (notebooks/execute.py): pins only on request, widget cells do not stall the runner, and
--update-references rewrites the stored references of kdlab.notebook.expect_close."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pinned_in_conftest() -> dict[str, str]:
    spec = importlib.util.spec_from_file_location("notebooks_conftest", ROOT / "notebooks" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PINNED_CPU_NUMERICS


def test_pinned_settings_take_effect_in_a_new_process():
    pinned = pinned_in_conftest()
    assert set(pinned) == {"ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "OMP_NUM_THREADS"}
    env = {**os.environ, **pinned}
    code = "import torch; print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["DEFAULT", "2"]


def cell(source: str) -> dict:
    return {"cell_type": "code", "execution_count": None, "id": f"c{abs(hash(source)) % 10**8}", "metadata": {},
            "outputs": [], "source": source}


def run_probe(tmp_path, cells, extra_env, *args):
    notebook = {"cells": cells, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
                "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "probe.ipynb"
    path.write_text(json.dumps(notebook))
    env = {k: v for k, v in os.environ.items()
           if k not in pinned_in_conftest() and k not in ("KDLAB_PROFILE", "KDLAB_PIN_NUMERICS")}
    subprocess.run([sys.executable, str(ROOT / "notebooks" / "execute.py"), str(path), "--timeout", "120", *args],
                   env={**env, **extra_env}, check=True, capture_output=True, text=True, timeout=300)
    return json.loads(path.read_text())["cells"]


PROBE = "import os, torch\nprint(torch.backends.cpu.get_cpu_capability(), os.environ.get('MKL_CBWR'), os.environ['KDLAB_PROFILE'])"


@pytest.mark.slow
def test_execute_runs_widget_cells_and_pins_only_on_request(tmp_path):
    widget = cell("import ipywidgets as widgets\nwidgets.interact(lambda k=3: print(k * 7), k=(1, 5));")
    cells = run_probe(tmp_path, [widget, cell(PROBE)], {"KDLAB_PIN_NUMERICS": "1"})
    text = "".join(cells[0]["outputs"][0]["data"]["text/plain"])
    assert text.startswith("interactive(children=(IntSlider(value=3, description='k', max=5, min=1)")
    assert "".join(cells[1]["outputs"][0]["text"]).split() == ["DEFAULT", "COMPATIBLE", "quick"]
    cells = run_probe(tmp_path, [cell(PROBE)], {})  # the default: the machine's own kernels
    assert "".join(cells[0]["outputs"][0]["text"]).split()[1:] == ["None", "quick"]


@pytest.mark.slow
def test_update_references_rewrites_the_stored_value(tmp_path):
    source = "from kdlab.notebook import expect_close\nexpect_close('probe value', 2.0 + 1.0, 1.0, 0.5)"
    cells = run_probe(tmp_path, [cell(source)], {}, "--update-references")
    assert "expect_close('probe value', 2.0 + 1.0, 3, 0.5)" in "".join(cells[0]["source"])
    assert "".join(cells[0]["outputs"][0]["text"]).startswith("check: probe value = 3 (stored 3, tolerance +- 0.5)")
