"""Re-execute notebooks in place, as stored for nbval (what ``make notebooks`` runs).

    python notebooks/execute.py notebooks/03_general_instance_distillation.ipynb [...]

Two things differ from ``jupyter nbconvert --execute --inplace``:

- the kernel runs with the pinned CPU numerics of ``notebooks/conftest.py`` (the ones nbval's kernels get),
  and ``KDLAB_PROFILE=quick`` unless set, so the stored outputs are the ones CI recomputes;
- the wait for each cell's reply polls the kernel's shell channel every second instead of blocking on one
  long read. A blocking read can miss the wake-up after a cell that opens ipywidgets comms
  (``widgets.interact``) and then sleep until the cell's whole timeout runs out (20 minutes per widget
  cell here; jupyter/nbclient#312, jupyter/nbconvert#1921). A short read that finds nothing is retried
  until the timeout, which still ends a cell that really hangs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from queue import Empty
from time import monotonic

import nbformat
from nbclient import NotebookClient
from nbclient.client import timestamp
from nbclient.util import ensure_async

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import PINNED_CPU_NUMERICS, pin_cpu_numerics  # noqa: E402


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per cell (default: 1200)")
    args = parser.parse_args(argv)
    os.environ.setdefault("KDLAB_PROFILE", "quick")
    pin_cpu_numerics()
    pinned = " ".join(f"{k}={os.environ[k]}" for k in PINNED_CPU_NUMERICS)
    for path in args.notebooks:
        if not path.is_file():
            parser.error(f"{path}: no such notebook")
        start = monotonic()
        execute(path, args.timeout)
        print(f"{path}: executed in {monotonic() - start:.0f} s (KDLAB_PROFILE={os.environ['KDLAB_PROFILE']}, {pinned})",
              flush=True)


if __name__ == "__main__":
    main()
