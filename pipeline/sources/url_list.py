"""A list of image URLs, as img2dataset and LAION take them: .txt (one URL per line, optionally followed by
whitespace and a wnid), .csv or .parquet with a `url` column and optional `wnid`, `title`/`caption`/`text`,
`license`, `license_url`, `creator`, `page_url` columns.

With a wnid column, each synset gets its own rows. Without one (a LAION-style caption list), a synset gets
the rows whose caption contains one of its queries as whole words.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.sources.base import CANDIDATE_FIELDS, Source, SourceConfigError, SourceError, normalize_license

_CAPTION_COLUMNS = ("caption", "text", "title", "TEXT")


def read_url_list(path: str | Path) -> pd.DataFrame:
    """Read a txt/csv/parquet URL list into a frame with at least a `url` column (str)."""
    p = Path(path)
    if not p.is_file():
        raise SourceConfigError(f"url_list: file {p} does not exist; set collect.url_list to a .txt, .csv or .parquet file")
    suffix = p.suffix.lower()
    try:
        if suffix == ".parquet":
            df = pd.read_parquet(p)
        elif suffix in (".csv", ".tsv"):
            df = pd.read_csv(p, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
        else:
            rows = []
            for line in p.read_text(errors="replace").splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                parts = line.split()
                rows.append({"url": parts[0], "wnid": parts[1] if len(parts) > 1 else None})
            df = pd.DataFrame(rows, columns=["url", "wnid"])
            if df["wnid"].isna().all():
                df = df.drop(columns=["wnid"])
    except (OSError, ValueError, ImportError) as exc:
        raise SourceError(f"url_list: cannot read {p}: {exc}") from exc
    if "url" not in df.columns and "URL" in df.columns:
        df = df.rename(columns={"URL": "url"})
    if "url" not in df.columns:
        raise SourceConfigError(f"url_list: {p} has no 'url' column (columns: {list(df.columns)[:10]}); add a header row")
    df = df[df["url"].astype(str).str.len() > 0].copy()
    df["url"] = df["url"].astype(str)
    return df.reset_index(drop=True)


class UrlListSource(Source):
    name = "url_list"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        df = self.frame
        self.per_query = "wnid" not in df.columns
        self.caption_column = next((c for c in _CAPTION_COLUMNS if c in df.columns), None)
        if self.per_query and self.caption_column is None:
            raise SourceConfigError(
                f"url_list: {self.path} has neither a 'wnid' column nor a caption column ({', '.join(_CAPTION_COLUMNS)}); "
                "add a wnid per URL so each synset knows its candidates"
            )

    @cached_property
    def frame(self) -> pd.DataFrame:
        return read_url_list(self.path)

    @cached_property
    def _by_wnid(self) -> dict[str, pd.DataFrame]:
        return {str(k): g for k, g in self.frame.groupby("wnid", sort=False)}

    def _row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        out = {k: (row.get(k) if isinstance(row.get(k), str) and row.get(k) else None) for k in CANDIDATE_FIELDS}
        out["url"] = str(row["url"])
        if out["title"] is None and self.caption_column:
            out["title"] = row.get(self.caption_column) or None
        out["license"] = normalize_license(out["license"], out["license_url"])
        return out

    def search(self, synset: Mapping[str, Any], query: str | None, budget: int) -> Iterator[dict[str, Any]]:
        if not self.per_query:
            rows = self._by_wnid.get(str(synset["wnid"]))
        else:
            if not query:
                return
            pattern = r"(?<!\w)" + re.escape(query.lower()) + r"(?!\w)"
            mask = self.frame[self.caption_column].astype(str).str.lower().str.contains(pattern, regex=True)
            rows = self.frame[mask]
        if rows is None:
            return
        for _, row in rows.head(budget).iterrows():
            yield self._row(row)
