"""Release manifests: where a release lives, how readers find it, and `verify` (re-hash every file).

A release is the folder releases/<version>/ in the store. Data files are written first under
content-addressed names (releases/<version>/data/<table>-<sha256[:16]>.parquet), then manifest.json with
an exclusive put (local: link(2) fails on an existing file; S3: If-None-Match: *). Consequences:
- a folder without manifest.json is invisible (`list_releases` skips it); a crashed build leaves only
  unreferenced files, and re-running the build finishes it;
- two builders racing on one version cannot overwrite each other's data files (different content,
  different names) and only one manifest wins;
- a published version is never overwritten.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import SynsetforgeError, UserError
from pipeline.schemas import SCHEMA_DIR, schema_version, validate
from pipeline.store import LocalStore, MissingKey, Store

RELEASES = "releases"
MANIFEST = "manifest.json"
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ReleaseError(SynsetforgeError, RuntimeError):
    """A release cannot be built, read or published; the message says which and what to do."""


class ReleaseExists(ReleaseError, UserError):
    """The version already has a manifest: releases are immutable."""


class ReleaseInputError(ReleaseError, UserError):
    """The inputs or options cannot make the release asked for (a bad quota, classes left without train or
    val images); the message says what to change. Not retried."""


class ReleaseTooSmall(ReleaseInputError):
    """Some classes would have no train or no val image; `classes` lists them (wnid, name, train, val, test)."""

    def __init__(self, message: str, classes: list[dict[str, Any]]):
        super().__init__(message)
        self.classes = classes


def check_version(version: str) -> str:
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise ReleaseError(
            f"release version {version!r} is not valid: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (e.g. 2026.1 or v3)"
        )
    return version


def release_prefix(version: str) -> str:
    return f"{RELEASES}/{check_version(version)}"


def manifest_key(version: str) -> str:
    return f"{release_prefix(version)}/{MANIFEST}"


@cache
def _manifest_validator() -> Any:
    import jsonschema

    doc = json.loads((SCHEMA_DIR / "release_manifest.json").read_text())
    return jsonschema.Draft202012Validator(doc)


def validate_manifest(doc: dict[str, Any]) -> dict[str, Any]:
    """Raise ReleaseError listing every way `doc` breaks schemas/release_manifest.json."""
    errors = sorted(_manifest_validator().iter_errors(doc), key=lambda e: list(e.path))
    if errors:
        text = "; ".join(f"{'/'.join(map(str, e.path)) or '(top)'}: {e.message}" for e in errors[:10])
        raise ReleaseError(f"manifest of release {doc.get('version')!r} does not match its schema: {text}")
    return doc


def _manifest_versions(store: Store) -> list[str]:
    # list "releases" without a trailing slash: S3Store.list rejects "releases/" as a key (empty last part)
    found = []
    for key in store.list(RELEASES):
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == RELEASES and parts[2] == MANIFEST:
            found.append(parts[1])
    return found


def list_releases(store: Store) -> list[str]:
    """Versions that have a manifest (complete releases), sorted by creation time then name."""
    found = _manifest_versions(store)
    manifests = {v: read_manifest(store, v) for v in found}
    return sorted(found, key=lambda v: (manifests[v]["created_at"], v))


def release_exists(store: Store, version: str) -> bool:
    return store.exists(manifest_key(version))


def read_manifest(store: Store, version: str) -> dict[str, Any]:
    try:
        raw = store.get(manifest_key(version))
    except MissingKey:
        known = _manifest_versions(store)
        raise ReleaseError(
            f"release {version!r} not found in {store.url} (no {manifest_key(version)}); "
            f"known releases: {sorted(known) or 'none'}; build it with `synsetforge release build --version {version}`"
        ) from None
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ReleaseError(f"{store.url}/{manifest_key(version)} is not valid JSON: {exc}") from None
    return validate_manifest(doc)


def read_release_table(store: Store, version: str, name: str, *, manifest: dict[str, Any] | None = None) -> pa.Table:
    """One table of a release. Validated against the current schema only when the schema version matches
    (an old release keeps the columns it was published with)."""
    manifest = manifest or read_manifest(store, version)
    try:
        entry = manifest["files"][name]
    except KeyError:
        raise ReleaseError(f"release {version!r} has no table {name!r}; it has {sorted(manifest['files'])}") from None
    table = pq.read_table(release_file_source(store, version, entry), memory_map=True)
    if entry["schema_version"] == _current_schema_version(entry["schema"]):
        table = validate(entry["schema"], table)
    return table


def release_file_source(store: Store, version: str, entry: dict[str, Any]) -> Any:
    """What pyarrow reads a release file (a manifest `files` entry) from: its path on a folder (read in place,
    memory-mapped, no copy into Python bytes), else its bytes."""
    key = f"{release_prefix(version)}/{entry['key']}"
    if isinstance(store, LocalStore):
        if not store.exists(key):
            raise ReleaseError(f"release {version!r}: {store.url}/{key} is missing; run `synsetforge release verify`")
        return str(store.path(key))
    return pa.BufferReader(store.get(key))


def _current_schema_version(name: str) -> int | None:
    try:
        return schema_version(name)
    except Exception:  # schema file removed since: read the table as published
        return None


@dataclass
class VerifyResult:
    version: str
    checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_release(store: Store, version: str) -> VerifyResult:
    """Re-hash every file the manifest lists and re-count its rows; list every mismatch."""
    manifest = read_manifest(store, version)
    result = VerifyResult(version)
    prefix = release_prefix(version)
    for name, entry in sorted(manifest["files"].items()):
        key = f"{prefix}/{entry['key']}"
        try:
            data = store.get(key)
        except MissingKey:
            result.problems.append(f"{name}: file {key} is missing")
            continue
        result.checked += 1
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            result.problems.append(f"{name}: sha256 of {key} is {digest}, manifest says {entry['sha256']}")
            continue
        if len(data) != entry["n_bytes"]:
            result.problems.append(f"{name}: {key} has {len(data)} bytes, manifest says {entry['n_bytes']}")
        rows = pq.ParquetFile(io.BytesIO(data)).metadata.num_rows
        if rows != entry["rows"]:
            result.problems.append(f"{name}: {key} has {rows} rows, manifest says {entry['rows']}")
    return result
