"""Blob and table storage: one interface, a local-filesystem backend (the embedded default) and S3.

Keys are "/"-separated relative paths ("releases/1.0.0/manifest.json", "blobs/ab/ab12...jpg"). Every blob
write is atomic: the local backend writes a temp file in the target folder and renames it; S3 writes with a
single PUT. A reader therefore sees either the old object or the new one, never half of one.

Working tables (`tables/<name>/`) are Delta Lake tables (delta-rs): Parquet data files plus a log of
numbered commits, each commit created with put-if-absent (a hard link or no-replace rename locally,
`If-None-Match: *` on S3), so appends from several processes all land, a reader always sees a whole
commit, and an overwrite that raced another writer fails with `TableConflict` instead of dropping rows.
A table written with an explicit `key=` (release files, checkpoint parts) stays one plain Parquet object.
A store written before working tables were Delta keeps `tables/<name>.parquet`: it is read as before and
converted on its first write (or by `synsetforge store migrate`).

    >>> store = open_store("/tmp/sf-doc-store")
    >>> key = store.put_content(b"hello", suffix=".txt")
    >>> store.get(key)
    b'hello'
"""

from __future__ import annotations

import bisect
import hashlib
import io
import os
import random
import shutil
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import ServiceError, SynsetforgeError
from pipeline.faults import failpoint
from pipeline.schemas import SchemaError, arrow_schema, empty_table, table_names, validate


class StoreError(SynsetforgeError, RuntimeError):
    """A store operation failed in a way the user must act on."""


class MissingKey(StoreError, KeyError):
    """The key does not exist in the store."""


class KeyExists(StoreError):
    """An exclusive write found the key already there (published objects are immutable)."""


class TableConflict(StoreError, ServiceError):
    """Another writer committed to the table between this writer's read and its overwrite. Nothing was
    written; rerunning the step (read again, write again) resolves it, so it is a transient ServiceError."""


def table_key(name: str) -> str:
    """The single-object key tables had before working tables were Delta (still read, converted on write)."""
    return f"tables/{name}.parquet"


def table_prefix(name: str) -> str:
    """Where the working table `name` lives: a Delta table (data files + `_delta_log/`)."""
    return f"tables/{name}/"


def content_key(digest: str, suffix: str = "") -> str:
    return f"blobs/{digest[:2]}/{digest}{suffix}"


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StoreError(f"invalid store key {key!r}: use a relative path without '..' or empty parts")
    return key


def _check_name(name: str) -> str:
    if not name or "/" in name or name.startswith(".") or name != name.strip():
        raise StoreError(f"invalid table name {name!r}")
    return name


# Commits a reader's view survives: they rewrite or drop files without changing the rows.
_DATA_NEUTRAL = frozenset({"OPTIMIZE", "VACUUM START", "VACUUM END", "CREATE CHECKPOINT"})
_ABSENT = -1  # "read while the table had no Delta log" in Store._seen
ATTEMPTS = 40  # commit attempts before an append gives up (each re-reads the log; contention only)
DEFAULT_RETENTION = timedelta(days=30)  # vacuum keeps every version this young readable (audit, time travel)
MIN_RETENTION = timedelta(hours=1)
ROW_GROUP_ROWS = 16 * 1024  # row groups filters can skip: about one ILSVRC synset of votes (12.8k), so a QC round's
# wnid filter reads its synsets' row groups, not 128k-row groups holding ten synsets each
PARTITION_ROWS = 16 * 1024  # replace_rows: rows per data file (a rewrite touches the files holding the values)


def _uint64_fields(name: str) -> list[str]:
    return [f.name for f in arrow_schema(name) if f.type == pa.uint64()]


def _view(column: pa.ChunkedArray, to: pa.DataType) -> pa.ChunkedArray:
    return pa.chunked_array([c.view(to) for c in column.chunks], type=to)


def _to_delta(name: str, table: pa.Table) -> pa.Table:
    """Delta has no unsigned integers: uint64 columns (perceptual hashes) are stored bit for bit as int64."""
    for field in _uint64_fields(name):
        i = table.schema.get_field_index(field)
        table = table.set_column(i, pa.field(field, pa.int64(), table.schema.field(i).nullable),
                                 _view(table.column(i), pa.int64()))
    return table.replace_schema_metadata(None)


def _conform(name: str, table: pa.Table, columns: Sequence[str] | None) -> pa.Table:
    """A table read back from storage, with the schema file's types (all columns, or `columns` in that order)."""
    for field in _uint64_fields(name):
        if field in table.column_names and table.schema.field(field).type == pa.int64():
            i = table.schema.get_field_index(field)
            table = table.set_column(i, pa.field(field, pa.uint64()), _view(table.column(i), pa.uint64()))
    if columns is None:
        return validate(name, table)
    schema = arrow_schema(name)
    unknown = [c for c in columns if c not in schema.names]
    if unknown:
        raise SchemaError(f"table {name!r} has no column(s) {unknown}; columns: {schema.names}")
    fields = [schema.field(c) for c in columns]
    arrays = [table.column(f.name) if table.column(f.name).type == f.type else table.column(f.name).cast(f.type)
              for f in fields]
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=schema.metadata))


