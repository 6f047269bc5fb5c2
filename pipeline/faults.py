"""Failpoints: named places where a fault-recovery test can make a stage fail halfway, for real.

`SYNSETFORGE_FAILPOINTS="ingest.part_written=kill"` makes the first process that reaches that point kill itself
with SIGKILL (`raise` raises FaultInjected instead; `hang` waits there, at most SYNSETFORGE_FAILPOINT_HANG_S seconds
(default 600), for the test to kill the whole worker); `name=action*N` fires on the first N arrivals. Arrivals are
counted with exclusive marker files in `SYNSETFORGE_FAILPOINT_DIR`, so the count holds across processes and
retries: the retry of a task that was killed goes through. Unset (production), a failpoint is one dict lookup.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


class FaultInjected(RuntimeError):
    """Raised by a failpoint set to `raise`."""


def _spec() -> dict[str, tuple[str, int]]:
    out: dict[str, tuple[str, int]] = {}
    for item in filter(None, (s.strip() for s in os.environ.get("SYNSETFORGE_FAILPOINTS", "").split(","))):
        name, _, action = item.partition("=")
        action, _, times = action.partition("*")
        if action not in ("raise", "kill", "hang"):
            raise ValueError(f"SYNSETFORGE_FAILPOINTS: {item!r}: action must be raise, kill or hang")
        out[name] = (action, int(times or 1))
    return out


def failpoint(name: str) -> None:
    """Fire the fault configured for `name`, if any and if it has not fired its number of times yet."""
    if "SYNSETFORGE_FAILPOINTS" not in os.environ:
        return
    action, times = _spec().get(name, (None, 0))
    if action is None:
        return
    folder = Path(os.environ.get("SYNSETFORGE_FAILPOINT_DIR") or "")
    if not folder.is_dir():
        raise ValueError("SYNSETFORGE_FAILPOINT_DIR must name an existing folder when SYNSETFORGE_FAILPOINTS is set")
    for i in range(times):
        try:
            with (folder / f"{name}.{i}").open("x") as marker:  # exclusive: one arrival claims each firing
                marker.write(str(os.getpid()))  # which process fired (a test finds its worker by it)
        except FileExistsError:
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "hang":
            time.sleep(float(os.environ.get("SYNSETFORGE_FAILPOINT_HANG_S", "600")))
        raise FaultInjected(f"failpoint {name} fired ({i + 1} of {times})")
