"""URL lists (txt / csv / parquet), local folders, S3 prefixes, and the collect core: normalisation, per-synset
de-duplication, license filter, budget, round-robin across queries, rerun stability; the CLI."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from pipeline.cli import main
from pipeline.sources.base import Source, SourceError, license_allowed, normalize_license, normalize_url
from pipeline.sources.collect import collect_candidates, merge_candidates
from pipeline.sources.local_dir import LocalDirSource
from pipeline.sources.url_list import UrlListSource
from pipeline.store import open_store

A, B = "n00000001", "n00000002"


def syn(wnid=A, queries=("dog",)):
    return {"wnid": wnid, "lemmas": list(queries), "queries": list(queries)}


def test_normalize_url_dedupes_spellings_and_refuses_junk():
    same = {normalize_url(u) for u in ("http://A.com/x.jpg", "http://a.com:80/x.jpg", "http://a.com/x.jpg#top")}
    assert same == {"http://a.com/x.jpg"}
    assert normalize_url("https://a.com/a b.jpg") == normalize_url("https://a.com/a%20b.jpg")
    assert normalize_url("https://a.com/x.jpg?w=1") != normalize_url("https://a.com/x.jpg?w=2")
    for bad in ("javascript:alert(1)", "ftp://a.com/x", "/relative.jpg", "http://user:pw@a.com/x", "http://a.com:99999/"):
        assert normalize_url(bad) is None, bad


def test_license_normalisation_and_filter():
    assert normalize_license("CC BY-SA 4.0") == "cc-by-sa-4.0"
    assert normalize_license(None, "https://creativecommons.org/licenses/by-nc/2.0/") == "cc-by-nc-2.0"
    assert normalize_license("Public domain") == "pdm" and normalize_license("CC0") == "cc0"
    allowed = ["cc0", "cc-by", "cc-by-sa"]
    assert license_allowed("cc-by-2.0", allowed) and license_allowed("cc-by-sa-4.0", allowed)
    assert not license_allowed("cc-by-nc-2.0", allowed) and not license_allowed(None, allowed)
    assert license_allowed(None, None)


class Scripted(Source):
    def __init__(self, name, per_query_items):
        self.name = name
        self.items = per_query_items
        self.pulled = 0

    def search(self, synset, query, budget):
        for item in self.items.get(query, []):
            self.pulled += 1
            yield item


def test_collect_round_robins_queries_dedupes_and_honours_budget_and_licenses():
    src = Scripted("s", {
        "dog": [{"url": f"http://x/dog{i}.jpg", "license": "cc-by-2.0"} for i in range(100)],
        "hound": [{"url": "http://X/dog0.jpg", "license": "cc-by-2.0"},  # same URL as dog0, other spelling
                  {"url": "http://x/nc.jpg", "license": "cc-by-nc-2.0"}] +
                 [{"url": f"http://x/hound{i}.jpg", "license": "cc0"} for i in range(100)],
    })
    df, errors = collect_candidates(pd.DataFrame([syn(queries=("dog", "hound"))]), [src], budget=10,
                                    allowed_licenses=["cc0", "cc-by"])
    assert not errors and len(df) == 10
    assert df["url"].is_unique and "http://x/nc.jpg" not in set(df["url"])
    assert set(df["query"]) == {"dog", "hound"}  # both queries contribute, not just the first
    assert list(df["rank"]) == list(range(10))
    assert src.pulled < 20  # lazy: nothing pulled far past the budget


def test_same_url_in_two_synsets_is_kept_for_each():
    src = Scripted("s", {"dog": [{"url": "http://x/a.jpg"}]})
    df, _ = collect_candidates(pd.DataFrame([syn(A), syn(B)]), [src], budget=5)
    assert sorted(df["wnid"]) == [A, B]


def test_merge_replaces_covered_synsets_and_keeps_first_found_at():
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    src = Scripted("s", {"dog": [{"url": "http://x/a.jpg"}, {"url": "http://x/b.jpg"}]})
    first, _ = collect_candidates(pd.DataFrame([syn(A), syn(B)]), [src], budget=5, now=t0)
    src2 = Scripted("s", {"dog": [{"url": "http://x/b.jpg"}, {"url": "http://x/c.jpg"}]})
    second, _ = collect_candidates(pd.DataFrame([syn(A)]), [src2], budget=5, now=t0 + timedelta(days=1))
    merged = merge_candidates(first, second, [A])
    a = merged[merged.wnid == A].set_index("url")
    assert sorted(a.index) == ["http://x/b.jpg", "http://x/c.jpg"]
    assert a.loc["http://x/b.jpg", "found_at"] == t0 and a.loc["http://x/c.jpg", "found_at"] > t0
    assert len(merged[merged.wnid == B]) == 2  # untouched


def test_url_list_formats(tmp_path):
    txt = tmp_path / "urls.txt"
    txt.write_text(f"# comment\nhttp://x/1.jpg {A}\nhttp://x/2.jpg {B}\n\nhttp://x/3.jpg {A}\n")
    csv = tmp_path / "urls.csv"
    csv.write_text(f"url,wnid,license\nhttp://x/1.jpg,{A},CC BY 2.0\nhttp://x/2.jpg,{B},\n")
    pq = tmp_path / "laion.parquet"
    pd.DataFrame({"url": ["http://x/d.jpg", "http://x/c.jpg"], "caption": ["A Dog on grass", "a hotdog"]}).to_parquet(pq)
    assert [r["url"] for r in UrlListSource(txt).search(syn(A), None, 10)] == ["http://x/1.jpg", "http://x/3.jpg"]
    rows = list(UrlListSource(csv).search(syn(A), None, 10))
    assert rows[0]["license"] == "cc-by-2.0"
    laion = UrlListSource(pq)
    assert laion.per_query and [r["url"] for r in laion.search(syn(A), "dog", 10)] == ["http://x/d.jpg"]  # not "hotdog"


def test_url_list_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        UrlListSource(tmp_path / "nope.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("link,label\nhttp://x,1\n")
    with pytest.raises(SourceError, match="no 'url' column"):
        UrlListSource(bad)
    nownid = tmp_path / "nownid.csv"
    nownid.write_text("url\nhttp://x/1.jpg\n")
    with pytest.raises(SourceError, match="neither a 'wnid' column nor a caption"):
        UrlListSource(nownid)


def test_local_dir_lists_one_folder_per_wnid(tmp_path):
    (tmp_path / A).mkdir()
    for name in ("b.jpg", "a.jpg", ".hidden"):
        (tmp_path / A / name).write_bytes(b"x")
    rows = list(LocalDirSource(tmp_path).search(syn(A), None, 10))
    assert [r["url"].rsplit("/", 1)[1] for r in rows] == ["a.jpg", "b.jpg"] and rows[0]["url"].startswith("file://")
    assert list(LocalDirSource(tmp_path).search(syn(B), None, 10)) == []
    with pytest.raises(SourceError, match="is not a folder"):
        LocalDirSource(tmp_path / "missing")


def test_local_dir_reads_provenance_from_a_sidecar_and_a_folder_default(tmp_path):
    (tmp_path / A / "deeper").mkdir(parents=True)
    for name in ("cat1.jpg", "cat2.jpg", "deeper/cat3.jpg"):
        (tmp_path / A / name).write_bytes(b"x")
    (tmp_path / A / "attribution.csv").write_text(
        "file,license,creator,source_url,title\n"
        "cat1.jpg,CC BY 4.0,Ada Photographer,https://example.org/cat1,A tabby\n")
    (tmp_path / A / "deeper" / "attribution.json").write_text(
        '{"cat3.jpg": {"license": "cc0", "creator": "Bo", "license_url": "https://creativecommons.org/publicdomain/zero/1.0/"}}')
    rows = {r["url"].rsplit("/", 1)[1]: r for r in
            LocalDirSource(tmp_path, license="cc-by-sa-4.0", creator="Our lab").search(syn(A), None, 10)}
    assert sorted(rows) == ["cat1.jpg", "cat2.jpg", "cat3.jpg"]  # sidecars are not images
    assert (rows["cat1.jpg"]["license"], rows["cat1.jpg"]["creator"]) == ("cc-by-4.0", "Ada Photographer")
    assert rows["cat1.jpg"]["page_url"] == "https://example.org/cat1" and rows["cat1.jpg"]["title"] == "A tabby"
    assert (rows["cat2.jpg"]["license"], rows["cat2.jpg"]["creator"]) == ("cc-by-sa-4.0", "Our lab")  # the default
    assert rows["cat3.jpg"]["license"] == "cc0"
    assert rows["cat3.jpg"]["creator"] == "Bo"


@pytest.mark.parametrize("name, text, complaint", [
    ("attribution.csv", "license,creator\ncc0,x\n", "including 'file'"),
    ("attribution.csv", "file,licence\na.jpg,cc0\n", "unknown field(s) ['licence']"),
    ("attribution.csv", "file,license\n../../etc/passwd,cc0\n", "must be a file name in this folder"),
    ("attribution.csv", "file,license\na.jpg,cc0\na.jpg,cc-by\n", "described twice"),
    ("attribution.json", "[{\"file\": \"a.jpg\"", "not valid JSON"),
    ("attribution.json", "42", "expected a list"),
])
def test_a_bad_sidecar_is_a_clear_error_naming_the_line(tmp_path, name, text, complaint):
    (tmp_path / A).mkdir()
    (tmp_path / A / "a.jpg").write_bytes(b"x")
    (tmp_path / A / name).write_text(text)
    with pytest.raises(SourceError, match=re.escape(complaint)):
        list(LocalDirSource(tmp_path).search(syn(A), None, 10))


@pytest.mark.slow
def test_s3_prefix_source_and_ingest_read_s3_urls(s3_bucket, tmp_path, moto_server):
    import io

    from PIL import Image

    from pipeline.config import load_settings
    from pipeline.ingest.stage import run_ingest
    from pipeline.sources.collect import run_collect

    client, bucket = s3_bucket
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "green").save(buf, "JPEG")
    for i in range(3):
        client.put_object(Bucket=bucket, Key=f"photos/{A}/{i}.jpg", Body=buf.getvalue() if i else b"junk")
    store = open_store(tmp_path / "store")
    store.write_table("synsets", pd.DataFrame({
        "wnid": [A], "name": ["a.n.01"], "lemmas": [["a"]], "gloss": ["g"], "depth": [1], "parent_wnids": [[]],
        "lexname": ["noun.animal"], "is_leaf": [True], "queries": [["a"]]}))
    settings = load_settings(env={}, overrides={"collect": {"sources": ["s3_prefix"], "s3_prefix": f"s3://{bucket}/photos"},
                                                "store": {"url": str(tmp_path / "store"), "s3_endpoint_url": moto_server}})
    assert run_collect(store, settings)["candidates"] == 3
    summary = run_ingest(store, settings)
    assert summary["accepted"] == 1 and summary["duplicates"] == 1 and summary["rejected"] == {"not_an_image": 1}


def test_collect_and_ingest_cli_on_a_local_folder(tmp_path, capsys):
    from PIL import Image

    for i in range(3):
        (tmp_path / "imgs" / A).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40 + i, 40), (i * 80, 0, 0)).save(tmp_path / "imgs" / A / f"{i}.png")
    store = open_store(tmp_path / "s")
    store.write_table("synsets", pd.DataFrame({
        "wnid": [A], "name": ["a.n.01"], "lemmas": [["a"]], "gloss": ["g"], "depth": [1], "parent_wnids": [[]],
        "lexname": ["noun.animal"], "is_leaf": [True], "queries": [["a"]]}))
    assert main(["--store", str(tmp_path / "s"), "collect", "--local-dir", str(tmp_path / "imgs"), "--no-progress"]) == 0
    assert "| candidates" in capsys.readouterr().out
    # The root is remembered from the collect run: ingest needs no --local-dir.
    assert main(["--store", str(tmp_path / "s"), "ingest", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| accepted" in out and "|                         3 |" not in out
    assert len(store.read_table("image_links")) == 3
    assert main(["--store", str(tmp_path / "s"), "collect", "--wnid", "n99999999"]) == 2
    assert "not in the synsets table" in capsys.readouterr().err


def test_collect_cli_without_synsets_table_says_what_to_run(tmp_path, capsys):
    assert main(["--store", str(tmp_path / "empty"), "collect", "--local-dir", str(tmp_path)]) == 2
    assert "synsetforge vocabulary" in capsys.readouterr().err


def _one_synset_store(tmp_path):
    store = open_store(tmp_path / "s")
    store.write_table("synsets", pd.DataFrame({
        "wnid": [A], "name": ["a.n.01"], "lemmas": [["a"]], "gloss": ["g"], "depth": [1], "parent_wnids": [[]],
        "lexname": ["noun.animal"], "is_leaf": [True], "queries": [["a"]]}))
    return store


def test_rejections_by_the_configuration_are_retried_once_it_allows_them(tmp_path):
    from PIL import Image

    from pipeline.config import load_settings
    from pipeline.ingest.stage import run_ingest
    from pipeline.sources.url_list import UrlListSource  # noqa: F401 - the source the list goes through

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        Image.new("RGB", (48, 40 + i), (0, i * 90, 0)).save(photos / f"{i}.png")
    (tmp_path / "urls.txt").write_text("".join(f"{(photos / f'{i}.png').as_uri()} {A}\n" for i in range(2)))
    store = _one_synset_store(tmp_path)
    listed = {"collect": {"sources": ["url_list"], "url_list": str(tmp_path / "urls.txt")}, "store": {"url": str(store.root)}}
    assert main(["--store", str(store.root), "collect", "--sources", "url_list", "--url-list", str(tmp_path / "urls.txt"),
                 "--no-progress"]) == 0
    summary = run_ingest(store, load_settings(env={}, overrides=listed))
    assert summary["outcomes"] == {"rejected:no_local_root": 2}
    # The user sets the root afterwards: the same store, nothing deleted, and the two files get in.
    allowed = {**listed, "collect": {**listed["collect"], "local_dir": str(photos)}}
    summary = run_ingest(store, load_settings(env={}, overrides=allowed))
    assert summary["outcomes"] == {"accepted": 2}
    images = store.read_table("images").to_pandas()
    assert sorted(images["status"]) == ["accepted", "accepted"] and images["first_url"].is_unique


def test_retry_rejected_fetches_a_fixed_file_again(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "imgs" / A
    folder.mkdir(parents=True)
    Image.new("RGB", (48, 48), (200, 0, 0)).save(folder / "good.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    store = _one_synset_store(tmp_path)
    s = str(store.root)
    assert main(["--store", s, "collect", "--local-dir", str(tmp_path / "imgs"), "--no-progress"]) == 0
    assert main(["--store", s, "ingest", "--no-progress", "--json"]) == 0
    capsys.readouterr()
    images = store.read_table("images").to_pandas().set_index("first_url")
    broken = (folder / "broken.jpg").resolve().as_uri()
    assert images.loc[broken, "status"] == "rejected"
    reason = images.loc[broken, "reject_reason"]
    Image.new("RGB", (48, 48), (0, 0, 200)).save(folder / "broken.jpg", "JPEG")  # the user replaces the file
    assert main(["--store", s, "ingest", "--no-progress", "--json"]) == 0  # settled: not fetched again
    assert '"fetched": 0' in capsys.readouterr().out
    assert main(["--store", s, "ingest", "--no-progress", "--json", "--retry-rejected", "http_404"]) == 0
    assert '"fetched": 0' in capsys.readouterr().out  # another reason: still not fetched
    assert main(["--store", s, "ingest", "--no-progress", "--json", "--retry-rejected", reason]) == 0
    assert '"fetched": 1' in capsys.readouterr().out
    images = store.read_table("images").to_pandas().set_index("first_url")
    assert images.loc[broken, "status"] == "accepted" and len(images) == 2
