"""Vocabulary stage against the real WordNet 3.0 that `make setup` arranges for nltk."""

from __future__ import annotations

import pytest

from pipeline.vocabulary import (
    VocabularyError,
    build_edges,
    build_synsets,
    expand_queries,
    load_wordnet,
    select,
    wnid_of,
)


@pytest.fixture(scope="module")
def wn():
    return load_wordnet()


def row(table, wnid):
    rows = [r for r in table.to_pylist() if r["wnid"] == wnid]
    assert len(rows) == 1
    return rows[0]


def test_tench_row_matches_imagenet_and_wordnet(wn):
    table = build_synsets(wn, select(wn, wnids=["n01440764"]))
    tench = row(table, "n01440764")
    assert tench["lemmas"] == ["tench", "Tinca tinca"]
    assert tench["gloss"] == (
        "freshwater dace-like game fish of Europe and western Asia noted for ability to survive outside water"
    )
    assert tench["name"] == "tench.n.01"
    assert tench["lexname"] == "noun.animal"
    assert tench["parent_wnids"] == ["n01439121"]  # cyprinid
    assert tench["is_leaf"] is True
    assert "tench fish" in tench["queries"]  # "fish" is an ancestor lemma and occurs in the gloss


def test_whippet_dog_query(wn):
    whippet = wn.synset("whippet.n.01")
    table = build_synsets(wn, [whippet])
    queries = row(table, wnid_of(whippet))["queries"]
    assert queries[0] == "whippet"
    assert "whippet dog" in queries
    assert not any(q.endswith(" England") for q in queries)  # not an ancestor word


def test_expand_queries_whole_words_only():
    assert expand_queries(["cat"], "a doglike animal", ["dog"]) == ["cat"]
    assert expand_queries(["x"], "Small Dog.", ["dog"]) == ["x", "x dog"]
    assert expand_queries(["a", "b"], "hunting dog breed", ["hunting dog"]) == ["a", "b", "a hunting dog", "b hunting dog"]


def test_leaves_only_has_no_ancestor_pairs(wn):
    chosen = select(wn, roots=["dog.n.01"], leaves_only=True)
    assert len(chosen) > 100
    chosen_set = set(chosen)
    for s in chosen:
        ancestors = {a for path in s.hypernym_paths() for a in path if a != s}
        assert not (ancestors & chosen_set), s
    everything = select(wn, roots=["dog.n.01"])
    assert len(everything) > len(chosen)


def test_max_depth_and_exclude(wn):
    dog = wn.synset("dog.n.01")
    assert select(wn, roots=["n02084071"], max_depth=0) == [dog]
    one = select(wn, roots=["n02084071"], max_depth=1)
    assert set(one) == {dog, *dog.hyponyms(), *dog.instance_hyponyms()}
    hound = wn.synset("hound.n.01")
    no_hounds = select(wn, roots=["dog.n.01"], exclude=[wnid_of(hound)])
    assert hound not in no_hounds and wn.synset("whippet.n.01") not in no_hounds
    assert wn.synset("poodle.n.01") in no_hounds


def test_bad_wnid_file_lists_every_bad_line(wn, tmp_path):
    f = tmp_path / "wnids.txt"
    f.write_text("n01440764\n\n# a comment\nn99999999\nv01234567\ntench\nn02084071  # dog\nn0144076\n")
    with pytest.raises(VocabularyError) as err:
        select(wn, wnid_file=f)
    msg = str(err.value)
    assert "4 bad synset reference(s)" in msg
    for lineno, text in ((4, "n99999999"), (5, "v01234567"), (6, "tench"), (8, "n0144076")):
        assert f"line {lineno}: '{text}'" in msg
    assert "not a noun synset" in msg
    good = tmp_path / "good.txt"
    good.write_text("n01440764\nn02084071\n")
    assert [wnid_of(s) for s in select(wn, wnid_file=good)] == ["n01440764", "n02084071"]
    with pytest.raises(VocabularyError, match="nothing selected"):
        select(wn)


def test_edges_reach_the_root(wn):
    edges = build_edges([wn.synset("whippet.n.01")]).to_pylist()
    parents = {(e["child_wnid"], e["parent_wnid"]) for e in edges}
    assert ("n02091134", "n02090827") in parents  # whippet -> greyhound
    children = {e["child_wnid"] for e in edges}
    assert "n00001740" not in children and any(e["parent_wnid"] == "n00001740" for e in edges)  # entity is the top