def _check_columns(name: str, columns: Sequence[str] | None) -> list[str] | None:
    if columns is None:
        return None
    known = arrow_schema(name).names
    unknown = [c for c in columns if c not in known]
    if unknown:
        raise SchemaError(f"table {name!r} has no column(s) {unknown}; columns: {known}")
    return list(columns)


def _expression(filter: Any) -> pc.Expression | None:
    """A read filter: a pyarrow compute Expression, or DNF tuples as pyarrow/pandas take them
    ([("wnid", "in", {...}), ("answer", "=", "yes")] = AND; a list of such lists = OR of ANDs)."""
    if filter is None or isinstance(filter, pc.Expression):
        return filter
    return pq.filters_to_expression(filter)


def _pruning(filter: Any) -> Any:
    """The part of a filter delta-rs can prune files with (its min/max statistics): tuple filters only."""
    if filter is None or isinstance(filter, pc.Expression):
        return None
    groups = filter if filter and isinstance(filter[0], list) else [filter]
    return [[(c, op, list(v) if isinstance(v, set | frozenset) else v) for c, op, v in g] for g in groups]


def _row_group_filter(filter: Any) -> list[list[tuple[str, list[Any]]]] | None:
    """The equality part of a tuple filter, per OR-group: (column, sorted wanted values) for each `=` / `in`
    conjunct; None when the filter is absent, an Expression, or has a group without one (nothing to prune on)."""
    pruning = _pruning(filter)
    if not pruning:
        return None
    out = []
    for group in pruning:
        eq = []
        for column, op, value in group:
            if op in ("=", "==", "in"):
                values = [value] if op != "in" else list(value)
                try:
                    eq.append((column, sorted(set(values))))
                except TypeError:  # values that do not sort together: leave this conjunct to the exact filter
                    continue
        if not eq:
            return None
        out.append(eq)
    return out


def _may_hold(lo: Any, hi: Any, values: Sequence[Any]) -> bool:
    """Whether a min/max range (None: no statistics) may hold one of `values` (sorted): files for delta-rs' add
    actions, row groups for Parquet footers."""
    if lo is None or hi is None:
        return True
    try:
        i = bisect.bisect_left(values, lo)
        return i < len(values) and values[i] <= hi
    except TypeError:  # values that do not compare with the statistics: it may hold them
        return True


def _min_max(stats: dict[str, Any] | None, column: str) -> tuple[Any, Any]:
    st = (stats or {}).get(column) or {}
    return st.get("min"), st.get("max")


def _pruned_fragments(fragments: list[Any], filter: Any) -> list[Any]:
    """Each Parquet fragment cut to the row groups whose min/max statistics can hold a row an `=` / `in` conjunct
    keeps (the scan's own filter still decides row by row): pyarrow's dataset scan does not skip row groups on an
    `isin` of many strings, so a wnid filter read every row group of the files delta-rs kept."""
    groups = _row_group_filter(filter)
    if groups is None:
        return fragments
    out = []
    for frag in fragments:
        try:
            frag.ensure_complete_metadata()
            infos = frag.row_groups
        except (AttributeError, OSError):  # not a Parquet fragment, or no footer to read: scan it whole
            out.append(frag)
            continue
        keep = [rg.id for rg in infos
                if any(all(_may_hold(*_min_max(rg.statistics, c), v) for c, v in g) for g in groups)]
        if len(keep) == len(infos):
            out.append(frag)
        elif keep:
            out.append(frag.subset(row_group_ids=keep))
    return out


