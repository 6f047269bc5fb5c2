"""Gold controls: the `gold` table (built from the crowd's own results and an optional expert seed file) and
per-worker accuracy on it.

`refresh_gold(store, settings)` keeps the `gold` table (image_id, wnid, answer, source). Its rows come from:

- ``seed``: an expert-checked file, `crowd.gold_seed_file` (CSV or Parquet: image_id or url, wnid, answer yes/no),
  for a new vocabulary the crowd has not judged yet. These rows mirror the file: a row taken out of the file
  leaves the table, and a seed row wins over a crowd-built row for the same pair.
- ``crowd`` (known positives): pairs QC accepted with confidence >= `crowd.gold_min_confidence` that at least
  `crowd.gold_min_workers` workers said yes to, and no worker said no to, counting only workers neither QC
  (`workers`) nor gold (`worker_gold`) flags; at most `crowd.gold_positives_per_wnid` per synset and at most
  `crowd.gold_max_positive_share` of the synset's accepted images, since each one leaves the labels.
- ``crowd:<wnid>`` (known negatives): an image confidently accepted for synset <wnid>, asked about a synset in
  another top-level subtree of the vocabulary (see `subtree_tops`), never about its ancestor or descendant;
  at most `crowd.gold_negatives_per_wnid` per synset.

A control must be unambiguous, so an image linked to several synsets (`image_links.multi_synset`), a near copy, or
an image accepted for more than one synset is never used. Crowd-built controls stay once chosen (a positive
leaves `labels` when it becomes a control, so it could not qualify a second time), unless their synset or image
leaves the store, a negative's image becomes ambiguous, or a lowered quota trims them.

Gold pairs never reach `labels` (the QC stage leaves every pair of the `gold` table out of labels and push plan,
and every pair it has seen as a gold task), hence never a release. So that the labels a settled crowd loop publishes
never hold a control, the crowd DAG refreshes gold only while QC still has votes to ask for (`grow=False`
otherwise). Until there is any gold, pushes carry no controls and QC runs without them.

Workers below `gold_min_accuracy` after at least `gold_min_n` gold answers are flagged (`worker_gold`): QC drops
their votes and the crowd side blocks them (`crowd.status.block_flagged`).

    >>> import pandas as pd
    >>> votes = pd.DataFrame({"worker": ["a", "a", "b", "b"], "is_gold": [True] * 4, "task_id": [1, 2, 1, 2],
    ...                       "answer": ["yes", "no", "no", "no"]})
    >>> tasks = pd.DataFrame({"task_id": [1, 2], "gold_answer": ["yes", "no"]})
    >>> worker_gold(votes, tasks, min_n=2, min_accuracy=0.7)[["worker", "gold_accuracy", "flagged"]].values.tolist()
    [['a', 1.0, False], ['b', 0.5, True]]
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.errors import UserError

log = logging.getLogger("synsetforge.crowd")

COLUMNS = ["worker", "n_votes", "gold_n", "gold_correct", "gold_accuracy", "yes_rate", "flagged", "flag_reason"]
GOLD_COLUMNS = ["image_id", "wnid", "answer", "source"]
SEED, CROWD = "seed", "crowd"
ANSWERS = {"yes": "yes", "no": "no", "y": "yes", "n": "no", "true": "yes", "false": "no", "1": "yes", "0": "no"}


class GoldSeedError(UserError):
    """The gold seed file is missing or malformed; the message names the file, the rows and what to fix."""


@dataclass(frozen=True)
class GoldRules:
    """How crowd-built controls are chosen (CrowdSettings.gold_*)."""

    min_confidence: float = 0.999
    min_workers: int = 3
    positives_per_wnid: int = 3
    negatives_per_wnid: int = 5
    max_positive_share: float = 1.0  # of a synset's accepted images (known positives included)

    @classmethod
    def from_settings(cls, crowd: Any) -> GoldRules:
        return cls(min_confidence=crowd.gold_min_confidence, min_workers=crowd.gold_min_workers,
                   positives_per_wnid=crowd.gold_positives_per_wnid, negatives_per_wnid=crowd.gold_negatives_per_wnid,
                   max_positive_share=crowd.gold_max_positive_share)


def _order(*parts: Any) -> str:
    """A fixed pseudo-random order (reproducible choices, spread over images and synsets)."""
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()


def empty_gold() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in GOLD_COLUMNS})


# -- the hierarchy ----------------------------------------------------------------------------------------
def subtree_tops(synsets: pd.DataFrame, edges: pd.DataFrame | None = None
                 ) -> tuple[dict[str, frozenset[str]], dict[str, frozenset[str]]]:
    """(tops, ancestors) per selected synset. A synset's tops are the highest nodes of its is-a paths that lie
    below the ancestors every selected synset shares: its top-level subtrees within the vocabulary. Two synsets
    whose tops are disjoint are in different subtrees (and neither is an ancestor of the other). The hierarchy is
    read from `synset_edges` (child_wnid, parent_wnid) and `synsets.parent_wnids`.

        >>> syn = pd.DataFrame({"wnid": ["tench", "goldfish", "dog"], "parent_wnids": [["fish"], ["fish"], ["mammal"]]})
        >>> edges = pd.DataFrame({"child_wnid": ["fish", "mammal"], "parent_wnid": ["vertebrate", "vertebrate"]})
        >>> tops, _ = subtree_tops(syn, edges)
        >>> sorted(tops["tench"]), sorted(tops["dog"]), tops["tench"] == tops["goldfish"]
        (['fish'], ['mammal'], True)
    """
    parents: dict[str, set[str]] = {}
    if edges is not None and len(edges):
        for c, p in zip(edges["child_wnid"], edges["parent_wnid"], strict=True):
            parents.setdefault(str(c), set()).add(str(p))
    if "parent_wnids" in synsets.columns:
        for w, ps in zip(synsets["wnid"], synsets["parent_wnids"], strict=True):
            if ps is not None and len(ps):
                parents.setdefault(str(w), set()).update(str(p) for p in ps)
    memo: dict[str, frozenset[str]] = {}

    def ancestors(node: str) -> frozenset[str]:
        if node in memo:
            return memo[node]
        out: set[str] = set()
        stack = list(parents.get(node, ()))
        while stack:
            n = stack.pop()
            if n in out:
                continue
            out.add(n)
            if n in memo:
                out |= memo[n]
            else:
                stack.extend(parents.get(n, ()))
        memo[node] = frozenset(out)
        return memo[node]

    selected = [str(w) for w in synsets["wnid"]]
    anc = {w: ancestors(w) for w in selected}
    common = frozenset.intersection(*anc.values()) if anc else frozenset()
    tops: dict[str, frozenset[str]] = {}
    for w in selected:
        nodes = (anc[w] | {w}) - common
        tops[w] = frozenset(n for n in nodes if not parents.get(n) or parents[n] & common)
    return tops, anc


def separate(a: str, b: str, tops: Mapping[str, frozenset[str]], anc: Mapping[str, frozenset[str]]) -> bool:
    """True when synsets a and b are in different top-level subtrees (so neither is an ancestor of the other)."""
    if a == b or a not in tops or b not in tops:
        return False
    return not (tops[a] & tops[b]) and a not in anc[b] and b not in anc[a]


# -- choosing controls (pure) -----------------------------------------------------------------------------
def confident_pairs(labels: pd.DataFrame, votes: pd.DataFrame, flagged: Iterable[str], *, min_confidence: float,
                    min_workers: int) -> pd.DataFrame:
    """Accepted (image_id, wnid) pairs with confidence >= min_confidence that >= min_workers unflagged workers said
    yes to and no unflagged worker said no to; columns image_id, wnid, n_yes (unflagged yes-voters)."""
    out_cols = ["image_id", "wnid", "n_yes"]
    if labels.empty or votes.empty:
        return pd.DataFrame(columns=out_cols)
    lab = labels[(labels["status"] == "accepted") & (labels["confidence"].fillna(0.0) >= min_confidence)]
    if lab.empty:
        return pd.DataFrame(columns=out_cols)
    v = votes[["image_id", "wnid", "worker", "answer"]].merge(lab[["image_id", "wnid"]], on=["image_id", "wnid"])
    v = v[~v["worker"].astype(str).isin(set(flagged))]
    v = v.assign(answer=v["answer"].astype(str).str.strip().str.lower())
    v = v.drop_duplicates(["image_id", "wnid", "worker", "answer"])
    yes = v[v["answer"] == "yes"].groupby(["image_id", "wnid"])["worker"].nunique().rename("n_yes")
    no = v[v["answer"] == "no"].groupby(["image_id", "wnid"])["worker"].nunique().rename("n_no")
    c = lab[["image_id", "wnid"]].join(yes, on=["image_id", "wnid"]).join(no, on=["image_id", "wnid"])
    c = c.fillna({"n_yes": 0, "n_no": 0})
    c = c[(c["n_yes"] >= min_workers) & (c["n_no"] == 0)]
    return c.assign(n_yes=c["n_yes"].astype("int64"))[out_cols].reset_index(drop=True)


def ambiguous_images(links: pd.DataFrame, labels: pd.DataFrame, gold: pd.DataFrame) -> set[str]:
    """Images no control may use: linked to several synsets, a near copy, or accepted (or a known positive) for more
    than one synset."""
    bad: set[str] = set()
    if len(links):
        multi = links["multi_synset"].fillna(False).astype(bool)
        near = links["near_duplicate_of"].notna() if "near_duplicate_of" in links.columns else False
        bad |= set(links.loc[multi | near, "image_id"])
    acc = [labels.loc[labels["status"] == "accepted", ["image_id", "wnid"]]] if len(labels) else []
    if len(gold):
        acc.append(gold.loc[gold["answer"] == "yes", ["image_id", "wnid"]])
    if acc:
        both = pd.concat(acc, ignore_index=True).drop_duplicates()
        n = both.groupby("image_id")["wnid"].nunique()
        bad |= set(n[n > 1].index)
    return bad


def build_gold(
    *,
    previous: pd.DataFrame,
    seed: pd.DataFrame,
    labels: pd.DataFrame,
    votes: pd.DataFrame,
    links: pd.DataFrame,
    synsets: pd.DataFrame,
    edges: pd.DataFrame | None,
    images: Iterable[str],
    flagged: Iterable[str],
    rules: GoldRules,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The new gold table and what changed (pure). `images`: ids of stored images a task can show.

        >>> import pandas as pd
        >>> syn = pd.DataFrame({"wnid": ["n01", "n02"], "parent_wnids": [["fish"], ["mammal"]]})
        >>> labels = pd.DataFrame({"image_id": ["a", "b"], "wnid": ["n01", "n02"], "status": "accepted",
        ...                        "confidence": 0.9999})
        >>> votes = pd.DataFrame({"image_id": ["a"] * 3 + ["b"] * 3, "wnid": ["n01"] * 3 + ["n02"] * 3,
        ...                       "worker": ["w1", "w2", "w3"] * 2, "answer": "yes"})
        >>> links = pd.DataFrame({"image_id": ["a", "b"], "wnid": ["n01", "n02"], "multi_synset": False,
        ...                       "near_duplicate_of": None})
        >>> gold, _ = build_gold(previous=empty_gold(), seed=empty_gold(), labels=labels, votes=votes, links=links,
        ...                      synsets=syn, edges=None, images=["a", "b"], flagged=[], rules=GoldRules())
        >>> gold.sort_values(["wnid", "answer"]).values.tolist()
        [['b', 'n01', 'no', 'crowd:n02'], ['a', 'n01', 'yes', 'crowd'], ['a', 'n02', 'no', 'crowd:n01'], ['b', 'n02', 'yes', 'crowd']]
    """
    wnids = set(synsets["wnid"].astype(str))
    stored = set(images)
    tops, anc = subtree_tops(synsets, edges)
    seed = seed[seed["wnid"].isin(wnids) & seed["image_id"].isin(stored)] if len(seed) else empty_gold()
    seed_pairs = set(zip(seed["image_id"], seed["wnid"], strict=True))
    prev = previous[previous["source"].fillna("") != SEED] if len(previous) else empty_gold()
    ambiguous = ambiguous_images(links, labels, pd.concat([seed, prev], ignore_index=True))
    link_pairs = set(zip(links["image_id"], links["wnid"], strict=True)) if len(links) else set()

    # earlier crowd-built controls that are still valid
    def still_valid(r: Any) -> bool:
        if r.wnid not in wnids or r.image_id not in stored or (r.image_id, r.wnid) in seed_pairs:
            return False
        if r.answer == "yes":
            return True
        origin = str(r.source).partition(":")[2]
        return (r.image_id not in ambiguous and (r.image_id, r.wnid) not in link_pairs
                and separate(origin, r.wnid, tops, anc))

    kept = prev[[still_valid(r) for r in prev.itertuples(index=False)]] if len(prev) else empty_gold()
    pos = kept[kept["answer"] == "yes"]
    neg = kept[kept["answer"] == "no"]
    pos = _trim(pos, rules.positives_per_wnid)
    neg = _trim(neg, rules.negatives_per_wnid)

    # new positives: confident accepted pairs, images used by no other control
    conf = confident_pairs(labels, votes, flagged, min_confidence=rules.min_confidence, min_workers=rules.min_workers)
    conf = conf[conf["wnid"].isin(wnids) & conf["image_id"].isin(stored) & ~conf["image_id"].isin(ambiguous)]
    taken = set(zip(pos["image_id"], pos["wnid"], strict=True)) | set(zip(neg["image_id"], neg["wnid"], strict=True))
    taken |= seed_pairs
    new_pos = []
    have = pos.groupby("wnid").size().to_dict()
    accepted = labels.loc[labels["status"] == "accepted", "wnid"].value_counts().to_dict() if len(labels) else {}
    full = {w for w, n in have.items() if n >= rules.positives_per_wnid}
    cand = conf[~conf["wnid"].isin(full)]
    cand = cand.assign(_o=[_order(i, w) for i, w in zip(cand["image_id"], cand["wnid"], strict=True)])
    for wnid, grp in cand.sort_values(["wnid", "_o"]).groupby("wnid", sort=True):
        # a known positive leaves the labels: a small synset gives few (max_positive_share of what it has)
        share = int((accepted.get(wnid, 0) + have.get(wnid, 0)) * rules.max_positive_share + 1e-9)
        room = min(rules.positives_per_wnid, share) - have.get(wnid, 0)
        for rec in grp.itertuples(index=False):
            if room <= 0:
                break
            if (rec.image_id, wnid) in taken:
                continue
            new_pos.append({"image_id": rec.image_id, "wnid": wnid, "answer": "yes", "source": CROWD})
            taken.add((rec.image_id, wnid))
            room -= 1

    # new negatives: images known to show one synset, asked about a synset of another subtree
    known = [conf[["image_id", "wnid"]]]
    for frame in (pos, seed, pd.DataFrame(new_pos, columns=GOLD_COLUMNS)):
        if len(frame):
            known.append(frame.loc[frame["answer"] == "yes", ["image_id", "wnid"]])
    sources = pd.concat(known, ignore_index=True).drop_duplicates()
    sources = sources[sources["wnid"].isin(wnids) & sources["image_id"].isin(stored) & ~sources["image_id"].isin(ambiguous)]
    sources = sources.drop_duplicates("image_id")  # one synset per image (ambiguous ones are gone already)
    sources = sources.sort_values("image_id").reset_index(drop=True)  # image ids are sha256 digests: a fixed shuffle
    by_tops: dict[frozenset[str], list[tuple[str, str]]] = {}
    for i, w in zip(sources["image_id"], sources["wnid"], strict=True):
        by_tops.setdefault(tops.get(w, frozenset()), []).append((i, w))
    new_neg = []
    have = neg.groupby("wnid").size().to_dict()
    pools: dict[frozenset[str], list[tuple[str, str]]] = {}  # one pool per distinct set of tops (a handful)
    for wnid in sorted(wnids):
        room = rules.negatives_per_wnid - have.get(wnid, 0)
        if room <= 0:
            continue
        mine = tops.get(wnid, frozenset())
        if mine not in pools:
            pools[mine] = [s for t, group in by_tops.items() if t and not (t & mine) for s in group]
        pool = pools[mine]
        if not pool:
            continue
        start = int(_order(wnid)[:8], 16) % len(pool)  # each synset starts somewhere else in the pool
        for k in range(len(pool)):
            image_id, origin = pool[(start + k) % len(pool)]
            if room <= 0:
                break
            if (image_id, wnid) in taken or (image_id, wnid) in link_pairs or not separate(origin, wnid, tops, anc):
                continue
            new_neg.append({"image_id": image_id, "wnid": wnid, "answer": "no", "source": f"{CROWD}:{origin}"})
            taken.add((image_id, wnid))
            room -= 1

    parts = [p for p in (seed[GOLD_COLUMNS], pos, neg, pd.DataFrame(new_pos, columns=GOLD_COLUMNS),
                         pd.DataFrame(new_neg, columns=GOLD_COLUMNS)) if len(p)]
    gold = pd.concat(parts, ignore_index=True)[GOLD_COLUMNS] if parts else empty_gold()
    gold = gold.drop_duplicates(["image_id", "wnid"], keep="first")
    gold = gold.sort_values(["wnid", "answer", "image_id"], kind="stable").reset_index(drop=True)
    old = set(map(tuple, previous[GOLD_COLUMNS].to_numpy().tolist())) if len(previous) else set()
    new = set(map(tuple, gold.to_numpy().tolist()))
    single_subtree = len({t for t in tops.values() if t}) <= 1 and len(wnids) > 1
    stats = {"gold": len(gold), "positives": int((gold["answer"] == "yes").sum()),
             "negatives": int((gold["answer"] == "no").sum()), "seed": int((gold["source"] == SEED).sum()),
             "added": len(new - old), "dropped": len(old - new), "synsets_with_gold": int(gold["wnid"].nunique()),
             "confident_pairs": len(conf)}
    if single_subtree:
        stats["note"] = ("the vocabulary is one subtree: no crowd-built negatives (a seed file with known negatives "
                         "adds them)")
    return gold, stats


