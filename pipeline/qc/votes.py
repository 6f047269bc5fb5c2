"""Votes as integer codes: the cleaning `stage.clean_votes` does, on arrays, and the blocks QC decides.

A `Block` is the votes and pairs of a set of synsets: pairs sorted by (wnid, image_id), a pair's row is its task
code; workers carry the stable codes of `WorkerCodes` (kept in `qc_workers`, new workers appended in name
order). Cleaning is the same as `stage.clean_votes`: answers checked, a repeated (annotation, image) row dropped
(the latest `submitted_at` kept), then one vote per worker and pair (the latest by submitted_at, then annotation
id). Pair strings are factorised once per block with Arrow dictionaries; duplicates are found with integer
sorts, so cleaning a block costs a few sorts of int64 arrays, not pandas sorts of object columns.

    >>> import pyarrow as pa
    >>> t = pa.table({"annotation_id": [1, 2, 3, 4], "image_id": ["b", "a", "a", "a"], "wnid": ["n00000001"] * 4,
    ...               "worker": ["w2", "w1", "w1", "w2"], "answer": ["yes", "no", " YES", "no"],
    ...               "submitted_at": pa.array([1, 2, 3, 4], pa.timestamp("us", tz="UTC"))})
    >>> codes = WorkerCodes([])
    >>> b = Block.from_votes(t, codes)
    >>> b.pairs["image_id"].tolist(), b.task.tolist(), b.worker.tolist(), b.label.tolist(), codes.names
    (['a', 'b'], [1, 0, 0], [1, 0, 1], [1, 1, 0], ['w1', 'w2'])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.qc.base import NO, YES, QCInputError

VOTE_COLUMNS = ["annotation_id", "image_id", "wnid", "worker", "answer", "submitted_at"]
PAIR = ["wnid", "image_id"]


class WorkerCodes:
    """Worker name <-> stable integer code. Codes are never reused; new names get the next codes, sorted."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self._index = pd.Index(self.names)

    def codes_of(self, names: np.ndarray | list[str]) -> np.ndarray:
        """Codes of `names` (unique strings), assigning new ones in sorted order."""
        names = np.asarray(names, dtype=object)
        pos = self._index.get_indexer(names) if len(self.names) else np.full(len(names), -1)
        new = sorted(set(names[pos < 0].tolist()))
        if new:
            self.names += new
            self._index = pd.Index(self.names)
            pos = self._index.get_indexer(names)
        return pos.astype(np.int64)

    def __len__(self) -> int:
        return len(self.names)


def _dict_ranks(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, pa.Array]:
    """Per row, the rank of its value among the column's distinct values (sorted), and those values."""
    if isinstance(column, pa.ChunkedArray):  # one array first: unifying the dictionaries of many row groups costs
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)  # far more than a copy
    enc = pc.dictionary_encode(column)
    dictionary = enc.dictionary
    order = pc.sort_indices(dictionary).to_numpy()
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank[enc.indices.to_numpy(zero_copy_only=False)], dictionary.take(pa.array(order))


def _keep_latest(group: np.ndarray, *order_keys: np.ndarray) -> np.ndarray:
    """Mask of the rows that are the last of their `group` by (order_keys..., row number)."""
    n = len(group)
    if n == 0:
        return np.zeros(0, dtype=bool)
    idx = np.argsort(group, kind="stable")
    g = group[idx]
    dup = np.zeros(n, dtype=bool)
    same = g[1:] == g[:-1]
    if not same.any():
        return np.ones(n, dtype=bool)
    dup[1:] |= same
    dup[:-1] |= same
    rows = idx[dup]  # rows of groups with more than one member
    keys = [np.arange(n)[rows], *(k[rows] for k in reversed(order_keys)), group[rows]]
    o = rows[np.lexsort(keys)]  # by group, then order keys, then row number
    last = np.ones(len(o), dtype=bool)
    last[:-1] = group[o][1:] != group[o][:-1]
    keep = np.ones(n, dtype=bool)
    keep[o[~last]] = False
    return keep


