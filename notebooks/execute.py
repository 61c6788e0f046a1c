"""Re-execute notebooks in place, as stored for nbval (what ``make notebooks`` runs).

    python notebooks/execute.py notebooks/03_general_instance_distillation.ipynb [...]

Two things differ from ``jupyter nbconvert --execute --inplace``:

- the kernel runs with ``KDLAB_PROFILE=quick`` unless set (the profile CI checks), and with the pinned CPU
  numerics of ``notebooks/conftest.py`` only when ``KDLAB_PIN_NUMERICS=1``;
- ``--update-references`` first runs the notebook with ``kdlab.notebook.expect_close`` recording instead of
  failing and writes the values it saw into the cells as their new stored references;
- the wait for each cell's reply polls the kernel's shell channel every second instead of blocking on one
  long read. A blocking read can miss the wake-up after a cell that opens ipywidgets comms
  (``widgets.interact``) and then sleep until the cell's whole timeout runs out (20 minutes per widget
  cell here; jupyter/nbclient#312, jupyter/nbconvert#1921). A short read that finds nothing is retried
  until the timeout, which still ends a cell that really hangs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from queue import Empty
from time import monotonic

import nbformat
from nbclient import NotebookClient
from nbclient.client import timestamp
from nbclient.util import ensure_async

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import PINNED_CPU_NUMERICS, pin_cpu_numerics, pinning_requested  # noqa: E402


class PollingClient(NotebookClient):
    """NotebookClient whose wait for an execute reply is a loop of short reads (see the module docstring)."""

    poll_interval = 1.0

    async def _async_poll_for_reply(self, msg_id, cell, timeout, task_poll_output_msg, task_poll_kernel_alive):
        deadline = None if timeout is None else monotonic() + timeout
        while True:
            wait = self.poll_interval if deadline is None else min(self.poll_interval, max(0.0, deadline - monotonic()))
            try:
                msg = await ensure_async(self.kc.shell_channel.get_msg(timeout=wait))
            except Empty:
                if deadline is not None and monotonic() >= deadline:
                    task_poll_kernel_alive.cancel()
                    await self._async_check_alive()
                    await self._async_handle_timeout(timeout, cell)  # raises CellTimeoutError
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if self.record_timing:
                cell["metadata"]["execution"]["shell.execute_reply"] = timestamp(msg)
            try:  # the reply can overtake the cell's last outputs: give them iopub_timeout to arrive
                await asyncio.wait_for(task_poll_output_msg, self.iopub_timeout)
            except (asyncio.TimeoutError, Empty):
                self.log.warning("Timeout waiting for IOPub output")
            task_poll_kernel_alive.cancel()
            return msg


def execute(path: Path, timeout: int) -> None:
    notebook = nbformat.read(path, as_version=4)
    PollingClient(notebook, timeout=timeout, kernel_name="python3",
                  resources={"metadata": {"path": str(path.parent)}}).execute()
    nbformat.write(notebook, path)


REFERENCE_CALL = re.compile(r'(expect_close\(\s*(?P<quote>["\'])(?P<name>[^"\']+)(?P=quote)\s*,[^,]+,\s*)'
                            r'(?P<ref>[-+0-9.eE]+)(?P<rest>\s*,)')


def update_references(path: Path, timeout: int) -> int:
    """Execute ``path`` with ``expect_close`` recording instead of failing, write each value it saw as the
    new stored reference in the cell sources, and return how many references changed.

    For a deliberate change of a trained result: the next (normal) execution then stores outputs that
    agree with the references. The name and the reference must be literals
    (``expect_close("00 student AP", value, 0.68, 1.0)``)."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "values.jsonl"
        saved = {k: os.environ.get(k) for k in ("KDLAB_RESULTS_LOG", "KDLAB_EXPECT_CLOSE")}
        os.environ.update(KDLAB_RESULTS_LOG=str(log), KDLAB_EXPECT_CLOSE="warn")
        try:
            execute(path, timeout)
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        values = {}
        for line in log.read_text().splitlines() if log.exists() else []:
            record = json.loads(line)
            values[record["name"]] = record["value"]
    notebook = nbformat.read(path, as_version=4)
    changed = 0

    def substitute(match: re.Match) -> str:
        nonlocal changed
        name = match["name"]
        if name not in values:
            return match.group(0)
        new = f"{values[name]:.4g}"
        if float(new) != float(match["ref"]):
            changed += 1
            print(f"  {name}: {match['ref']} -> {new}")
        return f"{match.group(1)}{new}{match['rest']}"

    for cell in notebook.cells:
        if cell.cell_type == "code" and "expect_close" in cell.source:
            cell.source = REFERENCE_CALL.sub(substitute, cell.source)
    nbformat.write(notebook, path)
    return changed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per cell (default: 1200)")
    parser.add_argument("--update-references", action="store_true",
                        help="first record every expect_close value as the new stored reference (after a deliberate "
                             "change of a trained result), then execute normally")
    args = parser.parse_args(argv)
    os.environ.setdefault("KDLAB_PROFILE", "quick")
    if pinning_requested():
        pin_cpu_numerics()
    pinned = " ".join(f"{k}={os.environ.get(k, '(unset)')}" for k in PINNED_CPU_NUMERICS)
    for path in args.notebooks:
        if not path.is_file():
            parser.error(f"{path}: no such notebook")
        start = monotonic()
        if args.update_references:
            print(f"{path}: {update_references(path, args.timeout)} reference(s) updated", flush=True)
        execute(path, args.timeout)
        print(f"{path}: executed in {monotonic() - start:.0f} s (KDLAB_PROFILE={os.environ['KDLAB_PROFILE']}, {pinned})",
              flush=True)


if __name__ == "__main__":
    main()