def _trim(frame: pd.DataFrame, per_wnid: int) -> pd.DataFrame:
    if frame.empty:
        return frame
    f = frame.assign(_o=[_order(i, w) for i, w in zip(frame["image_id"], frame["wnid"], strict=True)])
    return f.sort_values(["wnid", "_o"]).groupby("wnid").head(per_wnid).drop(columns="_o")


# -- the seed file ----------------------------------------------------------------------------------------
def read_seed(path: str | Path, images: pd.DataFrame, links: pd.DataFrame | None = None) -> tuple[pd.DataFrame, int]:
    """(seed rows as gold rows, rows whose image the store does not hold). Rows name the image by image_id or url
    (an `images.first_url` or `image_links.url`)."""
    p = Path(path)
    if not p.is_file():
        raise GoldSeedError(f"gold seed file {p} does not exist; fix crowd.gold_seed_file or unset it")
    try:
        df = pd.read_parquet(p) if p.suffix.lower() in (".parquet", ".pq") else pd.read_csv(p, dtype=str)
    except Exception as exc:  # noqa: BLE001 - any reader error means the file is not what it should be
        raise GoldSeedError(f"gold seed file {p} is not readable as "
                            f"{'Parquet' if p.suffix.lower() in ('.parquet', '.pq') else 'CSV'}: {exc}") from None
    cols = {c.strip().lower(): c for c in df.columns}
    if "wnid" not in cols or "answer" not in cols or not ({"image_id", "url"} & set(cols)):
        raise GoldSeedError(f"gold seed file {p} has columns {list(df.columns)}; it needs wnid, answer (yes/no) "
                            "and image_id or url")
    df = df.rename(columns={v: k for k, v in cols.items()})
    wnid = df["wnid"].astype(str).str.strip()
    answer = df["answer"].astype(str).str.strip().str.lower().map(ANSWERS)
    bad = df[~wnid.str.fullmatch(r"n\d{8}") | answer.isna()]
    if len(bad):
        raise GoldSeedError(f"gold seed file {p}: {len(bad)} row(s) with a wnid not of the form n + 8 digits or an "
                            f"answer other than yes/no (first, 1-based data rows: {[int(i) + 1 for i in bad.index[:5]]}); "
                            "fix them and refresh again")
    image_id = df["image_id"].astype(object).where(df["image_id"].notna(), None) if "image_id" in df.columns \
        else pd.Series([None] * len(df), dtype=object)
    if "url" in df.columns:
        by_url: dict[str, str] = {}
        if links is not None and len(links):
            by_url.update(zip(links["url"].astype(str), links["image_id"].astype(str), strict=True))
        ok = images[images["image_id"].notna()] if len(images) else images
        if len(ok):
            by_url.update(zip(ok["first_url"].astype(str), ok["image_id"].astype(str), strict=True))
        from_url = df["url"].map(lambda u: by_url.get(str(u).strip()) if isinstance(u, str) else None)
        image_id = image_id.where(image_id.notna() & (image_id.astype(str).str.len() > 0), from_url)
    rows = pd.DataFrame({"image_id": image_id, "wnid": wnid, "answer": answer, "source": SEED})
    unknown = int(rows["image_id"].isna().sum())
    rows = rows[rows["image_id"].notna()]
    clash = rows.groupby(["image_id", "wnid"])["answer"].nunique()
    if (clash > 1).any():
        raise GoldSeedError(f"gold seed file {p} answers both yes and no for {list(clash[clash > 1].index[:3])}; "
                            "keep one answer per (image, wnid)")
    return rows.drop_duplicates(["image_id", "wnid"]).reset_index(drop=True), unknown


