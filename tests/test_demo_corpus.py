"""The offline demo corpus: real skimage photos with known truth, served in the Openverse API format, run
through the real openverse source, collect and ingest (no Label Studio, no Airflow: fast)."""

from __future__ import annotations

import dataclasses
import io
import json
import urllib.error
import urllib.request
from collections import Counter

import pandas as pd
import pytest
from PIL import Image

from pipeline.config import load_settings
from pipeline.demo_corpus import (
    DEMO_SYNSETS,
    build_corpus,
    edit_copy,
    search_page,
    start_openverse_server,
)
from pipeline.store import LocalStore


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(seed=0)


@pytest.fixture(scope="module")
def server(corpus):
    srv = start_openverse_server(corpus)
    yield srv
    srv.stop()


def test_wnids_are_the_wordnet_30_offsets_of_the_named_synsets(corpus):
    from pipeline.vocabulary import load_wordnet, wnid_of

    wn = load_wordnet()
    assert len(DEMO_SYNSETS) >= 5
    for syn in DEMO_SYNSETS:
        s = wn.synset(syn.name)
        assert wnid_of(s) == syn.wnid, syn.name
        lemmas = [n.replace("_", " ").lower() for n in s.lemma_names()]
        assert syn.lemma in lemmas
        assert corpus.queries[syn.wnid] == lemmas  # the server answers every lemma the vocabulary expands


def test_corpus_is_deterministic_and_the_seed_changes_the_edits(corpus):
    again = build_corpus(seed=0)
    assert again.digest() == corpus.digest()
    assert again.truth == corpus.truth and again.listing == corpus.listing
    other = build_corpus(seed=1)
    assert other.digest() != corpus.digest()
    # the distinct photos stay the same: only the planted edits and the ranking follow the seed
    distinct = [n for n, t in corpus.truth.items() if t["kind"] == "distinct"]
    assert all(other.files[n].data == corpus.files[n].data for n in distinct)


def test_every_image_decodes_and_its_truth_fits_it(corpus):
    kinds = Counter(t["kind"] for t in corpus.truth.values())
    assert kinds["corrupt"] == 1 and kinds["tiny"] == 1 and kinds["misfiled"] == len(DEMO_SYNSETS)
    for syn in DEMO_SYNSETS:
        listed = [corpus.truth[n] for n in corpus.listing[syn.wnid]]
        assert sum(t["kind"] == "distinct" for t in listed) >= 3
        assert sum(t["kind"] == "near_copy" for t in listed) >= 2
        assert sum(t["kind"] == "misfiled" and t["wnid"] != syn.wnid for t in listed) == 1
    edits = set()
    for name, t in corpus.truth.items():
        data = corpus.files[name].data
        if t["kind"] == "corrupt":
            with pytest.raises(OSError):
                Image.open(io.BytesIO(data)).load()
            continue
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            w, h = img.size
        if t["kind"] == "tiny":
            assert min(w, h) < load_settings(env={}).ingest.min_side
            continue
        assert min(w, h) >= 64, name
        x0, y0, x1, y1 = t["box"]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, (name, t["box"], (w, h))
        assert (x1 - x0) * (y1 - y0) >= 0.02 * w * h, name  # a box a person can draw
        if t["kind"] == "near_copy":
            assert corpus.truth[t["near_copy_of"]]["kind"] == "distinct"
            assert corpus.truth[t["near_copy_of"]]["wnid"] == t["wnid"]
            edits.add(t["edit"].split()[0])
    assert edits == {"re-compressed", "downscaled", "border", "brightness"}


def test_bad_input_names_what_is_wrong(corpus):
    missing = dataclasses.replace(DEMO_SYNSETS[0], photo="no-such-photo.png")
    with pytest.raises(FileNotFoundError, match="no-such-photo.png"):
        build_corpus(synsets=[missing])
    with pytest.raises(ValueError, match="unknown edit kind 'blur'"):
        edit_copy(Image.new("RGB", (64, 64)), (0, 0, 64, 64), "blur", __import__("random").Random(0))
    assert search_page(corpus, "http://x", {"q": "tabby", "page": "two"})[0] == 400
    assert search_page(corpus, "http://x", {"q": "tabby", "page": "0"})[0] == 400
    assert search_page(corpus, "http://x", {"q": "tabby", "page_size": "50"})[0] == 400


def _get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


