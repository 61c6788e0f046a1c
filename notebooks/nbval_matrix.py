"""Run nbval over the notebooks under CPU kernel settings that change the last bits (``make nbval-matrix``).

    python notebooks/nbval_matrix.py                      # the pairwise matrix, every notebook
    python notebooks/nbval_matrix.py --matrix full        # all 24 combinations
    python notebooks/nbval_matrix.py notebooks/00_quickstart.ipynb --matrix pairwise
    python notebooks/nbval_matrix.py notebooks/04_*.ipynb --only 1 2   # notebooks first, then the settings

PyTorch, oneDNN and MKL pick their kernels by CPU, so the same seeded run gives different last bits on
another machine. This script emulates other machines on this one by forcing the choices:

- ``ATEN_CPU_CAPABILITY``: ``default`` (baseline), ``avx2``, ``avx512`` (only where the CPU has it);
- ``ONEDNN_MAX_CPU_ISA``: ``SSE41``, ``AVX2``;
- ``MKL_CBWR``: ``COMPATIBLE``, ``AUTO``;
- ``OMP_NUM_THREADS``: 1, 2.

``--matrix pairwise`` (default) runs 6 settings that cover every pair of values of any two variables (an
orthogonal covering array), plus the machine's own choice (nothing set) and the legacy pins
(``KDLAB_PIN_NUMERICS=1``); ``--matrix full`` runs all combinations. Each setting runs nbval over the
notebooks in a fresh ``runs/`` (results a notebook would otherwise reuse are moved aside first), with
``KDLAB_RESULTS_LOG`` set so that every value checked by ``kdlab.notebook.expect_close`` is recorded.

Output (stdout, and ``--out``, default ``notebooks/nbval_matrix.md``): a pass table (setting x notebook)
and, for every checked value, its stored reference, the range measured across the settings, the largest
deviation and the tolerance band the notebook allows. The tolerances in the notebooks are chosen from
that spread.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "OMP_NUM_THREADS")
CLEARED = (*VARIABLES, "KDLAB_PIN_NUMERICS", "KDLAB_RESULTS_LOG")
# 6 rows covering every pair of values of any two variables (ATen has 3 values, the others 2)
PAIRWISE = [
    ("default", "SSE41", "COMPATIBLE", "1"),
    ("default", "AVX2", "AUTO", "2"),
    ("avx2", "SSE41", "AUTO", "2"),
    ("avx2", "AVX2", "COMPATIBLE", "1"),
    ("avx512", "SSE41", "COMPATIBLE", "2"),
    ("avx512", "AVX2", "AUTO", "1"),
]


def cpu_has_avx512() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512f" in flags


def settings(matrix: str) -> list[tuple[str, dict[str, str]]]:
    """``[(label, environment overrides)]`` of the chosen matrix."""
    if matrix == "full":
        rows = list(itertools.product(("default", "avx2", "avx512"), ("SSE41", "AVX2"), ("COMPATIBLE", "AUTO"), ("1", "2")))
    else:
        rows = list(PAIRWISE)
    if not cpu_has_avx512():
        rows = [r if r[0] != "avx512" else ("avx2", *r[1:]) for r in rows]
        rows = list(dict.fromkeys(rows))
    result = [(" ".join(row), dict(zip(VARIABLES, row))) for row in rows]
    if matrix == "pairwise":
        result.append(("machine's own choice (nothing set)", {}))
        result.append(("legacy pins (KDLAB_PIN_NUMERICS=1)", {"KDLAB_PIN_NUMERICS": "1"}))
    return result


def aten_capability(env: dict[str, str]) -> str:
    code = "import torch; print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    return out.stdout.strip() or "?"


def move_runs_aside(stash: Path) -> None:
    """Notebooks reuse finished quick runs found under runs/: start every setting without them."""
    runs = ROOT / "runs"
    if runs.is_dir():
        for entry in runs.iterdir():
            if entry.name[:2].isdigit():  # the notebooks' own run folders (00_..., 03_...)
                target = stash / f"{entry.name}.{time.monotonic_ns()}"
                shutil.move(str(entry), target)


def run_setting(label: str, overrides: dict[str, str], notebooks: list[Path], work: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update(overrides)
    env.setdefault("KDLAB_PROFILE", "quick")
    log = work / f"values_{abs(hash(label))}.jsonl"
    junit = work / f"junit_{abs(hash(label))}.xml"
    env["KDLAB_RESULTS_LOG"] = str(log)
    move_runs_aside(work / "stash")
    command = [sys.executable, "-m", "pytest", *map(str, notebooks), "--nbval", "--nbval-sanitize-with",
               str(ROOT / "notebooks" / "sanitize.cfg"), "-p", "no:cacheprovider", "-q", f"--junitxml={junit}"]
    start = time.monotonic()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    per_notebook: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    failures = []
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            found = re.search(r"(\d\d_[A-Za-z0-9_]+)\.ipynb", case.get("classname", "") + " " + case.get("file", ""))
            name = found.group(1) if found else case.get("classname", "?")
            failed = case.find("failure") is not None or case.find("error") is not None
            per_notebook[name][0 if not failed else 1] += 1
            if failed:
                failures.append(f"{name}::{case.get('name')}")
    values = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return {"label": label, "capability": aten_capability(env), "seconds": seconds, "returncode": proc.returncode,
            "per_notebook": dict(per_notebook), "failures": failures, "values": values,
            "tail": proc.stdout[-3000:] if proc.returncode not in (0, 1) else ""}


def report(results: list[dict], notebooks: list[Path]) -> str:
    names = [p.stem for p in notebooks]
    lines = ["# nbval across CPU kernel settings", "",
             f"`python notebooks/nbval_matrix.py` on this machine ({platform_line()}); notebooks' quick profile.",
             "Each cell: code cells passed / collected.", "",
             "| setting (ATen, oneDNN, MKL, threads) | ATen kernels, threads | " + " | ".join(names) + " | wall s |",
             "|---|---|" + "---|" * len(names) + "---|"]
    for r in results:
        cells = []
        for name in names:
            passed, failed = r["per_notebook"].get(name, [0, 0])
            cells.append(f"{passed}/{passed + failed}" + (" **FAIL**" if failed else ""))
        lines.append(f"| {r['label']} | {r['capability']} | " + " | ".join(cells) + f" | {r['seconds']:.0f} |")
    failures = [f"{r['label']}: {f}" for r in results for f in r["failures"]]
    lines += ["", "Failures: " + ("none" if not failures else "; ".join(failures)), ""]
    by_name: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        for v in r["values"]:
            by_name[v["name"]].append(v)
    lines += ["## Checked values (kdlab.notebook.expect_close)", "",
              "| value | stored | min | max | largest deviation | allowed |", "|---|---|---|---|---|---|"]
    for name in sorted(by_name):
        vs = by_name[name]
        values = [v["value"] for v in vs]
        reference, band = vs[0]["reference"], vs[0]["band"]
        deviation = max(abs(x - reference) for x in values)
        lines.append(f"| {name} | {reference:.4g} | {min(values):.4g} | {max(values):.4g} | {deviation:.3g} | "
                     f"+- {band:.3g} |")
    return "\n".join(lines) + "\n"


def platform_line() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, AVX-512 {'yes' if cpu_has_avx512() else 'no'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/[0-9]*.ipynb")
    parser.add_argument("--matrix", choices=("pairwise", "full"), default="pairwise")
    parser.add_argument("--out", type=Path, default=ROOT / "notebooks" / "nbval_matrix.md")
    parser.add_argument("--only", type=int, nargs="+", metavar="N",
                        help="run only these settings of the matrix (numbered from 1 in the order listed above)")
    args = parser.parse_args(argv)
    notebooks = args.notebooks or sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
    notebooks = [p.resolve() for p in notebooks]
    chosen = settings(args.matrix)
    if args.only:
        bad = [i for i in args.only if not 1 <= i <= len(chosen)]
        if bad:
            parser.error(f"--only: settings are numbered 1..{len(chosen)}, got {bad}")
        chosen = [chosen[i - 1] for i in args.only]
    results = []
    with tempfile.TemporaryDirectory(prefix="nbval_matrix_") as tmp:
        for label, overrides in chosen:
            result = run_setting(label, overrides, notebooks, Path(tmp))
            results.append(result)
            status = "ok" if not result["failures"] and result["returncode"] == 0 else f"FAILED {result['failures']}"
            print(f"[{label}] {result['capability']}: {status} ({result['seconds']:.0f} s)", flush=True)
            if result["tail"]:
                print(result["tail"], flush=True)
            # the table so far: a long matrix interrupted keeps what it measured
            args.out.write_text(report(results, notebooks))
    text = report(results, notebooks)
    args.out.write_text(text)
    print(text)
    print(f"written to {args.out}")
    return 0 if all(not r["failures"] and r["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