# -- the I/O shell ----------------------------------------------------------------------------------------
def _table(store: Any, name: str) -> pd.DataFrame:
    return store.read_table(name, missing_ok=True).to_pandas()


def refresh_gold(store: Any, settings: Any, *, grow: bool = True) -> dict[str, Any]:
    """Rebuild the `gold` table from the store's tables (and the seed file); write it when it changed.

    grow=False leaves the table as it is (the crowd DAG passes it when QC has nothing left to ask, so the labels
    that run publishes hold no pair that has just become a control)."""
    from crowd.status import flagged_workers

    cs = settings.crowd
    previous = _table(store, "gold")
    if not grow:
        return {"gold": len(previous), "positives": int((previous["answer"] == "yes").sum()) if len(previous) else 0,
                "negatives": int((previous["answer"] == "no").sum()) if len(previous) else 0,
                "added": 0, "dropped": 0, "frozen": True,
                "note": "QC has nothing left to ask: gold is left as it is, so the labels published hold no control"}
    images = _table(store, "images")
    from pipeline.ingest.stage import latest_links

    links = latest_links(_table(store, "image_links"))  # the current version of each link (ingest appends versions)
    stored = set(images.loc[images["image_id"].notna() & images["storage_key"].notna(), "image_id"]) if len(images) else set()
    seed, unknown = (read_seed(cs.gold_seed_file, images, links) if cs.gold_seed_file else (empty_gold(), 0))
    synsets = _table(store, "synsets")
    gold, stats = build_gold(
        previous=previous, seed=seed, labels=_table(store, "labels"), votes=_table(store, "votes"), links=links,
        synsets=synsets, edges=_table(store, "synset_edges"), images=stored, flagged=flagged_workers(store),
        rules=GoldRules.from_settings(cs))
    if cs.gold_seed_file:
        stats["seed_rows_unused"] = unknown + (len(seed) - stats["seed"])
        if stats["seed_rows_unused"]:
            log.warning("gold seed file %s: %d row(s) name an image the store does not hold or a synset outside the "
                        "vocabulary; they are left out", cs.gold_seed_file, stats["seed_rows_unused"])
    changed = stats["added"] or stats["dropped"] or not store.has_table("gold")
    if changed:
        store.write_table("gold", gold[GOLD_COLUMNS])
    stats["written"] = bool(changed)
    stats["frozen"] = False
    return stats


