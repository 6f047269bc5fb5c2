"""Vocabulary stage: select WordNet 3.0 noun synsets and build the `synsets` and `synset_edges` tables.

Selection follows how ImageNet and ILSVRC picked their classes: the subtree under some roots (optionally only
its leaves, as ILSVRC's 1,000 classes are leaves), or an explicit list of wnids, minus exclusions. Queries are
expanded the way ImageNet (Deng et al., CVPR 2009) did: every synonym, plus the synonym with a word of an
ancestor synset appended when that word appears in the gloss ("whippet" -> "whippet dog"), plus lemmas in
other languages when Open Multilingual Wordnet data is installed.

    >>> wn = load_wordnet()
    >>> table = build_synsets(wn, select(wn, wnids=["n01440764"]))
    >>> table.column("lemmas")[0].as_py()
    ['tench', 'Tinca tinca']
"""

from __future__ import annotations

import os
import re
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.errors import UserError
from pipeline.schemas import validate

WNID_RE = re.compile(r"^n\d{8}$")
_TOKEN_RE = re.compile(r"[\w'-]+")
PROJECT_NLTK_DATA = Path(__file__).resolve().parent.parent / ".nltk_data"


class VocabularyError(UserError):
    """A selection names synsets that do not exist or are not nouns; the message lists every one."""


# ---------------------------------------------------------------- WordNet access


def load_wordnet(wordnet_dir: str | os.PathLike[str] | None = None) -> Any:
    """Open WordNet 3.0 with nltk, offline.

    `wordnet_dir` is an nltk data folder (holding corpora/wordnet) or the wordnet folder itself; by default
    NLTK_DATA, then the project's .nltk_data made by `make setup`, then nltk's own search path.
    """
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    candidates: list[Path] = []
    for base in (wordnet_dir, *(os.environ.get("NLTK_DATA", "").split(os.pathsep)), PROJECT_NLTK_DATA):
        if base:
            candidates += [Path(base), Path(base) / "corpora" / "wordnet"]
    for folder in candidates:
        if (folder / "data.noun").is_file() and (folder / "lexnames").is_file():
            _allow_nltk_path(folder)
            with warnings.catch_warnings():  # nltk warns when OMW is absent; that is a supported set-up
                warnings.simplefilter("ignore", UserWarning)
                return WordNetCorpusReader(str(folder), _omw_reader(folder))
    try:
        import nltk

        return WordNetCorpusReader(nltk.data.find("corpora/wordnet"), None)
    except LookupError:
        raise VocabularyError(
            "WordNet 3.0 not found: run `make setup` (Debian packages wordnet-base + wordnet-sense-index, arranged "
            f"under {PROJECT_NLTK_DATA}) or set NLTK_DATA to a folder with corpora/wordnet. Looked in: "
            + ", ".join(str(c) for c in candidates)
        ) from None


def _allow_nltk_path(folder: Path) -> None:
    """nltk (3.10+) only opens corpora under its data path; register the folder we found (its nltk data root)."""
    import nltk

    root = folder.parent.parent if folder.parent.name == "corpora" else folder
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))


def _omw_reader(wordnet_folder: Path) -> Any:
    """Open Multilingual Wordnet next to WordNet, if installed; None otherwise (queries stay English)."""
    omw = wordnet_folder.parent / "omw-1.4"
    if not omw.is_dir():
        return None
    from nltk.corpus.reader import CorpusReader

    return CorpusReader(str(omw), r".*/wn-data-.*\.tab", encoding="utf-8")


def wnid_of(synset: Any) -> str:
    return f"{synset.pos()}{synset.offset():08d}"


def synset_of(wn: Any, wnid: str) -> Any:
    """The noun synset of a wnid, or None when WordNet has no synset at that offset."""
    with warnings.catch_warnings():  # nltk warns and returns None for an unknown offset; callers report it
        warnings.simplefilter("ignore", UserWarning)
        try:
            synset = wn.synset_from_pos_and_offset("n", int(wnid[1:]))
        except Exception:  # an offset inside a line makes nltk fail to parse; it is just as unknown
            return None
    return synset if synset is not None and synset.offset() == int(wnid[1:]) else None


def _parents(synset: Any) -> list[Any]:
    return synset.hypernyms() + synset.instance_hypernyms()


def _children(synset: Any) -> list[Any]:
    return synset.hyponyms() + synset.instance_hyponyms()


# ---------------------------------------------------------------- selection


