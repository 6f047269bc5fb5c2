"""Search bytes for hidden test labels: what a challenge's public side must never contain.

`find_test_labels(data, held)` reads Parquet row by row (other bytes line by line, HTML by element) and reports
every record that names a test image (its image_id, the id's first 16 characters as the devkit's train names
use, or its devkit file name) together with that image's class (wnid), and any run of the test labels in order
(the devkit ground-truth layout: one class index or wnid per line). The tests run it over every file a
challenge release publishes, its exports and report, and every route of the server.
"""

from __future__ import annotations

import io
import re

from challenge.truth import HeldOut

_SPLIT = re.compile(r"\n|<tr|<li|</t[dh]>\s*</tr>|\},\s*\{")


def _records(data: bytes) -> list[str]:
    if data[:4] == b"PAR1":
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        cols = [c.to_pylist() for c in table.columns]
        return ["\t".join(map(str, row)) for row in zip(*cols, strict=True)] + [str(table.schema.metadata)]
    text = data.decode("utf-8", errors="replace")
    return _SPLIT.split(text)


def find_test_labels(data: bytes, held: HeldOut, what: str = "data", min_run: int = 8) -> list[str]:
    """Findings (empty when `data` reveals no test label)."""
    found = []
    idents = [(i, (image_id, image_id[:16], held.files[i])) for i, image_id in enumerate(held.image_ids)]
    for rec in _records(data):
        for i, names in idents:
            if any(n in rec for n in names):
                wnid = held.wnids[held.truth[i] - 1]
                if wnid in rec:
                    found.append(f"{what}: test image {held.image_ids[i][:16]} appears with its class {wnid}")
    if held.n >= min_run:
        text = data.decode("utf-8", errors="replace") if data[:4] != b"PAR1" else "\n".join(_records(data))
        for seq, label in ((held.truth.astype(str), "class indices"),
                           (([held.wnids[t - 1] for t in held.truth]), "wnids")):
            run = "\n".join(seq[:min_run])
            if run in text:
                found.append(f"{what}: the test labels ({label}) appear in test order")
    return found