def gold_summary(store: Any) -> pd.DataFrame:
    """Per synset: known positives and negatives (and how many came from the seed file), gold tasks pushed, answers
    to them and the share of answers that matched the known answer."""
    gold = _table(store, "gold")
    cols = ["wnid", "positives", "negatives", "seed", "gold_tasks", "answers", "agreement"]
    if gold.empty:
        return pd.DataFrame(columns=cols)
    out = gold.assign(pos=gold["answer"].eq("yes"), neg=gold["answer"].eq("no"), seed=gold["source"].eq(SEED)
                      ).groupby("wnid").agg(positives=("pos", "sum"), negatives=("neg", "sum"), seed=("seed", "sum"))
    tasks = _table(store, "tasks")
    votes = _table(store, "votes")
    gt = tasks[tasks["is_gold"].astype(bool)] if len(tasks) else tasks
    out["gold_tasks"] = gt.groupby("wnid")["task_id"].nunique() if len(gt) else 0
    if len(gt) and len(votes):
        v = votes[votes["is_gold"].astype(bool)].merge(gt[["task_id", "image_id", "gold_answer"]],
                                                       on=["task_id", "image_id"], how="inner")
        v = v.assign(ok=v["answer"] == v["gold_answer"])
        out["answers"] = v.groupby("wnid").size()
        out["agreement"] = v.groupby("wnid")["ok"].mean()
    else:
        out["answers"], out["agreement"] = 0, None
    out = out.reset_index()
    for c in ("positives", "negatives", "seed", "gold_tasks", "answers"):
        out[c] = out[c].fillna(0).astype("int64")
    return out[cols]