def resolve(wn: Any, names: Iterable[str], origin: str = "argument") -> list[Any]:
    """Turn wnids ("n01440764") or synset names ("tench.n.01") into synsets; every bad entry is reported at once."""
    found, bad = [], []
    for lineno, raw in enumerate(names, 1):
        text = raw.split("#", 1)[0].strip()
        if not text:
            continue
        where = f"{origin} line {lineno}: {text!r}"
        if WNID_RE.match(text):
            synset = synset_of(wn, text)
            if synset is None:
                bad.append(f"{where}: no noun synset at offset {text[1:]} in WordNet 3.0")
            else:
                found.append(synset)
        elif re.match(r"^[a-z]\d{8}$", text):
            bad.append(f"{where}: not a noun synset (wnids start with 'n')")
        elif re.match(r"^.+\.[a-z]\.\d{2}$", text):
            try:
                synset = wn.synset(text)
            except Exception:
                bad.append(f"{where}: no such synset name")
                continue
            if synset.pos() != "n":
                bad.append(f"{where}: not a noun synset (pos {synset.pos()!r})")
            else:
                found.append(synset)
        else:
            bad.append(f"{where}: expected a wnid like n01440764 or a synset name like tench.n.01")
    if bad:
        raise VocabularyError(f"{len(bad)} bad synset reference(s):\n  " + "\n  ".join(bad))
    return found


def read_wnid_file(path: str | os.PathLike[str]) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise VocabularyError(f"wnid file {p} does not exist")
    return p.read_text(encoding="utf-8").splitlines()


def _descendants(roots: Sequence[Any], max_depth: int | None) -> dict[Any, None]:
    """Breadth-first below `roots` (hyponyms and instance hyponyms), up to max_depth levels; ordered."""
    seen: dict[Any, None] = {}
    frontier = list(dict.fromkeys(roots))
    level = 0
    while frontier:
        nxt = []
        for s in frontier:
            if s in seen:
                continue
            seen[s] = None
            if max_depth is None or level < max_depth:
                nxt.extend(_children(s))
        frontier, level = nxt, level + 1
    return seen


def select(
    wn: Any,
    *,
    roots: Sequence[str] = (),
    max_depth: int | None = None,
    leaves_only: bool = False,
    wnids: Sequence[str] | None = None,
    wnid_file: str | os.PathLike[str] | None = None,
    exclude: Sequence[str] = (),
) -> list[Any]:
    """Pick synsets: the subtrees under `roots` (to max_depth) and/or an explicit list, minus `exclude` subtrees.

    leaves_only keeps the synsets with no hyponym inside the selection, so no selected synset is an ancestor of
    another (ILSVRC's classes are such a set).
    """
    chosen: dict[Any, None] = {}
    if roots:
        chosen.update(_descendants(resolve(wn, roots, "root"), max_depth))
    listed = list(wnids or [])
    if wnid_file:
        chosen.update(dict.fromkeys(resolve(wn, read_wnid_file(wnid_file), str(wnid_file))))
    if listed:
        chosen.update(dict.fromkeys(resolve(wn, listed)))
    if not (roots or wnid_file or listed):
        raise VocabularyError("nothing selected: give roots (e.g. --root n02084071), a wnid file, or wnids")
    if exclude:
        dropped = _descendants(resolve(wn, exclude, "exclude"), None)
        chosen = {s: None for s in chosen if s not in dropped}
    if leaves_only:
        chosen = {s: None for s in chosen if not any(c in chosen for c in _children(s))}
    return list(chosen)


# ---------------------------------------------------------------- table building (pure given WordNet)


@dataclass
class _Hierarchy:
    """Memoised depth and ancestor words, so 82k synsets cost one walk, not one walk each."""

    depth: dict[Any, int]
    ancestor_lemmas: dict[Any, frozenset[str]]

    @classmethod
    def empty(cls) -> _Hierarchy:
        return cls({}, {})

    def min_depth(self, s: Any) -> int:
        if s not in self.depth:
            parents = _parents(s)
            self.depth[s] = 0 if not parents else 1 + min(self.min_depth(p) for p in parents)
        return self.depth[s]

    def lemmas_above(self, s: Any) -> frozenset[str]:
        if s not in self.ancestor_lemmas:
            words: set[str] = set()
            for p in _parents(s):
                words.update(_lemmas(p))
                words.update(self.lemmas_above(p))
            self.ancestor_lemmas[s] = frozenset(words)
        return self.ancestor_lemmas[s]


def _lemmas(synset: Any) -> list[str]:
    return [name.replace("_", " ") for name in synset.lemma_names()]