class Store(ABC):
    """What every backend offers. Subclasses implement the five blob primitives and say where Delta tables live."""

    url: str

    @abstractmethod
    def put(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        """Write atomically; with exclusive=True raise KeyExists instead of overwriting."""

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """All keys starting with `prefix`, sorted."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def _delta_uri(self, prefix: str) -> str:
        """The delta-rs URI of the table folder at `prefix` ("tables/votes/")."""

    def _delta_options(self) -> dict[str, str] | None:
        return None

    # -- content addressing -------------------------------------------------------------------------------
    def put_content(self, data: bytes, suffix: str = "") -> str:
        """Store bytes under their sha256; storing the same bytes twice writes once."""
        key = content_key(hashlib.sha256(data).hexdigest(), suffix)
        if not self.exists(key):
            self.put(key, data)
        return key

    # -- working tables (Delta) -----------------------------------------------------------------------------
    @property
    def _seen(self) -> dict[str, int]:
        """Version of each working table this Store object last read or wrote (an overwrite is checked
        against it, so a read-modify-write never drops what another writer committed in between)."""
        seen = self.__dict__.get("_seen_versions")
        if seen is None:
            seen = self.__dict__["_seen_versions"] = {}
        return seen

    def _open(self, name: str, version: int | None = None) -> Any:
        """The Delta table `name` (at `version`), or None when the store has no Delta log for it."""
        from deltalake import DeltaTable
        from deltalake.exceptions import DeltaError, TableNotFoundError

        try:
            return DeltaTable(self._delta_uri(table_prefix(_check_name(name))), version=version,
                              storage_options=self._delta_options())
        except TableNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001 - delta-rs raises plain DeltaError/OSError for I/O failures
            # a version is missing when its commit file is (never written, or its log cleaned up); any other
            # failure, at a version whose commit is there, is the store's (a broken log, I/O)
            if (version is not None and isinstance(exc, DeltaError)
                    and not self.exists(f"{table_prefix(name)}_delta_log/{version:020d}.json")):
                raise MissingKey(f"table {name!r} has no version {version} at {self.url} (vacuumed or never written)") from None
            raise StoreError(f"opening table {name!r} at {self.url} failed: {exc}") from exc

    def _scan(self, dt: Any, name: str, columns: Sequence[str] | None, filter: Any) -> pa.Table:
        """Rows of a snapshot in write order (data files sort by name = write time; compaction keeps order)."""
        import pyarrow.dataset as pads

        dataset = dt.to_pyarrow_dataset(file_pruning_predicate=_pruning(filter), filesystem=self._delta_filesystem(dt))
        fragments = sorted(dataset.get_fragments(), key=lambda f: f.path.rsplit("/", 1)[-1])
        fragments = _pruned_fragments(fragments, filter)
        dataset = pads.FileSystemDataset(fragments, dataset.schema, dataset.format, dataset.filesystem)
        wanted = _check_columns(name, columns)
        return _conform(name, dataset.to_table(columns=wanted, filter=_expression(filter)), columns)

    def _delta_filesystem(self, dt: Any) -> Any:
        return None  # delta-rs' own object store

    def _write_files(self, name: str, table: pa.Table, *, stem: str | None = None,
                     rows_per_file: int = 4_000_000, cut_by: str | None = None) -> list[Any]:
        """Write `table` as data file(s) of the Delta table `name` through this store's atomic put; returns
        their add actions (with min/max statistics, so filters skip files). Nothing is committed yet. With
        `cut_by` (rows sorted by that column), files end only where its value changes."""
        from deltalake.transaction import AddAction

        stored = _to_delta(name, table)
        if stored.num_rows == 0:
            return []
        stem = stem or f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"
        actions = []
        bounds = (_cuts(stored.column(cut_by), rows_per_file) if cut_by
                  else list(range(0, stored.num_rows, rows_per_file)) + [stored.num_rows])
        for i, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            piece = stored.slice(start, stop - start)
            sink = pa.BufferOutputStream()
            pq.write_table(piece, sink, compression="zstd", row_group_size=ROW_GROUP_ROWS)
            data = sink.getvalue().to_pybytes()
            path = f"{stem}-{i:05d}.zstd.parquet"
            self.put(f"{table_prefix(name)}{path}", data)
            actions.append(AddAction(path, len(data), {}, int(time.time() * 1000), True, _stats(piece)))
        failpoint("store.data_written")  # fault tests: data files written, commit not yet made
        return actions

    def _commit(self, dt: Any, name: str, actions: list[Any], *, mode: str, operation: str) -> int:
        """One commit attempt at the snapshot's next version (CommitFailedError if another writer took it);
        the version committed. Retries are the caller's, which knows whether its actions still hold."""
        from deltalake import CommitProperties

        version = dt.version()
        dt.create_write_transaction(
            actions, mode=mode, schema=dt.schema(),
            commit_properties=CommitProperties(max_commit_retries=0, custom_metadata={
                "synsetforge.operation": operation, "synsetforge.writer": _WRITER}))
        return version + 1

    def _create(self, name: str, actions: list[Any], *, operation: str) -> bool:
        """Commit version 0 of a new table; False when another writer created it first."""
        from deltalake import CommitProperties, Schema
        from deltalake.transaction import create_table_with_add_actions

        schema = Schema.from_arrow(_to_delta(name, empty_table(name)).schema)
        try:
            create_table_with_add_actions(
                self._delta_uri(table_prefix(name)), schema, actions, mode="error", storage_options=self._delta_options(),
                commit_properties=CommitProperties(max_commit_retries=0, custom_metadata={
                    "synsetforge.operation": operation, "synsetforge.writer": _WRITER}))
        except Exception as exc:  # noqa: BLE001 - "already exists" or a lost race for version 0
            if self._open(name) is not None:
                return False
            raise StoreError(f"creating table {name!r} at {self.url} failed: {exc}") from exc
        return True

    def _log_entry(self, name: str, version: int) -> list[dict[str, Any]]:
        import json

        raw = self.get(f"{table_prefix(name)}_delta_log/{version:020d}.json")
        return [json.loads(line) for line in raw.decode().splitlines() if line.strip()]

    def _commits_since(self, name: str, dt: Any, version: int) -> list[list[dict[str, Any]]]:
        return [self._log_entry(name, v) for v in range(version + 1, dt.version() + 1)]

    def _changed_since(self, name: str, dt: Any, version: int) -> bool:
        """Did any commit after `version` change rows? (Compaction and vacuum do not.)"""
        if dt.version() < version:
            return True
        for entry in self._commits_since(name, dt, version):
            info = next((a["commitInfo"] for a in entry if "commitInfo" in a), {})
            if info.get("synsetforge.operation") == "compact" or info.get("operation") in _DATA_NEUTRAL:
                continue
            return True
        return False

    def _discard(self, name: str, actions: list[Any]) -> None:
        for a in actions:  # written but never committed: nothing references them
            self.delete(f"{table_prefix(name)}{a.path}")

    def _drop_legacy(self, name: str) -> None:
        if self.exists(table_key(name)):
            self.delete(table_key(name))

    def _convert_legacy(self, name: str) -> bool:
        """Turn `tables/<name>.parquet` into the Delta table's first commit; False when there was none."""
        try:
            data = self.get(table_key(name))
        except MissingKey:
            return False
        if self._open(name) is None:
            actions = self._write_files(name, validate(name, pq.read_table(io.BytesIO(data))))
            if self._create(name, actions, operation="migrate"):
                if self._seen.get(name) == _ABSENT:
                    self._seen[name] = 0  # version 0 holds the rows this Store read from the legacy object
            else:
                self._discard(name, actions)  # another process converted it first, with the same rows
        self._drop_legacy(name)
        return True

    def write_table(self, name: str, data: Any, key: str | None = None, *, exclusive: bool = False) -> str:
        """Validate `data` against schemas/<name>.json and replace the table with it.

        Without `key`: an overwrite commit of the working table `tables/<name>/` (old versions stay readable
        until vacuumed). If this Store object read the table earlier and another writer changed its rows
        since, nothing is written and TableConflict is raised (rerun the step). `exclusive`: create only,
        KeyExists if the table exists. With `key`: one plain Parquet object at that key (release files,
        checkpoint parts), exclusive as in `put`.
        """
        table = validate(name, data)
        if key is not None:
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink, compression="zstd")
            self.put(key, sink.getvalue().to_pybytes(), exclusive=exclusive)
            return key
        expected = self._seen.get(_check_name(name))
        if exclusive and self.has_table(name):
            raise KeyExists(f"table {name!r} already exists at {self.url}")
        actions = self._write_files(name, table)
        try:
            committed = self._overwrite(name, actions, expected, exclusive=exclusive)
        except BaseException:
            self._discard(name, actions)
            raise
        self._seen[name] = committed
        self._drop_legacy(name)
        return table_prefix(name)

    def _overwrite(self, name: str, actions: list[Any], expected: int | None, *, exclusive: bool) -> int:
        for attempt in range(ATTEMPTS):
            dt = self._open(name)
            if dt is None:  # first write (a legacy object, if any, is replaced: this overwrite is its conversion)
                if expected not in (None, _ABSENT):
                    raise TableConflict(f"table {name!r} at {self.url} was removed after this step read it; rerun the step")
                if self._create(name, actions, operation="write"):
                    return 0
                if exclusive:
                    raise KeyExists(f"table {name!r} already exists at {self.url}")
                if expected == _ABSENT:
                    raise TableConflict(f"table {name!r} at {self.url} was created by another writer after this step "
                                        "read it; nothing was written: rerun the step")
                continue
            if exclusive:
                raise KeyExists(f"table {name!r} already exists at {self.url}")
            if expected == _ABSENT or (expected is not None and self._changed_since(name, dt, expected)):
                raise TableConflict(
                    f"table {name!r} at {self.url} changed after this step read it (read "
                    f"{'no version' if expected == _ABSENT else f'version {expected}'}, now {dt.version()}); "
                    "nothing was written: rerun the step")
            try:
                return self._commit(dt, name, actions, mode="overwrite", operation="write")
            except _commit_failed():
                _backoff(attempt)  # a commit landed meanwhile: the check above decides whether it matters
        raise TableConflict(f"table {name!r} at {self.url}: {ATTEMPTS} overwrite attempts lost to other writers")

    def append_table(self, name: str, data: Any, *, unique_by: Sequence[str] | str | None = None) -> pa.Table:
        """Validate `data` and add it to the working table in one commit; costs O(new rows), not O(table).

        Concurrent appends from any number of processes all land (a lost commit race is retried). With
        `unique_by` (key columns), rows whose key is already in the table, or repeated within `data`, are
        dropped first, reading only the key columns of the files whose statistics may hold the new keys;
        the check and the commit are atomic (a commit landing in between makes it check again). Returns
        the rows appended.
        """
        table = validate(name, data)
        keys = [unique_by] if isinstance(unique_by, str) else list(unique_by or [])
        if keys:
            table = table.filter(pa.array(~_key_frame(table, keys).duplicated(keep="first").to_numpy()))
        if table.num_rows == 0:
            return table
        _check_name(name)
        actions: list[Any] = []
        rows = table
        try:
            for attempt in range(ATTEMPTS):
                dt = self._open(name)
                if dt is None and self._convert_legacy(name):
                    continue
                if dt is not None and keys:
                    fresh = table.filter(pa.array(~_key_in(table, self._existing_keys(dt, name, keys, table), keys)))
                    if fresh.num_rows != rows.num_rows or not actions:
                        self._discard(name, actions)
                        rows, actions = fresh, []
                    if rows.num_rows == 0:
                        return rows
                if not actions:
                    actions = self._write_files(name, rows)
                if dt is None:
                    if self._create(name, actions, operation="append"):
                        self._after_append(name, 0)
                        return rows
                    continue
                try:
                    committed = self._commit(dt, name, actions, mode="append", operation="append")
                except _commit_failed():
                    _backoff(attempt)
                    continue  # same data files, committed on the newer snapshot (keys checked again)
                self._after_append(name, committed)
                return rows
        except BaseException:
            self._discard(name, actions)
            raise
        self._discard(name, actions)
        raise TableConflict(f"table {name!r} at {self.url}: {ATTEMPTS} append attempts lost to other writers; retry")

    def _after_append(self, name: str, committed: int) -> None:
        before = self._seen.get(name)
        if before is not None and (before == committed - 1 or (before == _ABSENT and committed == 0)):
            self._seen[name] = committed  # only this writer changed the table since it read it

    def replace_rows(self, name: str, data: Any, *, column: str, values: Sequence[Any] | None,
                     rows_per_file: int = PARTITION_ROWS) -> int:
        """Replace the rows whose `column` is one of `values` by `data` (with `values` None: every row) in one
        commit; returns the version committed. Rows are kept sorted by `column` and data files end only where
        its value changes (about `rows_per_file` rows each), so one value's rows sit in one file or a few: only
        the files whose statistics may hold `values` are rewritten (their other rows copied over), and the cost
        follows the rows of those files, not the table. Every row of `data` must have its `column` in `values`.
        With `values` None, `data` may also be an iterable of tables (in `column` order), written file by file,
        so a table larger than memory can be replaced. Same conflict rule as `write_table`: if this Store read
        the table and another writer changed its rows since, TableConflict and nothing is written."""
        _check_name(name)
        if column not in arrow_schema(name).names:
            raise SchemaError(f"table {name!r} has no column {column!r}")
        expected = self._seen.get(name)
        if values is None:
            chunks = [data] if isinstance(data, pa.Table) or hasattr(data, "columns") else data
            actions: list[Any] = []
            stem = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"
            try:
                for i, chunk in enumerate(chunks):
                    rows = validate(name, chunk)
                    rows = rows.sort_by([(column, "ascending")]) if rows.num_rows else rows
                    actions += self._write_files(name, rows, stem=f"{stem}-{i:05d}", rows_per_file=rows_per_file,
                                                 cut_by=column)
                committed = self._overwrite(name, actions, expected, exclusive=False)
            except BaseException:
                self._discard(name, actions)
                raise
            self._seen[name] = committed
            self._drop_legacy(name)
            return committed
        table = validate(name, data)
        wanted = pa.array(sorted(set(values)), type=table.schema.field(column).type)
        if table.num_rows and not pc.all(pc.is_in(table.column(column), value_set=wanted)).as_py():
            raise StoreError(f"replace_rows({name!r}): data holds {column} values outside the ones replaced")
        self._convert_legacy(name)
        from deltalake.transaction import RemoveAction

        for attempt in range(ATTEMPTS):
            dt = self._open(name)
            if dt is None:
                if expected not in (None, _ABSENT):
                    raise TableConflict(f"table {name!r} at {self.url} was removed after this step read it; rerun the step")
                actions = self._write_files(name, table.sort_by([(column, "ascending")]), rows_per_file=rows_per_file,
                                            cut_by=column)
                if self._create(name, actions, operation="replace"):
                    self._seen[name] = 0
                    return 0
                self._discard(name, actions)
                if expected == _ABSENT:
                    raise TableConflict(f"table {name!r} at {self.url} was created by another writer after this step "
                                        "read it; nothing was written: rerun the step")
                continue
            if expected == _ABSENT or (expected is not None and self._changed_since(name, dt, expected)):
                raise TableConflict(f"table {name!r} at {self.url} changed after this step read it; nothing was "
                                    "written: rerun the step")
            touched = _files_holding(dt, column, wanted)
            kept = self._read_files(dt, name, touched)
            if kept.num_rows:
                kept = kept.filter(pc.invert(pc.is_in(kept.column(column), value_set=wanted)))
            rows = pa.concat_tables([kept, table]) if kept.num_rows else table
            adds = self._write_files(name, rows.sort_by([(column, "ascending")]), rows_per_file=rows_per_file,
                                     cut_by=column) if rows.num_rows else []
            now = int(time.time() * 1000)
            try:
                committed = self._commit(dt, name, [*(RemoveAction(p, True, now) for p in touched), *adds],
                                         mode="append", operation="replace")
            except _commit_failed():
                self._discard(name, adds)
                _backoff(attempt)  # another commit landed: read the files again on the newer snapshot
                continue
            except BaseException:
                self._discard(name, adds)
                raise
            self._seen[name] = committed
            return committed
        raise TableConflict(f"table {name!r} at {self.url}: {ATTEMPTS} replace attempts lost to other writers")

    def _read_files(self, dt: Any, name: str, paths: Sequence[str]) -> pa.Table:
        """The rows of these data files of the snapshot (file names as in its add actions), in name order."""
        if not paths:
            return _to_delta(name, empty_table(name))
        tables = [pq.read_table(io.BytesIO(self.get(f"{table_prefix(name)}{p}"))) for p in sorted(paths)]
        return _conform(name, pa.concat_tables(tables, promote_options="default"), None)

    def read_changes(self, name: str, since: int, *, columns: Sequence[str] | None = None) -> pa.Table | None:
        """The rows the commits after version `since` added to the working table (`since` -1: since it was
        created), in commit order, reading only the files they added; None when one of those commits removed
        or replaced rows (an overwrite, `replace_rows`), when a file they added is gone (vacuumed) or their log
        entries are: the caller then reads the table whole. Compaction and vacuum commits add no rows."""
        dt = self._open(name)
        if dt is None or dt.version() < since:
            return None
        try:
            entries = self._commits_since(name, dt, since)
        except MissingKey:
            return None
        paths = []
        for entry in entries:
            for action in entry:
                if "remove" in action and action["remove"].get("dataChange", True):
                    return None
                if "add" in action and action["add"].get("dataChange", True):
                    paths.append(action["add"]["path"])
        wanted = _check_columns(name, columns)
        parts = []
        for path in paths:
            try:
                parts.append(pq.read_table(io.BytesIO(self.get(f"{table_prefix(name)}{path}")), columns=wanted))
            except MissingKey:
                return None
        if not parts:
            return _conform(name, empty_table(name), columns)
        return _conform(name, pa.concat_tables(parts, promote_options="default"), columns)

    def _existing_keys(self, dt: Any, name: str, keys: list[str], new: pa.Table) -> pa.Table:
        values = pc.unique(new.column(keys[0]))
        if pa.types.is_integer(values.type) or pa.types.is_string(values.type):
            return self._scan(dt, name, keys, [(keys[0], "in", values.to_pylist())])
        return self._scan(dt, name, keys, pc.field(keys[0]).isin(values))

    def read_table(self, name: str, key: str | None = None, *, missing_ok: bool = False,
                   columns: Sequence[str] | None = None, filter: Any = None, version: int | None = None) -> pa.Table:
        """Read a table with its schema file's types, rows in write order; with missing_ok an absent table
        reads as empty.

        `columns`: only these (in that order). `filter`: rows to keep, as DNF tuples
        (`[("wnid", "in", wnids)]`: whole files skipped by their statistics, then row groups) or a pyarrow
        compute Expression (row groups and rows). `version`: the working table as of that commit (history
        is kept until vacuumed). Filters on uint64 columns are not supported (Delta stores them as int64).
        """
        if key is None:
            dt = self._open(name, version)
            if dt is not None:
                if version is None:
                    self._seen[name] = dt.version()
                return self._scan(dt, name, columns, filter)
            if version is not None:
                raise MissingKey(f"table {name!r} has no versions at {self.url}")
            self._seen[name] = _ABSENT
        target = key or table_key(name)
        try:
            data = self.get(target)
        except MissingKey:
            if key is None and (again := self._open(name)) is not None:  # converted meanwhile
                self._seen[name] = again.version()
                return self._scan(again, name, columns, filter)
            if missing_ok:
                return _conform(name, empty_table(name), columns)
            raise MissingKey(f"table {name!r} not found at {self.url}/{table_prefix(name) if key is None else key}; "
                             "run the stage that writes it first") from None
        table = pq.read_table(io.BytesIO(data), columns=_check_columns(name, columns),
                              filters=_expression(filter))
        return _conform(name, table, columns)

    def has_table(self, name: str, key: str | None = None) -> bool:
        if key is not None:
            return self.exists(key)
        return self._has_delta(name) or self.exists(table_key(name))

    def _has_delta(self, name: str) -> bool:
        return bool(self.list(f"{table_prefix(_check_name(name))}_delta_log/"))

    def table_version(self, name: str) -> int | None:
        """The working table's latest commit number (None: no Delta table yet)."""
        dt = self._open(name)
        return dt.version() if dt is not None else None

    def table_history(self, name: str, limit: int | None = None) -> list[dict[str, Any]]:
        """Commits of the working table, newest first (version, timestamp, operation, metrics, writer)."""
        dt = self._open(name)
        return dt.history(limit) if dt is not None else []

    def delete_table(self, name: str) -> None:
        """Remove a working table with its history (and a legacy single-object table)."""
        for key in self.list(table_prefix(_check_name(name))):
            self.delete(key)
        self.delete(table_key(name))
        self._seen.pop(name, None)

    def working_tables(self) -> list[str]:
        """Names of the working tables in the store (Delta or legacy single-object)."""
        found = set()
        for key in self.list("tables/"):
            rest = key[len("tables/"):]
            if "/_delta_log/" in rest:
                found.add(rest.split("/", 1)[0])
            elif "/" not in rest and rest.endswith(".parquet"):
                found.add(rest[: -len(".parquet")])
        return sorted(found)

    # -- maintenance --------------------------------------------------------------------------------------
    def compact(self, name: str, *, order_by: Sequence[str] | None = None, min_files: int = 2) -> dict[str, Any]:
        """Rewrite the table's data files (one small file per append) into few large ones, in row order, as
        one commit that changes no rows: appends that land meanwhile are kept and readers are unaffected.
        `order_by`: sort rows by these columns instead (filters on them then skip most row groups)."""
        self._convert_legacy(name)
        for attempt in range(ATTEMPTS):
            dt = self._open(name)
            if dt is None:
                raise MissingKey(f"table {name!r} not found at {self.url}/{table_prefix(name)}")
            paths = sorted(p.rsplit("/", 1)[-1] for p in dt.file_uris())
            if len(paths) < min_files and not order_by:
                return {"table": name, "version": dt.version(), "files_removed": 0, "files_added": 0}
            rows = self._scan(dt, name, None, None)
            if order_by:
                rows = rows.sort_by([(c, "ascending") for c in order_by])
            first = paths[0].split("-")[1] if paths and paths[0].startswith("part-") else f"{0:020d}"
            adds = self._write_files(name, rows, stem=f"part-{first}-{uuid.uuid4().hex[:12]}c")
            from deltalake.transaction import RemoveAction

            now = int(time.time() * 1000)
            removes = [RemoveAction(p, False, now) for p in paths]
            for a in adds:
                a.data_change = False
            while True:
                try:
                    committed = self._commit(dt, name, [*removes, *adds], mode="append", operation="compact")
                    return {"table": name, "version": committed, "files_removed": len(removes),
                            "files_added": len(adds), "rows": rows.num_rows}
                except _commit_failed():
                    newer = self._open(name)
                    gone = {a["remove"]["path"] for e in self._commits_since(name, newer, dt.version())
                            for a in e if "remove" in a}
                    if gone & set(paths):  # another writer removed files this compaction merged: start over
                        self._discard(name, adds)
                        break
                    dt = newer  # only appends landed: the same rewrite still holds on the newer snapshot
            _backoff(attempt)
        raise TableConflict(f"compacting table {name!r} at {self.url} kept losing to other writers; retry")

    def vacuum(self, name: str, retention: timedelta = DEFAULT_RETENTION, *, dry_run: bool = False) -> list[str]:
        """Delete data files that no version younger than `retention` needs, and unreferenced files (a killed
        writer's) older than `retention`. Versions within `retention` stay readable with
        `read_table(version=...)`; the commit log (who wrote what, when) is kept."""
        if retention < MIN_RETENTION:
            raise StoreError(f"vacuum retention {retention} is shorter than {MIN_RETENTION}: a writer's data files "
                             "are unreferenced until its commit lands, and a shorter retention could delete them")
        dt = self._open(name)
        if dt is None:
            raise MissingKey(f"table {name!r} not found at {self.url}/{table_prefix(name)}")
        return dt.vacuum(retention_hours=int(retention.total_seconds() // 3600), dry_run=dry_run,
                         enforce_retention_duration=False, full=True)

    def migrate(self, name: str | None = None) -> list[str]:
        """Convert legacy `tables/<name>.parquet` objects (all, or one) into working tables; returns the names."""
        names = [name] if name else [n for n in self.working_tables() if self.exists(table_key(n))]
        known = set(table_names())
        return [n for n in names if n in known and self._convert_legacy(n)]


_WRITER = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}" if hasattr(os, "uname") else uuid.uuid4().hex


