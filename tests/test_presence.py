"""DET presence: the question tree from WordNet and hand-set groups, one image's state, and the question policy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.presence import (
    NO,
    YES,
    Cooccurrence,
    ImageState,
    QuestionTree,
    QuestionTreeError,
    build_question_tree,
    next_question,
)

DET13 = ["n02084071", "n02121808", "n02374451", "n02958343", "n02834778", "n02691156", "n03001627", "n04379243",
         "n03614007", "n03793489", "n03782190", "n07753592", "n07739125"]


def toy_edges() -> pd.DataFrame:
    # r -> {a -> {c1, c2}, b -> {c3, m -> {c4, c5}}}, plus a chain node 'x' between a and c1 (a single branch)
    pairs = [("c1", "x"), ("x", "a"), ("c2", "a"), ("c3", "b"), ("c4", "m"), ("c5", "m"), ("m", "b"), ("a", "r"),
             ("b", "r")]
    return pd.DataFrame(pairs, columns=["child_wnid", "parent_wnid"])


def test_vocab_det_builds_the_question_tree_from_wordnet(tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.store import open_store

    (tmp_path / "det.txt").write_text("\n".join(DET13) + "\n")
    assert main(["--store", str(tmp_path / "s"), "vocab", "--wnid-file", str(tmp_path / "det.txt"), "--det",
                 "--no-multilingual"]) == 0
    assert "DET questions: 13 classes" in capsys.readouterr().out
    q = open_store(tmp_path / "s").read_table("det_questions").to_pandas().set_index("node_id")
    assert q["is_class"].sum() == 13 and set(q.index[q["is_class"]]) == set(DET13)
    tree = QuestionTree.from_table(q.reset_index())
    # dog and cat share a question ("domestic animal"), under "animal"; mouse and monitor sit under an electronic device
    assert tree.parent_of("n02084071") == tree.parent_of("n02121808")
    assert q.loc[tree.parent_of("n02084071"), "name"] == "domestic animal"
    assert q.loc[tree.parent_of(tree.parent_of("n02084071")), "name"] == "animal"
    assert tree.parent_of("n03793489") == tree.parent_of("n03782190")
    assert q.loc["n00015388", "question"] == "Is there any kind of animal in the image?"
    assert q.loc["n02691156", "question"] == "Is there an airplane in the image?"
    # every question node splits at least two ways, and no question covers more than half the classes
    kids = q["parent_id"].value_counts()
    assert all(kids.get(n, 0) >= 2 for n in q.index[~q["is_class"]])
    assert q.loc[~q["is_class"], "n_classes"].max() <= 13 / 2


def test_chains_and_all_covering_ancestors_ask_nothing():
    q = build_question_tree(["c1", "c2", "c3", "c4", "c5"], toy_edges(), max_share=0.5).set_index("node_id")
    assert "x" not in q.index  # a single-branch chain node
    assert "r" not in q.index  # covers every class
    assert "b" not in q.index  # b covers 3 of the 5 classes, more than max_share: dropped
    assert q.loc["c1", "parent_id"] == "a" and q.loc["c4", "parent_id"] == "m" and pd.isna(q.loc["m", "parent_id"])
    assert q.loc["m", "depth"] == 0 and q.loc["c4", "depth"] == 1
    wide = build_question_tree(["c1", "c2", "c3", "c4", "c5"], toy_edges(), max_share=0.9).set_index("node_id")
    assert wide.loc["m", "parent_id"] == "b" and wide.loc["c4", "depth"] == 2


def test_hand_set_groups_move_their_members_and_bad_groups_are_named():
    groups = [{"id": "office", "name": "office equipment", "members": ["c2", "c3"],
               "question": "Is there anything you would find on a desk?"}]
    q = build_question_tree(["c1", "c2", "c3", "c4", "c5"], toy_edges(), groups=groups, max_share=0.9)
    q = q.set_index("node_id")
    assert q.loc["c2", "parent_id"] == "group:office" and q.loc["c3", "parent_id"] == "group:office"
    assert q.loc["group:office", "question"] == "Is there anything you would find on a desk?"
    assert q.loc["group:office", "n_classes"] == 2
    with pytest.raises(QuestionTreeError, match="member 'nope'"):
        build_question_tree(["c1", "c2"], toy_edges(), groups=[{"id": "g", "members": ["nope"]}])
    with pytest.raises(QuestionTreeError, match="cycle"):
        build_question_tree(["c1", "c2"], toy_edges(), groups=[{"id": "g", "members": ["h"], "parent": "h"},
                                                               {"id": "h", "members": ["c1"], "parent": "g"}])
    with pytest.raises(QuestionTreeError, match="ancestors of each other"):
        build_question_tree(["c1", "a"], toy_edges())


def test_a_yes_answers_the_ancestors_and_a_no_clears_the_subtree():
    tree = QuestionTree.from_table(build_question_tree(["c1", "c2", "c3", "c4", "c5"], toy_edges(), max_share=0.9))
    s = ImageState(tree)
    s.answer(tree.index["c4"], True)
    assert s.known[tree.index["m"]] == YES and s.known[tree.index["b"]] == YES
    s.answer(tree.index["a"], False)
    assert s.known[tree.index["c1"]] == NO and s.known[tree.index["c2"]] == NO
    assert not s.done()
    s.answer_group(tree.index["m"], [tree.index["c4"]])
    s.answer(tree.index["c3"], False)
    assert s.done() and s.known_classes() == {"c1": False, "c2": False, "c3": False, "c4": True, "c5": False}


def test_policy_clears_an_empty_image_with_the_top_questions_and_follows_co_occurrence():
    tree = QuestionTree.from_table(build_question_tree(["c1", "c2", "c3", "c4", "c5"], toy_edges(), max_share=0.9))
    model = Cooccurrence(tree, prior_rate=0.02)
    asked = []
    s = ImageState(tree)
    while (n := next_question(s, model)) is not None:
        asked.append(tree.ids[n])
        s.answer(n, False)
    assert sorted(asked) == sorted(tree.ids[i] for i in np.flatnonzero(tree.parent < 0))
    # c4 and c5 always appear together in the annotated images: once c4 is known, c5 is asked before the rest
    for _ in range(50):
        model.add([tree.index["c4"], tree.index["c5"]])
    for _ in range(50):
        model.add([])
    s = ImageState(tree)
    s.answer(tree.index["c4"], True)
    p = model.p_present(s)
    assert p[tree.index["c5"]] > 0.9 and p[tree.index["c1"]] < 0.1