def expand_queries(lemmas: Sequence[str], gloss: str, ancestor_words: Iterable[str], foreign: Sequence[str] = ()) -> list[str]:
    """ImageNet 2009 query expansion: each lemma, then lemma + ancestor word for ancestor words in the gloss.

    >>> expand_queries(["whippet"], "a small slender dog of greyhound type developed in England", ["dog", "greyhound", "hound"])
    ['whippet', 'whippet dog', 'whippet greyhound']
    """
    tokens = _TOKEN_RE.findall(gloss.lower())
    # Whole-word phrases of the gloss up to 4 words: a set lookup per ancestor lemma instead of a regex each.
    phrases = {" ".join(tokens[i:i + n]) for n in range(1, 5) for i in range(len(tokens) - n + 1)}
    own = {lemma.lower() for lemma in lemmas}
    in_gloss = sorted(w for w in set(ancestor_words) if w.lower() not in own and w.lower() in phrases)
    queries = list(lemmas)
    for lemma in lemmas:
        queries += [f"{lemma} {w}" for w in in_gloss if w.lower() not in lemma.lower()]
    queries += list(foreign)
    return list(dict.fromkeys(queries))


def _foreign_lemmas(wn: Any, synset: Any) -> list[str]:
    if wn._omw_reader is None:
        return []
    out: list[str] = []
    for lang in sorted(wn.langs()):
        if lang != "eng":
            out += [n.replace("_", " ") for n in synset.lemma_names(lang=lang)]
    return out


def build_synsets(wn: Any, synsets: Sequence[Any], *, multilingual: bool = True, progress: Any = None) -> pa.Table:
    """The `synsets` table for the given synsets, in selection order."""
    h = _Hierarchy.empty()
    cols: dict[str, list[Any]] = {k: [] for k in
                                  ("wnid", "name", "lemmas", "gloss", "depth", "parent_wnids", "lexname", "is_leaf", "queries")}
    use_omw = multilingual and wn._omw_reader is not None
    for i, s in enumerate(synsets):
        lemmas = _lemmas(s)
        gloss = s.definition()
        cols["wnid"].append(wnid_of(s))
        cols["name"].append(s.name())
        cols["lemmas"].append(lemmas)
        cols["gloss"].append(gloss)
        cols["depth"].append(h.min_depth(s))
        cols["parent_wnids"].append([wnid_of(p) for p in _parents(s)])
        cols["lexname"].append(s.lexname())
        cols["is_leaf"].append(not _children(s))
        cols["queries"].append(expand_queries(lemmas, gloss, h.lemmas_above(s), _foreign_lemmas(wn, s) if use_omw else ()))
        if progress and i % 5000 == 4999:
            progress(i + 1, len(synsets))
    return validate("synsets", pa.table(cols))


def build_edges(synsets: Sequence[Any]) -> pa.Table:
    """is-a edges from every selected synset up to the root, so the hierarchy can be walked from the tables."""
    children, parents, kinds = [], [], []
    seen: set[Any] = set()
    stack = list(synsets)
    while stack:
        s = stack.pop()
        if s in seen:
            continue
        seen.add(s)
        for kind, rel in (("hypernym", s.hypernyms()), ("instance_hypernym", s.instance_hypernyms())):
            for p in rel:
                children.append(wnid_of(s))
                parents.append(wnid_of(p))
                kinds.append(kind)
                stack.append(p)
    order = sorted(range(len(children)), key=lambda i: (children[i], parents[i]))
    return validate("synset_edges", pa.table({
        "child_wnid": [children[i] for i in order],
        "parent_wnid": [parents[i] for i in order],
        "kind": [kinds[i] for i in order],
    }))


# ---------------------------------------------------------------- I/O shell


def run_vocabulary(settings: Any, store: Any, *, log: Any = print, det: bool = False,
                   det_groups: str | None = None) -> dict[str, Any]:
    """Select from settings.vocabulary, write `synsets` and `synset_edges` to the store; return a summary."""
    v = settings.vocabulary
    t0 = time.perf_counter()
    wn = load_wordnet(v.wordnet_dir)
    chosen = select(wn, roots=v.roots, max_depth=v.max_depth, leaves_only=v.leaves_only,
                    wnid_file=v.wnid_file, exclude=v.exclude)
    log(f"selected {len(chosen):,} synsets in {time.perf_counter() - t0:.1f}s; building table")
    table = build_synsets(wn, chosen, multilingual=v.multilingual,
                          progress=lambda n, total: log(f"  {n:,}/{total:,} synsets"))
    edges = build_edges(chosen)
    synsets_key = store.write_table("synsets", table)
    edges_key = store.write_table("synset_edges", edges)
    depths = table.column("depth").to_pylist()
    det_summary = run_det_questions(store, groups_file=det_groups, wn=wn) if det or det_groups else None
    return {
        "det": det_summary,
        "synsets": table.num_rows,
        "leaves": sum(table.column("is_leaf").to_pylist()),
        "edges": edges.num_rows,
        "queries": sum(len(q) for q in table.column("queries").to_pylist()),
        "depth_range": (min(depths), max(depths)) if depths else None,
        "synsets_table": f"{store.url}/{synsets_key}",
        "edges_table": f"{store.url}/{edges_key}",
        "seconds": round(time.perf_counter() - t0, 2),
    }