def _commit_failed() -> type[Exception]:
    from deltalake.exceptions import CommitFailedError

    return CommitFailedError


def _backoff(attempt: int) -> None:
    time.sleep(min(0.5, 0.005 * 2 ** min(attempt, 7)) * random.random())


def _stats(table: pa.Table) -> str:
    """Delta file statistics (row count, nulls, min/max of integer and string columns) as JSON."""
    import json

    mins, maxs, nulls = {}, {}, {}
    for field, column in zip(table.schema, table.columns, strict=True):
        if pa.types.is_nested(field.type):
            continue
        nulls[field.name] = column.null_count
        if (pa.types.is_integer(field.type) or pa.types.is_string(field.type)) and column.null_count < len(column):
            mm = pc.min_max(column)
            mins[field.name], maxs[field.name] = mm["min"].as_py(), mm["max"].as_py()
    return json.dumps({"numRecords": table.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls})


def _cuts(column: pa.ChunkedArray, rows_per_file: int) -> list[int]:
    """File boundaries for rows sorted by `column`: about `rows_per_file` rows each, ending where the value changes."""
    n = len(column)
    values = column.to_numpy(zero_copy_only=False)
    import numpy as np

    change = np.flatnonzero(values[1:] != values[:-1]) + 1 if n > 1 else np.zeros(0, dtype=np.int64)
    starts = np.concatenate([[0], change, [n]]).astype(np.int64)
    bounds, last = [0], 0
    for s in starts[1:-1]:
        if s - last >= rows_per_file:
            bounds.append(int(s))
            last = int(s)
    bounds.append(n)
    return bounds


