"""Search API adapters against a loopback server answering in each API's documented format: pagination, 429 with
Retry-After, 5xx, timeouts and malformed JSON. No test touches the internet."""

from __future__ import annotations

import pandas as pd
import pytest
from loopback_http import json_response, start_loopback

from pipeline.config import load_settings
from pipeline.sources.base import ApiClient, SourceError
from pipeline.sources.collect import build_sources, collect_candidates
from pipeline.sources.flickr import FlickrSource
from pipeline.sources.openverse import OpenverseSource
from pipeline.sources.wikimedia import WikimediaSource

SYN = {"wnid": "n02084071", "lemmas": ["dog"], "queries": ["dog"]}


@pytest.fixture
def lb():
    server = start_loopback()
    yield server
    server.stop()


def client(sleeps=None, **kw):
    sleeps = [] if sleeps is None else sleeps
    kw.setdefault("timeout_s", 2.0)
    kw.setdefault("max_retries", 3)
    return ApiClient("test", sleep=sleeps.append, backoff_s=0.01, **kw)


# --- Openverse ----------------------------------------------------------------------------------------------------

def openverse_page(page: int, page_count: int, per: int) -> dict:
    return {
        "result_count": page_count * per, "page_count": page_count, "page_size": per, "page": page,
        "results": [{
            "id": f"id-{page}-{i}", "title": f"Dog {page}.{i}", "url": f"https://img.example/{page}/{i}.jpg",
            "foreign_landing_url": f"https://www.flickr.com/photos/x/{page}{i}", "creator": "Ann",
            "license": "by-sa", "license_version": "2.0", "license_url": "https://creativecommons.org/licenses/by-sa/2.0/",
            "provider": "flickr", "source": "flickr", "filetype": "jpg",
        } for i in range(per)],
    }


def test_openverse_paginates_only_as_far_as_the_budget(lb):
    lb.handler = lambda req, h: json_response(openverse_page(int(req.query["page"]), 10, int(req.query["page_size"])))
    src = OpenverseSource(client(), lb.url, page_size=20, allowed_licenses=["cc-by-sa", "cc0"])
    got = list(src.search(SYN, "dog", 45))
    assert len(got) == 45
    assert [r.query["page"] for r in lb.requests] == ["1", "2", "3"]  # page 3 is the last one needed
    assert lb.requests[0].path == "/v1/images/" and lb.requests[0].query["q"] == "dog"
    assert lb.requests[0].query["license"] == "by-sa,cc0"
    first = got[0]
    assert first["url"] == "https://img.example/1/0.jpg" and first["license"] == "cc-by-sa-2.0"
    assert first["page_url"].startswith("https://www.flickr.com/") and first["creator"] == "Ann"


def test_openverse_stops_at_last_page(lb):
    lb.handler = lambda req, h: json_response(openverse_page(int(req.query["page"]), 2, 3))
    got = list(OpenverseSource(client(), lb.url).search(SYN, "dog", 100))
    assert len(got) == 6 and len(lb.requests) == 2


def test_429_retry_after_is_honoured_then_succeeds(lb):
    calls = {"n": 0}

    def handler(req, h):
        calls["n"] += 1
        if calls["n"] == 1:
            return json_response({"detail": "throttled"}, 429, {"Retry-After": "7"})
        return json_response(openverse_page(1, 1, 2))

    lb.handler = handler
    sleeps: list[float] = []
    got = list(OpenverseSource(client(sleeps), lb.url).search(SYN, "dog", 10))
    assert len(got) == 2 and sleeps == [7.0]


def test_429_with_a_huge_retry_after_gives_up_with_a_clear_error(lb):
    lb.handler = lambda req, h: json_response({}, 429, {"Retry-After": "86400"})
    with pytest.raises(SourceError, match="Retry-After 86400s exceeds"):
        list(OpenverseSource(client(max_retry_after_s=60), lb.url).search(SYN, "dog", 10))
    assert len(lb.requests) == 1