def register_cli(sub: Any) -> None:
    p = sub.add_parser(
        "vocab",
        help="select WordNet synsets and write the synsets table",
        description="Select WordNet 3.0 noun synsets (subtrees under roots, or a wnid list, minus exclusions) and "
        "write the `synsets` and `synset_edges` tables, with ImageNet-style expanded search queries.",
    )
    p.add_argument("--root", action="append", default=None, metavar="WNID|NAME",
                   help="root synset, e.g. n02084071 or dog.n.01 (repeatable)")
    p.add_argument("--max-depth", type=int, default=None, help="levels below each root to include (0 = root only)")
    p.add_argument("--leaves-only", action="store_true", default=None,
                   help="keep only synsets with no hyponym in the selection (ILSVRC-style classes)")
    p.add_argument("--wnid-file", help="file with one wnid per line (n01440764), '#' comments allowed")
    p.add_argument("--exclude", action="append", default=None, metavar="WNID|NAME",
                   help="drop this synset and everything below it (repeatable)")
    p.add_argument("--no-multilingual", action="store_true", help="do not add Open Multilingual Wordnet queries")
    p.add_argument("--det", action="store_true",
                   help="the selection is a DET vocabulary: also write its tree of yes/no questions (det_questions)")
    p.add_argument("--det-groups", metavar="FILE",
                   help="TOML file of hand-set question groups ([[group]] id, name, question, members, parent)")
    p.set_defaults(func=_cli)


def _cli(args: Any, settings: Any) -> int:
    from pipeline.errors import UserError
    from pipeline.store import store_from_settings

    v = settings.vocabulary
    for name, value in (("roots", args.root), ("max_depth", args.max_depth), ("leaves_only", args.leaves_only),
                        ("wnid_file", args.wnid_file), ("exclude", args.exclude)):
        if value is not None:
            setattr(v, name, value)
    if args.no_multilingual:
        v.multilingual = False
    store = store_from_settings(settings)
    try:
        summary = run_vocabulary(settings, store, det=args.det, det_groups=args.det_groups)
    except VocabularyError as exc:
        raise UserError(str(exc)) from None
    print(f"synsets: {summary['synsets']:,} ({summary['leaves']:,} WordNet leaves), "
          f"{summary['queries']:,} queries, {summary['edges']:,} is-a edges, depth {summary['depth_range']}, "
          f"{summary['seconds']}s")
    print(f"synsets table: {summary['synsets_table']}")
    print(f"edges table:   {summary['edges_table']}")
    if summary["det"]:
        det = summary["det"]
        print(f"DET questions: {det['classes']} classes under {det['questions']} question nodes "
              f"({det['top_level']} top-level), depth {det['max_depth']}: {det['table']}")
    return 0


def read_det_groups(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Hand-set DET question groups from a TOML file: [[group]] tables with id, name, question, members, parent."""
    import tomllib

    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise VocabularyError(f"DET groups file {p}: {exc}") from None
    groups = data.get("group", [])
    bad = [i for i, g in enumerate(groups, 1) if not isinstance(g, dict) or not g.get("id") or
           not isinstance(g.get("members", []), list)]
    if not isinstance(groups, list) or bad:
        raise VocabularyError(f"DET groups file {p}: group(s) {bad} need an 'id' and a 'members' list; write "
                              "[[group]] tables")
    return groups


def run_det_questions(store: Any, *, groups_file: str | None = None, max_share: float = 0.5,
                      wn: Any = None) -> dict[str, Any]:
    """The DET question tree of the selected synsets (the `synsets` and `synset_edges` tables) -> det_questions."""
    from pipeline.presence import build_question_tree

    synsets = store.read_table("synsets").to_pandas()
    edges = store.read_table("synset_edges").to_pandas()
    names = {r.wnid: (list(r.lemmas) or [r.wnid])[0] for r in synsets.itertuples()}
    names.update(_wordnet_names(set(edges["parent_wnid"]) - set(synsets["wnid"]), wn))
    groups = read_det_groups(groups_file) if groups_file else []
    table = build_question_tree(synsets["wnid"].tolist(), edges, names, groups=groups, max_share=max_share)
    key = store.write_table("det_questions", table)
    return {"classes": int(table["is_class"].sum()), "questions": int((~table["is_class"]).sum()),
            "top_level": int(table["parent_id"].isna().sum()), "max_depth": int(table["depth"].max()),
            "table": f"{store.url}/{key}"}


def _wordnet_names(wnids: Iterable[str], wn: Any = None) -> dict[str, str]:
    """First lemma of each ancestor wnid, for the questions ("Is there any kind of dog ...?")."""
    wn = wn or load_wordnet()
    out = {}
    for w in wnids:
        try:
            out[w] = _lemmas(synset_of(wn, w))[0]
        except VocabularyError:
            out[w] = w
    return out