def _files_holding(dt: Any, column: str, values: pa.Array) -> list[str]:
    """Data files of the snapshot whose min/max statistics of `column` may hold one of `values` (sorted)."""
    actions = pa.table(dt.get_add_actions(flatten=True))
    paths = actions.column("path").to_pylist()
    lo_name, hi_name = f"min.{column}", f"max.{column}"
    if lo_name not in actions.column_names or not len(paths):
        return paths
    vals = values.to_pylist()
    return [p for p, a, b in zip(paths, actions.column(lo_name).to_pylist(), actions.column(hi_name).to_pylist(),
                                 strict=True) if _may_hold(a, b, vals)]


def _key_frame(table: pa.Table, keys: list[str]) -> Any:
    return table.select(keys).to_pandas()


def _key_in(table: pa.Table, existing: pa.Table, keys: list[str]) -> Any:
    """Boolean numpy mask: which rows of `table` have a key present in `existing`."""
    import numpy as np

    if existing.num_rows == 0:
        return np.zeros(table.num_rows, dtype=bool)
    if len(keys) == 1:
        return pc.is_in(table.column(keys[0]), value_set=existing.column(keys[0])).to_numpy(zero_copy_only=False)
    import pandas as pd

    have = pd.MultiIndex.from_frame(_key_frame(existing, keys))
    return pd.MultiIndex.from_frame(_key_frame(table, keys)).isin(have)