def _pair_union(wnid: pa.Array, image: pa.Array, extra: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """The distinct pairs of the voted (`wnid`, `image`) and `extra` (wnid, image_id), sorted by (wnid, image_id),
    and each voted pair's position among them: strings ranked through Arrow dictionaries, pairs deduplicated as
    int64 keys (pandas' drop_duplicates and MultiIndex on a million string pairs cost seconds)."""
    def strings(voted: pa.Array, col: str) -> pa.Array:
        return pa.concat_arrays([voted.cast(pa.string()),
                                 pa.array(extra[col].astype(str).to_numpy(dtype=object), pa.string())])

    w_rank, w_vals = _dict_ranks(strings(wnid, "wnid"))
    i_rank, i_vals = _dict_ranks(strings(image, "image_id"))
    n_img = max(len(i_vals), 1)
    keys, inverse = np.unique(w_rank * n_img + i_rank, return_inverse=True)
    pairs = pd.DataFrame({"wnid": w_vals.take(pa.array(keys // n_img)).to_numpy(zero_copy_only=False),
                          "image_id": i_vals.take(pa.array(keys % n_img)).to_numpy(zero_copy_only=False)})
    return pairs, inverse[:len(wnid)].astype(np.int64)


@dataclass
class _Coded:
    """Votes cleaned and coded once. Per row: `label` (1 = yes), `pair_key` (synset rank x images + image rank, so
    sorted keys are sorted pairs), `w_local` (rank among the workers of these votes; `w_global` their codes),
    `aid`, `sub` (submitted_at, int64 microseconds), `ai` (annotation rank); `images`, `wnids` sorted."""

    label: np.ndarray
    pair_key: np.ndarray
    img_rank: np.ndarray
    w_local: np.ndarray
    w_global: np.ndarray
    aid: np.ndarray
    ai: np.ndarray
    sub: np.ndarray
    images: pa.Array
    wnids: pa.Array

    @staticmethod
    def of(votes: pa.Table, codes: WorkerCodes) -> _Coded:
        if not votes.num_rows:
            z = np.zeros(0, dtype=np.int64)
            return _Coded(z, z, z, z, z, z, z, z, pa.array([], pa.string()), pa.array([], pa.string()))
        answer = pc.utf8_lower(pc.utf8_trim_whitespace(votes.column("answer")))
        label = pc.index_in(answer, value_set=pa.array([NO, YES])).to_numpy(zero_copy_only=False)
        bad = np.isnan(label) if label.dtype.kind == "f" else label < 0
        if bad.any():
            ids = np.asarray(votes.column("annotation_id").to_numpy())[bad][:5].tolist()
            vals = sorted(set(pc.cast(votes.column("answer"), pa.string()).to_numpy(zero_copy_only=False)[bad].tolist()))[:5]
            raise QCInputError(f"votes table: {int(bad.sum())} answer(s) other than 'yes'/'no' (annotation ids {ids}, "
                               f"values {vals}); fix the pull step's answer mapping and pull again; nothing was written")
        img_rank, images = _dict_ranks(votes.column("image_id"))
        wn_rank, wnids = _dict_ranks(votes.column("wnid"))
        w_local, w_names = _dict_ranks(votes.column("worker"))
        aid = votes.column("annotation_id").to_numpy().astype(np.int64)
        return _Coded(label=label.astype(np.int64), pair_key=wn_rank * len(images) + img_rank, img_rank=img_rank,
                      w_local=w_local, w_global=codes.codes_of(w_names.to_numpy(zero_copy_only=False)), aid=aid,
                      ai=np.unique(aid, return_inverse=True)[1].astype(np.int64),
                      sub=pc.cast(votes.column("submitted_at"), pa.int64()).to_numpy().astype(np.int64),
                      images=images, wnids=wnids)

    def counted(self, rows: np.ndarray | None) -> np.ndarray:
        """The rows counted among `rows` (all when None), in annotation order: of a repeated (annotation, image)
        row the latest, then one vote per worker and pair, the latest."""
        idx = np.arange(len(self.aid)) if rows is None else np.asarray(rows, dtype=np.int64)
        if not len(idx):
            return idx
        n_img = len(self.images)
        idx = idx[_keep_latest(self.ai[idx] * n_img + self.img_rank[idx], self.sub[idx])]
        idx = idx[_keep_latest(self.pair_key[idx] * len(self.w_global) + self.w_local[idx], self.sub[idx], self.aid[idx])]
        return idx[np.argsort(self.aid[idx], kind="stable")]

    def last_vote(self, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Each worker's newest submitted_at among `rows` (all when None), repeats included."""
        sel = slice(None) if rows is None else rows
        newest = np.full(len(self.w_global), np.iinfo(np.int64).min)
        np.maximum.at(newest, self.w_local[sel], self.sub[sel])
        return self.w_global, newest

    def block(self, idx: np.ndarray, extra_pairs: pd.DataFrame | None) -> tuple[Block, np.ndarray, np.ndarray]:
        """The Block of the counted rows `idx`, with its voted pair keys (sorted) and each key's task code."""
        n_img = max(len(self.images), 1)
        voted_key, voted_inv = np.unique(self.pair_key[idx], return_inverse=True)
        wnid = self.wnids.take(pa.array(voted_key // n_img))
        image = self.images.take(pa.array(voted_key % n_img))
        if extra_pairs is not None and len(extra_pairs):
            pairs, key_task = _pair_union(wnid, image, extra_pairs)
        else:
            pairs = pd.DataFrame({"wnid": wnid.to_numpy(zero_copy_only=False).astype(object),
                                  "image_id": image.to_numpy(zero_copy_only=False).astype(object)})
            key_task = np.arange(len(voted_key), dtype=np.int64)
        block = Block(pairs=pairs.reset_index(drop=True), task=key_task[voted_inv].astype(np.int64),
                      worker=self.w_global[self.w_local[idx]], label=self.label[idx], annotation_id=self.aid[idx],
                      submitted_at=self.sub[idx], last_vote=self.last_vote(None))
        return block, voted_key, key_task


@dataclass
class Block:
    """Counted votes and pairs of a set of synsets. `pairs`: wnid, image_id (sorted; row = task code); per vote
    `task`, `worker` (global codes), `label` (1 = yes), `annotation_id`, `submitted_at` (int64 microseconds).
    `last_vote`: (worker codes, newest submitted_at of each among all rows read, repeats included)."""

    pairs: pd.DataFrame
    task: np.ndarray
    worker: np.ndarray
    label: np.ndarray
    annotation_id: np.ndarray
    submitted_at: np.ndarray
    last_vote: tuple[np.ndarray, np.ndarray] = field(default_factory=lambda: (np.zeros(0, np.int64),
                                                                                np.zeros(0, np.int64)))

    @property
    def n_tasks(self) -> int:
        return len(self.pairs)

    @staticmethod
    def from_votes(votes: pa.Table, codes: WorkerCodes, extra_pairs: pd.DataFrame | None = None,
                   keep_rows: np.ndarray | None = None) -> Block:
        """Clean and code `votes` (VOTE_COLUMNS); the pairs are the voted ones plus `extra_pairs` (wnid,
        image_id). `keep_rows`: read only these rows of `votes` (a boolean mask), e.g. the votes an earlier
        round had."""
        if keep_rows is not None:
            votes = votes.filter(pa.array(keep_rows))
        coded = _Coded.of(votes, codes)
        return coded.block(coded.counted(None), extra_pairs)[0]

    @staticmethod
    def with_earlier(votes: pa.Table, codes: WorkerCodes, extra_pairs: pd.DataFrame | None, earlier: np.ndarray
                     ) -> tuple[Block, Block]:
        """`from_votes(votes, codes, extra_pairs)` and, on its pairs and task codes, the block of the rows `earlier`
        marks (what an earlier round counted): `from_votes(votes, codes, block.pairs, keep_rows=earlier)`, with the
        votes coded once."""
        coded = _Coded.of(votes, codes)
        block, keys, key_task = coded.block(coded.counted(None), extra_pairs)
        rows = np.flatnonzero(earlier)
        idx = coded.counted(rows)
        at = np.minimum(np.searchsorted(keys, coded.pair_key[idx]), max(len(keys) - 1, 0))
        if len(idx) and not (len(keys) and (keys[at] == coded.pair_key[idx]).all()):
            # an earlier row's pair that no latest row has (an edit moved it): code those rows on their own
            return block, Block.from_votes(votes, codes, block.pairs, keep_rows=earlier)
        old = Block(pairs=block.pairs, task=key_task[at] if len(idx) else np.zeros(0, np.int64),
                    worker=coded.w_global[coded.w_local[idx]], label=coded.label[idx], annotation_id=coded.aid[idx],
                    submitted_at=coded.sub[idx], last_vote=coded.last_vote(rows))
        return block, old

    def votes_frame(self, rows: np.ndarray | None, names: list[str]) -> pd.DataFrame:
        """The counted votes (all, or the mask `rows` over votes) as a votes-like frame (for pipeline.qc.team)."""
        sel = slice(None) if rows is None else rows
        t = self.task[sel]
        return pd.DataFrame({"annotation_id": self.annotation_id[sel], "image_id": self.pairs["image_id"].to_numpy()[t],
                             "wnid": self.pairs["wnid"].to_numpy()[t],
                             "worker": np.asarray(names, dtype=object)[self.worker[sel]],
                             "answer": np.where(self.label[sel] == 1, YES, NO),
                             "submitted_at": pd.to_datetime(self.submitted_at[sel], unit="us", utc=True)})


def empty_votes() -> pa.Table:
    from pipeline.schemas import arrow_schema

    schema = arrow_schema("votes")
    return pa.schema([schema.field(c) for c in VOTE_COLUMNS]).empty_table()


def as_votes_table(votes: Any) -> pa.Table:
    """A pandas votes frame (or Arrow table) as an Arrow table of VOTE_COLUMNS with the votes schema's types."""
    from pipeline.schemas import arrow_schema

    schema = arrow_schema("votes")
    if votes is None or len(votes) == 0:
        return empty_votes()
    if isinstance(votes, pa.Table):
        t = votes.select(VOTE_COLUMNS)
    else:
        frame = votes[VOTE_COLUMNS].copy()
        frame["submitted_at"] = pd.to_datetime(frame["submitted_at"], utc=True)
        frame["answer"] = frame["answer"].astype(str)
        t = pa.Table.from_pandas(frame, preserve_index=False)
    fields_ = [schema.field(c) for c in VOTE_COLUMNS]
    return pa.Table.from_arrays([t.column(f.name).cast(f.type) for f in fields_], schema=pa.schema(fields_))
