"""A local folder with one sub-folder of images per wnid (root/n02084071/*.jpg): the offline default.

Candidates are file:// URLs; the ingest stage reads them from disk (only under the roots collect runs recorded).

Provenance: any folder may hold a sidecar, `attribution.csv` or `attribution.json`, describing the files in that
folder (columns / keys: file, license, license_url, creator, title, source_url; only `file` is required). A file
the sidecar does not name gets the source's default license (`collect.local_license`, `collect --license`) and
creator (`collect.local_creator`). Sidecars are read, never listed as images.

    attribution.csv:
        file,license,creator,source_url
        cat1.jpg,CC BY 4.0,Ada Photographer,https://example.org/cat1
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.sources.base import Source, SourceConfigError, normalize_license

SIDECARS = ("attribution.csv", "attribution.json")
SIDECAR_FIELDS = ("file", "license", "license_url", "creator", "title", "source_url")


def read_sidecar(path: Path) -> dict[str, dict[str, Any]]:
    """file name -> its provenance, from one sidecar; every problem is listed with its line (or entry) number."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceConfigError(f"{path}: cannot read the attribution sidecar ({exc})") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SourceConfigError(f"{path}: not valid JSON ({exc}); expected a list of objects with a 'file' key "
                                    "or an object mapping file names to objects") from None
        if isinstance(data, dict):
            data = [{"file": k, **(v if isinstance(v, dict) else {"_bad": v})} for k, v in data.items()]
        if not isinstance(data, list):
            raise SourceConfigError(f"{path}: expected a list of objects or an object of objects, got {type(data).__name__}")
        entries = list(enumerate(data, start=1))
    else:
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or "file" not in reader.fieldnames:
            raise SourceConfigError(f"{path}: the first line must name the columns, including 'file' "
                                    f"(known: {', '.join(SIDECAR_FIELDS)})")
        entries = [(n, row) for n, row in enumerate(reader, start=2)]
    out: dict[str, dict[str, Any]] = {}
    problems = []
    for n, entry in entries:
        if not isinstance(entry, dict) or "_bad" in entry:
            problems.append(f"entry {n}: not an object")
            continue
        unknown = sorted(set(entry) - set(SIDECAR_FIELDS) - {None})
        name = str(entry.get("file") or "").strip()
        if unknown:
            problems.append(f"{'line' if path.suffix == '.csv' else 'entry'} {n}: unknown field(s) {unknown}")
        elif not name or "/" in name or "\\" in name or name in (".", ".."):
            problems.append(f"{'line' if path.suffix == '.csv' else 'entry'} {n}: 'file' must be a file name in "
                            f"this folder, got {name!r}")
        elif name in out:
            problems.append(f"line {n}: {name} is described twice")
        else:
            out[name] = {k: (str(v).strip() or None) if v is not None else None for k, v in entry.items() if k != "file"}
    if problems:
        raise SourceConfigError(f"{path}: {len(problems)} problem(s): {'; '.join(problems[:10])}; fix the sidecar and "
                                "rerun collect")
    return out


class LocalDirSource(Source):
    name = "local_dir"
    per_query = False

    def __init__(self, root: str | Path | None, *, license: str | None = None, creator: str | None = None):
        if not root:
            raise SourceConfigError("local_dir: collect.local_dir is not set; point it at a folder with one sub-folder per wnid")
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise SourceConfigError(f"local_dir: {self.root} is not a folder; create it with one sub-folder per wnid")
        self.default = {"license": license, "creator": creator}
        self._sidecars: dict[Path, dict[str, dict[str, Any]]] = {}

    def _sidecar(self, folder: Path) -> dict[str, dict[str, Any]]:
        if folder not in self._sidecars:
            found = [folder / n for n in SIDECARS if (folder / n).is_file()]
            if len(found) > 1:
                raise SourceConfigError(f"{folder}: both attribution.csv and attribution.json; keep one")
            self._sidecars[folder] = read_sidecar(found[0]) if found else {}
        return self._sidecars[folder]

    def search(self, synset: Mapping[str, Any], query: str | None, budget: int) -> Iterator[dict[str, Any]]:
        folder = self.root / str(synset["wnid"])
        if not folder.is_dir():
            return
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
                       and p.name not in SIDECARS)
        for p in files[:budget]:
            meta = self._sidecar(p.parent).get(p.name, {})  # a sidecar describes the files beside it
            lic = meta.get("license") or self.default["license"]
            yield {"url": p.as_uri(), "page_url": meta.get("source_url"), "title": meta.get("title") or p.stem,
                   "license": normalize_license(lic, meta.get("license_url")) or lic, "license_url": meta.get("license_url"),
                   "creator": meta.get("creator") or self.default["creator"]}
