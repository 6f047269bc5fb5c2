"""Table-level de-duplication: exact, within a synset, across synsets (near-duplicates count)."""

from __future__ import annotations

import pandas as pd
import pytest

from pipeline.ingest.dedup import dedup_within_synset, exact_duplicates, multi_synset_images, near_duplicate_groups
from pipeline.ingest.fingerprint import fingerprint
from tests.test_neardup import _edits, _photo


@pytest.fixture(scope="module")
def images() -> pd.DataFrame:
    imgs = {"a": _photo(1), "b": _photo(2), "c": _photo(3)}
    imgs["a_small"] = imgs["a"].resize((90, 90))
    imgs["b_crop"] = _edits(imgs["b"])["crop"]
    return pd.DataFrame([{"image_id": k, "first_url": f"http://x/{k}", **fingerprint(v)} for k, v in imgs.items()])


def test_exact_duplicates_canonical_is_order_independent() -> None:
    df = pd.DataFrame({"image_id": ["h1", "h1", "h2", None], "first_url": ["u3", "u1", "u2", "u4"]})
    out = exact_duplicates(df.iloc[::-1])
    assert out.to_dict("records") == [{"first_url": "u3", "image_id": "h1", "canonical_url": "u1"}]


def test_groups_and_within_synset(images: pd.DataFrame) -> None:
    g = dict(near_duplicate_groups(images).itertuples(index=False))
    assert g == {"a": "a", "a_small": "a", "b": "b", "b_crop": "b", "c": "c"}
    links = pd.DataFrame({"image_id": ["a", "a_small", "b", "b_crop", "c"], "wnid": ["n1", "n1", "n1", "n2", "n2"]})
    out = dedup_within_synset(links, images)
    assert out.to_dict("records") == [{"wnid": "n1", "image_id": "a_small", "duplicate_of": "a"}]


def test_multi_synset_flags_near_copies(images: pd.DataFrame) -> None:
    links = pd.DataFrame({"image_id": ["b", "b_crop", "c", "c"], "wnid": ["n1", "n2", "n2", "n3"]})
    exact_only = multi_synset_images(links)
    assert exact_only["image_id"].tolist() == ["c"]
    near = multi_synset_images(links, images)
    assert near.set_index("image_id")["wnids"].to_dict() == {"b": ["n1", "n2"], "b_crop": ["n1", "n2"],
                                                           "c": ["n2", "n3"]}


def test_bad_links_input_names_columns() -> None:
    with pytest.raises(ValueError, match="links: missing columns \\['wnid'\\]"):
        multi_synset_images(pd.DataFrame({"image_id": ["a"]}))


def test_precomputed_groups_give_the_same_answers(images: pd.DataFrame, monkeypatch) -> None:
    """The ingest stage searches once and hands the groups to both functions; they must not search again."""
    import pipeline.ingest.dedup as dedup

    links = pd.DataFrame({"image_id": ["a", "a_small", "b", "b_crop", "c"], "wnid": ["n1", "n1", "n1", "n2", "n2"]})
    groups = near_duplicate_groups(images)
    expected = (dedup_within_synset(links, images), multi_synset_images(links, images))

    def no_second_search(*_a, **_k):
        raise AssertionError("near_duplicate_groups called although groups were given")

    monkeypatch.setattr(dedup, "near_duplicate_groups", no_second_search)
    pd.testing.assert_frame_equal(dedup_within_synset(links, images, groups=groups), expected[0])
    pd.testing.assert_frame_equal(multi_synset_images(links, images, groups=groups), expected[1])