class LocalStore(Store):
    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = str(self.root)

    def path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".part")
        try:
            os.fchmod(fd, 0o644)  # mkstemp creates 0600; store files (release folders) are shared read-only
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            if exclusive:
                try:
                    os.link(tmp, target)  # fails if target exists: exclusive create, still atomic
                except FileExistsError:
                    raise KeyExists(f"{self.url}/{key} already exists and is immutable") from None
                os.unlink(tmp)
            else:
                os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise MissingKey(f"{self.url}/{key} does not exist") from None

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.path(folder) if folder else self.root  # walk only the prefix's folder
        keys = []
        for dirpath, _dirs, files in os.walk(start):
            for f in files:
                if f.startswith(".tmp-"):
                    continue  # an unfinished write is invisible
                rel = os.path.relpath(os.path.join(dirpath, f), self.root).replace(os.sep, "/")
                if rel.startswith(prefix):
                    keys.append(rel)
        return sorted(keys)

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def _delta_uri(self, prefix: str) -> str:
        return str(self.path(prefix.rstrip("/")))

    def _has_delta(self, name: str) -> bool:
        log = self.path(f"{table_prefix(_check_name(name))}_delta_log")
        return log.is_dir() and any(True for _ in log.iterdir())

    def delete_table(self, name: str) -> None:
        super().delete_table(name)
        shutil.rmtree(self.path(table_prefix(name).rstrip("/")), ignore_errors=True)  # the emptied folders

    def _delta_filesystem(self, dt: Any) -> Any:
        import pyarrow.fs as pafs

        return pafs.SubTreeFileSystem(dt.table_uri.removeprefix("file://"), pafs.LocalFileSystem())