def test_5xx_is_retried_with_backoff_then_fails(lb):
    lb.handler = lambda req, h: (503, {}, b"busy")
    sleeps: list[float] = []
    with pytest.raises(SourceError, match="after 4 attempts: HTTP 503"):
        list(OpenverseSource(client(sleeps), lb.url).search(SYN, "dog", 10))
    assert len(lb.requests) == 4 and sleeps == sorted(sleeps) and len(sleeps) == 3


def test_timeout_is_retried_and_reported(lb):
    import time

    def slow(req, h):
        time.sleep(1.0)
        return json_response(openverse_page(1, 1, 1))

    lb.handler = slow
    with pytest.raises(SourceError, match="timed out"):
        list(OpenverseSource(client(timeout_s=0.2, max_retries=1), lb.url).search(SYN, "dog", 10))
    assert len(lb.requests) == 2


def test_malformed_json_is_a_source_error_not_a_crash(lb):
    lb.handler = lambda req, h: (200, {"Content-Type": "application/json"}, b'{"results": [')
    with pytest.raises(SourceError, match="malformed JSON"):
        list(OpenverseSource(client(), lb.url).search(SYN, "dog", 10))


def test_a_4xx_is_not_retried(lb):
    lb.handler = lambda req, h: json_response({"detail": "bad page_size"}, 400)
    with pytest.raises(SourceError, match="HTTP 400"):
        list(OpenverseSource(client(), lb.url).search(SYN, "dog", 10))
    assert len(lb.requests) == 1


# --- Wikimedia Commons ----------------------------------------------------------------------------------------------

def commons_page(offset: int, n: int, total: int) -> dict:
    pages = []
    for i in range(offset, min(offset + n, total)):
        pages.append({
            "pageid": 1000 + i, "ns": 6, "title": f"File:Dog {i}.jpg", "index": i + 1,
            "imageinfo": [{
                "url": f"https://upload.wikimedia.org/wikipedia/commons/a/ab/Dog_{i}.jpg",
                "descriptionurl": f"https://commons.wikimedia.org/wiki/File:Dog_{i}.jpg", "mime": "image/jpeg",
                "extmetadata": {
                    "LicenseShortName": {"value": "CC BY-SA 4.0", "source": "commons-desc-page"},
                    "LicenseUrl": {"value": "https://creativecommons.org/licenses/by-sa/4.0", "source": "x"},
                    "Artist": {"value": '<a href="//commons.wikimedia.org/wiki/User:Bob">Bob &amp; Co</a>'},
                    "ObjectName": {"value": f"Dog {i}"},
                },
            }],
        })
    pages.append({"pageid": 1, "ns": 6, "title": "File:Bark.ogg", "index": 999,
                  "imageinfo": [{"url": "https://upload.wikimedia.org/bark.ogg", "mime": "application/ogg"}]})
    doc = {"batchcomplete": "", "query": {"pages": pages}}
    if offset + n < total:
        doc["continue"] = {"gsroffset": offset + n, "continue": "gsroffset||"}
    return doc


def test_wikimedia_follows_continue_and_reads_extmetadata(lb):
    lb.handler = lambda req, h: json_response(commons_page(int(req.query.get("gsroffset", 0)), 4, 10))
    got = list(WikimediaSource(client(), lb.url + "/w/api.php", page_size=4).search(SYN, "dog", 100))
    assert len(got) == 10  # the .ogg file is skipped
    assert [r.query.get("gsroffset") for r in lb.requests] == [None, "4", "8"]
    assert lb.requests[1].query["continue"] == "gsroffset||" and lb.requests[0].query["generator"] == "search"
    assert got[0]["creator"] == "Bob & Co" and got[0]["license"] == "cc-by-sa-4.0" and got[0]["title"] == "Dog 0"


def test_wikimedia_api_error_object(lb):
    lb.handler = lambda req, h: json_response({"error": {"code": "maxlag", "info": "Waiting for db"}})
    with pytest.raises(SourceError, match="maxlag"):
        list(WikimediaSource(client(), lb.url).search(SYN, "dog", 5))