def test_real_openverse_source_pages_through_the_server(corpus, server):
    from pipeline.sources.collect import build_sources

    settings = load_settings(env={}, overrides={"collect": {"openverse_url": server.url, "page_size": 3}})
    (source,) = build_sources(settings, ["openverse"])
    wnid = DEMO_SYNSETS[0].wnid
    got = list(source.search({"wnid": wnid}, "tabby cat", budget=100))
    assert [g["url"].rsplit("/", 1)[1] for g in got] == corpus.listing[wnid]  # every page, in rank order
    assert len(got) > 3  # so the source had to follow page_count
    for g in got:  # license and creator come through the source's normalisation
        f = corpus.files[g["url"].rsplit("/", 1)[1]]
        assert g["license"] == f.license and g["creator"] == f.creator and g["license_url"].endswith("/1.0/")
    assert list(source.search({"wnid": wnid}, "zebra", budget=100)) == []
    assert len(list(source.search({"wnid": wnid}, "tabby", budget=2))) == 2
    status, body, ctype = _get(got[0]["url"])
    assert status == 200 and ctype == "image/jpeg" and body == corpus.files[got[0]["url"].rsplit("/", 1)[1]].data
    status, body, _ = _get(server.url + "/v1/images/?q=tabby&page=99&page_size=3")
    assert status == 400 and "page" in json.loads(body)["detail"]
    assert _get(server.url + "/images/nope.jpg")[0] == 404
    source.close()


def test_real_ingest_catches_the_planted_near_copies_and_broken_files(corpus, server, tmp_path):
    from pipeline.ingest.stage import run_ingest
    from pipeline.sources.collect import run_collect
    from pipeline.vocabulary import run_vocabulary

    wnid_file = tmp_path / "classes.txt"
    wnid_file.write_text("\n".join(s.wnid for s in DEMO_SYNSETS) + "\n")
    store = LocalStore(tmp_path / "store")
    settings = load_settings(env={}, overrides={
        "store": {"url": str(store.root)}, "vocabulary": {"wnid_file": str(wnid_file)},
        "collect": {"sources": ["openverse"], "openverse_url": server.url},
        "ingest": {"allowed_networks": ["127.0.0.0/8"]},  # default concurrency, as the collect DAG runs it
    })
    run_vocabulary(settings, store, log=lambda *_: None)
    collected = run_collect(store, settings)
    assert collected["errors"] == [] and collected["candidates"] == len(corpus.files)
    run_ingest(store, settings)

    images = store.read_table("images").to_pandas()
    name = images["first_url"].str.rsplit("/", n=1).str[1]
    reasons = dict(zip(name[images["status"] == "rejected"], images.loc[images["status"] == "rejected", "reject_reason"],
                       strict=True))
    expected = {n: t["expect_reject"] for n, t in corpus.truth.items() if t["kind"] in ("corrupt", "tiny")}
    assert set(reasons) == set(expected)
    assert all(reasons[n] in ok for n, ok in expected.items()), reasons

    links = store.read_table("image_links").to_pandas()
    links["name"] = links["url"].str.rsplit("/", n=1).str[1]
    name_of = dict(zip(links["image_id"], links["name"], strict=False))
    flagged = {(r.wnid, frozenset((r.name, name_of[r.near_duplicate_of])))
               for r in links[links["near_duplicate_of"].notna()].itertuples()}
    planted = {(t["wnid"], frozenset((n, t["near_copy_of"]))) for n, t in corpus.truth.items()
               if t["kind"] == "near_copy"}
    assert flagged == planted  # every planted copy caught with its original, and no distinct pair
    assert not links["multi_synset"].any()  # the misfiled crops are not copies of another synset's images
    assert len(links) == sum(t["kind"] not in ("corrupt", "tiny") for t in corpus.truth.values())
    truth_wnid = links["name"].map(lambda n: corpus.truth[n]["wnid"])
    assert (truth_wnid != links["wnid"]).sum() == len(DEMO_SYNSETS)  # one misfiled per synset reaches the crowd
    assert isinstance(links, pd.DataFrame)


def test_queries_match_the_synset_whose_lemma_they_contain(corpus):
    by_lemma = {s.lemma: s.wnid for s in DEMO_SYNSETS}
    # the vocabulary stage's expansions: lemma + ancestor word, synonyms, any case and spacing
    assert corpus.match("tabby cat") == by_lemma["tabby"]
    assert corpus.match("Espresso  Coffee") == by_lemma["espresso"]
    assert corpus.match("spaceman person") == by_lemma["astronaut"]
    assert corpus.match("projectile vehicle") == by_lemma["rocket"]
    assert corpus.match("coffee") is None and corpus.match("cat") is None and corpus.match("") is None
    status, doc = search_page(corpus, "http://x", {"q": "coffee"})
    assert status == 200 and doc["result_count"] == 0 and doc["results"] == []