class S3Store(Store):
    """S3 API via boto3; endpoint_url makes MinIO, moto or any S3-compatible server work."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, client: Any = None):
        import boto3  # imported here so the local default never pays for it

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url)
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._options: dict[str, str] | None = None

    def _k(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        from botocore.exceptions import ClientError

        extra = {"IfNoneMatch": "*"} if exclusive else {}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, **extra)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise KeyExists(f"{self.url}/{key} already exists and is immutable") from None
            raise StoreError(f"S3 put of {self.url}/{key} failed: {code or exc}") from exc

    def get(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise MissingKey(f"{self.url}/{key} does not exist") from None
            raise StoreError(f"S3 get of {self.url}/{key} failed: {exc}") from exc

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._k(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StoreError(f"S3 head of {self.url}/{key} failed: {exc}") from exc

    def _iter_keys(self, prefix: str, limit: int | None = None) -> Iterator[str]:
        base = self.prefix + "/" if self.prefix else ""
        full = base + prefix
        cut = len(self.prefix) + 1 if self.prefix else 0
        extra = {"PaginationConfig": {"MaxItems": limit}} if limit else {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full, **extra):
            for obj in page.get("Contents", []):
                yield obj["Key"][cut:]

    def list(self, prefix: str = "") -> list[str]:
        if prefix:
            _check_key(prefix.rstrip("/"))
        return sorted(self._iter_keys(prefix))

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._k(key))

    def presigned_url(self, key: str, expires_s: int = 3600) -> str:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._k(key)}, ExpiresIn=expires_s
        )

    def _has_delta(self, name: str) -> bool:
        return any(True for _ in self._iter_keys(f"{table_prefix(_check_name(name))}_delta_log/", limit=1))

    def _delta_uri(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{self._k(prefix.rstrip('/'))}"

    def _delta_options(self) -> dict[str, str]:
        """delta-rs does not use boto3: hand it the same endpoint, region and (static) credentials. Commits
        are put-if-absent (`If-None-Match: *`); no lock service."""
        if self._options is None:
            meta = self.client.meta
            opts = {"conditional_put": "etag", "AWS_REGION": meta.region_name or "us-east-1"}
            endpoint = self.endpoint_url or meta.endpoint_url
            if endpoint and ".amazonaws.com" not in endpoint:
                opts["AWS_ENDPOINT_URL"] = endpoint
                if endpoint.startswith("http://"):
                    opts["AWS_ALLOW_HTTP"] = "true"
            creds = getattr(getattr(self.client, "_request_signer", None), "_credentials", None)
            from botocore.credentials import RefreshableCredentials

            if creds is not None and not isinstance(creds, RefreshableCredentials):
                frozen = creds.get_frozen_credentials()  # refreshable ones (roles): delta-rs' own chain
                opts["AWS_ACCESS_KEY_ID"], opts["AWS_SECRET_ACCESS_KEY"] = frozen.access_key, frozen.secret_key
                if frozen.token:
                    opts["AWS_SESSION_TOKEN"] = frozen.token
            self._options = opts
        return dict(self._options)


def open_store(url: str | os.PathLike[str], *, endpoint_url: str | None = None) -> Store:
    """Open a store from a URL: a plain path or file:// URL (local) or s3://bucket/prefix."""
    text = str(url)
    parsed = urlparse(text)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StoreError(f"store URL {text!r} has no bucket; write s3://BUCKET/PREFIX")
        return S3Store(parsed.netloc, parsed.path, endpoint_url=endpoint_url or os.environ.get("SYNSETFORGE_S3_ENDPOINT_URL"))
    if parsed.scheme == "file":
        return LocalStore(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:
        raise StoreError(f"store URL {text!r}: unsupported scheme {parsed.scheme!r}; use a path, file:// or s3://")
    return LocalStore(text)


def store_from_settings(settings: Any) -> Store:
    """The store the configuration names (settings.store.url and its S3 endpoint)."""
    return open_store(settings.store.url, endpoint_url=settings.store.s3_endpoint_url)