def worker_gold(votes: pd.DataFrame, tasks: pd.DataFrame, *, min_n: int, min_accuracy: float) -> pd.DataFrame:
    """One row per worker: votes, gold answers, gold accuracy, share of yes, flagged with reason."""
    if votes.empty:
        return pd.DataFrame(columns=COLUMNS)
    # A grid task holds several images, each with its own gold answer: match on (task, image) when both say.
    on = ["task_id", "image_id"] if "image_id" in votes.columns and "image_id" in tasks.columns else ["task_id"]
    v = votes[["worker", "answer", "is_gold", *on]].copy()
    g = v[v["is_gold"].astype(bool)].merge(tasks[[*on, "gold_answer"]], on=on, how="inner")
    g = g[g["gold_answer"].notna()]
    g["correct"] = g["answer"] == g["gold_answer"]
    per = v.groupby("worker").agg(n_votes=("task_id", "size"), yes_rate=("answer", lambda s: float((s == "yes").mean())))
    gold = g.groupby("worker").agg(gold_n=("correct", "size"), gold_correct=("correct", "sum"))
    out = per.join(gold, how="left").fillna({"gold_n": 0, "gold_correct": 0}).reset_index()
    out["gold_n"] = out["gold_n"].astype("int64")
    out["gold_correct"] = out["gold_correct"].astype("int64")
    out["gold_accuracy"] = (out["gold_correct"] / out["gold_n"]).where(out["gold_n"] > 0)
    low = (out["gold_n"] >= min_n) & (out["gold_accuracy"] < min_accuracy)
    out["flagged"] = low
    out["flag_reason"] = None
    out.loc[low, "flag_reason"] = [f"gold accuracy {a:.2f} < {min_accuracy} on {n} controls"
                                   for a, n in zip(out.loc[low, "gold_accuracy"], out.loc[low, "gold_n"], strict=True)]
    return out[COLUMNS].sort_values("worker").reset_index(drop=True)