# --- Flickr -----------------------------------------------------------------------------------------------------------

def flickr_page(page: int, pages: int, per: int) -> dict:
    photos = [{"id": f"{page}{i}", "owner": "12@N01", "secret": "abc", "server": "65535", "farm": 66,
               "title": f"dog {i}", "ispublic": 1, "license": "4" if i % 2 else "0", "ownername": "Cy",
               **({"url_l": f"https://live.staticflickr.com/65535/{page}{i}_abc_b.jpg"} if i else {})}
              for i in range(per)]
    return {"photos": {"page": page, "pages": pages, "perpage": per, "total": pages * per, "photo": photos}, "stat": "ok"}


def test_flickr_pages_maps_licenses_and_builds_urls(lb):
    lb.handler = lambda req, h: json_response(flickr_page(int(req.query["page"]), 3, 4))
    src = FlickrSource(client(), lb.url + "/services/rest/", "KEY123", page_size=4)
    got = list(src.search(SYN, "dog", 100))
    assert len(got) == 12 and len(lb.requests) == 3
    assert lb.requests[0].query["method"] == "flickr.photos.search" and lb.requests[0].query["api_key"] == "KEY123"
    assert got[0]["url"] == "https://live.staticflickr.com/65535/10_abc_b.jpg"  # built from server/id/secret
    assert got[0]["license"] == "all-rights-reserved" and got[1]["license"] == "cc-by-2.0"
    assert got[1]["page_url"] == "https://www.flickr.com/photos/12@N01/11"


def test_flickr_license_filter_is_sent_and_applied(lb):
    lb.handler = lambda req, h: json_response(flickr_page(1, 1, 4))
    settings = load_settings(env={}, overrides={"collect": {"flickr_url": lb.url, "allowed_licenses": ["cc-by", "cc0"],
                                                             "max_retries": 0}})
    srcs = build_sources(settings, ["flickr"], flickr_api_key="K")
    df, errors = collect_candidates(pd.DataFrame([SYN]), srcs, budget=10, allowed_licenses=["cc-by", "cc0"])
    assert lb.requests[0].query["license"] == "4,9,11"
    assert not errors and set(df["license"]) == {"cc-by-2.0"}  # the server ignored the filter; we did not


def test_flickr_fail_stat_and_missing_key(lb):
    lb.handler = lambda req, h: json_response({"stat": "fail", "code": 100, "message": "Invalid API Key"})
    with pytest.raises(SourceError, match="Invalid API Key"):
        list(FlickrSource(client(), lb.url, "SECRET-KEY").search(SYN, "dog", 5))
    with pytest.raises(SourceError, match="SYNSETFORGE__COLLECT__FLICKR_API_KEY"):
        FlickrSource(client(), lb.url, None)


def test_flickr_key_comes_from_env_and_never_prints():
    settings = load_settings(env={"SYNSETFORGE__COLLECT__FLICKR_API_KEY": "s3cr3t"})
    assert "s3cr3t" not in repr(settings)
    assert build_sources(settings, ["flickr"])[0]._key == "s3cr3t"


# --- collect across sources -------------------------------------------------------------------------------------------

def test_collect_keeps_going_when_one_source_is_broken(lb):
    def handler(req, h):
        if req.path.startswith("/v1/images"):
            return 200, {}, b"<html>oops</html>"
        return json_response(commons_page(0, 5, 5))

    lb.handler = handler
    settings = load_settings(env={}, overrides={"collect": {"openverse_url": lb.url, "wikimedia_url": lb.url + "/w/api.php",
                                                             "max_retries": 0}})
    df, errors = collect_candidates(pd.DataFrame([SYN]), build_sources(settings, ["openverse", "wikimedia"]), budget=50)
    assert len(df) == 5 and set(df["source"]) == {"wikimedia"}
    assert len(errors) == 1 and errors[0]["source"] == "openverse" and "malformed JSON" in errors[0]["error"]
