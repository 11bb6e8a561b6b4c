"""Evaluation metrics against hand-computed cases and reference-implementation numbers."""

import math

import pytest

from comm_vlm.evaluation.metrics import (
    box_iou,
    caption_tokenize,
    cider_d,
    first_box,
    normalize_vqa_answer,
    parse_yes_no,
    pope_metrics,
    rec_accuracy,
    vqa_accuracy,
    vqa_score,
)


# ---------------------------------------------------------------------------------------------------------------
# REC
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "box_a, box_b, expected",
    [
        ((0, 0, 1, 1), (0, 0, 1, 1), 1.0),
        ((0, 0, 0.5, 1), (0, 0, 1, 1), 0.5),  # exactly 0.5
        ((0.25, 0, 0.75, 1), (0, 0, 1, 1), 0.5),
        ((0, 0, 0.5, 0.5), (0.5, 0, 1, 0.5), 0.0),  # touching edges share no area
        ((0, 0, 0.5, 0.5), (0.5, 0.5, 1, 1), 0.0),  # touching corners
        ((0, 0, 0.2, 0.2), (0.6, 0.6, 1, 1), 0.0),
        ((0, 0, 0.5, 0.5), (0.25, 0.25, 0.75, 0.75), 0.0625 / 0.4375),
        ((0.3, 0.3, 0.3, 0.3), (0.3, 0.3, 0.3, 0.3), 0.0),  # zero-area union
    ],
)
def test_box_iou(box_a, box_b, expected):
    assert box_iou(box_a, box_b) == pytest.approx(expected)
    assert box_iou(box_b, box_a) == pytest.approx(expected)


def test_box_iou_rejects_bad_boxes():
    with pytest.raises(ValueError, match="x2 < x1"):
        box_iou((0.5, 0, 0.1, 1), (0, 0, 1, 1))
    with pytest.raises(ValueError, match="4"):
        box_iou((0, 0, 1), (0, 0, 1, 1))


def test_rec_accuracy_threshold_is_inclusive_and_unparsable_is_wrong():
    target = (0.0, 0.0, 1.0, 1.0)
    predictions = [
        "[0.000,0.000,0.500,1.000]",  # IoU exactly 0.5: hit
        "It is at [0.000,0.000,0.499,1.000].",  # IoU 0.499: miss
        "[0.1,0.2,0.3]",  # malformed (3 numbers): unparsable
        "no box here",  # unparsable
        "[1.200,0.0,0.5,0.5] then [0.000,0.000,1.000,1.000]",  # first *well-formed* box is used: hit
        "see [1]: [0.5,0.0,1.0,1.0] [0.0,0.0,1.0,1.0]",  # citation skipped; first box has IoU 0.5: hit
    ]
    result = rec_accuracy(predictions, [target] * len(predictions))
    assert result["accuracy"] == pytest.approx(3 / 6)
    assert result["unparsable"] == pytest.approx(2 / 6)
    assert result["mean_iou"] == pytest.approx((0.5 + 0.499 + 0 + 0 + 1 + 0.5) / 6)
    assert first_box("[0.1,0.2,0.3,0.4];") == (0.1, 0.2, 0.3, 0.4)


def test_rec_accuracy_rejects_length_mismatch():
    with pytest.raises(ValueError, match="2 predictions for 1"):
        rec_accuracy(["a", "b"], [(0, 0, 1, 1)])


# ---------------------------------------------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [("Yes.", "yes"), ("  NO, it is not", "no"), ("yes", "yes"), ("nope", None), ("yesterday", None), ("", None)],
)
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) == expected


POPE_PREDICTIONS = ["Yes", "no.", "Yes, there is", "No", "I think so", "There is no dog"]
POPE_LABELS = ["yes", "no", "no", "yes", "yes", "no"]


def test_pope_confusion_matrix_official_fallback():
    # "I think so" -> yes and "There is no dog" -> no by the official POPE rule.
    m = pope_metrics(POPE_PREDICTIONS, POPE_LABELS)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 2, 1)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 6)
    assert m["unparsed"] == pytest.approx(2 / 6)


def test_pope_unknown_answers_counted_wrong():
    m = pope_metrics(POPE_PREDICTIONS, POPE_LABELS, unknown="wrong")
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (1, 1, 1, 2)
    assert m["accuracy"] == pytest.approx(2 / 6)
    assert m["precision"] == pytest.approx(1 / 2)
    assert m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    assert m["yes_ratio"] == pytest.approx(2 / 6)


def test_pope_rejects_bad_labels_and_policies():
    with pytest.raises(ValueError, match="neither 'yes' nor 'no'"):
        pope_metrics(["yes"], ["maybe"])
    with pytest.raises(ValueError, match="policy"):
        pope_metrics(["yes"], ["yes"], unknown="ignore")


# ---------------------------------------------------------------------------------------------------------------
# VQA
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Two", "2"),
        ("a dog", "dog"),
        ("dont", "don't"),
        ("yes.", "yes"),
        ("The Cat!", "cat"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("1,000", "1000"),  # digit-comma-digit: punctuation deleted
        ("hello, world", "hello world"),
        ("black/white", "black white"),
        ("ten dogs", "10 dogs"),
        ("none", "0"),
        ("  an apple \n", "apple"),
        ("Im", "im"),  # the official map's capitalised keys never match (words are lowercased first)
        ("N/A", "n"),  # "a" is an article
    ],
)
def test_vqa_normalisation_official_examples(text, expected):
    assert normalize_vqa_answer(text) == expected


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_score_ten_answer_formula(matches, expected):
    # Mean over the 10 leave-one-out subsets of min(#matches / 3, 1): k matching answers give
    # (k * min((k-1)/3, 1) + (10-k) * min(k/3, 1)) / 10.
    references = ["2"] * matches + ["3"] * (10 - matches)
    assert vqa_score("two", references) == pytest.approx(expected)


def test_vqa_references_follow_the_official_processing():
    assert vqa_score("yes", ["yes."] * 10) == 0.0  # identical references are not normalised (official behaviour)
    assert vqa_score("yes", ["yes."] * 2 + ["no"] * 8) == pytest.approx(0.6)  # mixed ones lose the period
    assert vqa_score("Yes", ["yes"]) == 0.0  # a single reference leaves an empty leave-one-out subset
    result = vqa_accuracy(["2", "red", "blue"], [["2"] * 10, ["red"] * 10, ["green"] * 10])
    assert result["accuracy"] == pytest.approx(2 / 3) and result["exact_match"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="non-empty"):
        vqa_score("yes", [])


# ---------------------------------------------------------------------------------------------------------------
# CIDEr-D
# ---------------------------------------------------------------------------------------------------------------

CIDER_CANDIDATES = [
    "a red circle at the top left",
    "a large blue square",
    "two green triangles and a yellow circle",
    "the purple square on the right",
    "",
]
CIDER_REFERENCES = [
    ["a red circle in the top left", "the red circle", "a small red circle at the top left"],
    ["a large blue square", "the blue square in the center"],
    ["a green triangle, a green triangle and a yellow circle", "two green triangles and one yellow circle"],
    ["the orange square on the right", "an orange square"],
    ["a blue circle"],
]
# Produced with the reference implementation, pycocoevalcap 1.2 (PyPI wheel, `pycocoevalcap/cider/cider.py`, not a
# dependency of this project): `Cider().compute_score(gts, res)` with
# gts = {i: [caption_tokenize(r) for r in CIDER_REFERENCES[i]]} and res = {i: [caption_tokenize(CIDER_CANDIDATES[i])]}.
CIDER_REFERENCE_SCORE = 3.50913744165331
CIDER_REFERENCE_SCORES = [4.6901226192987195, 5.713457606799944, 4.3143370083367785, 2.8277699738311086, 0.0]


def test_cider_matches_pycocoevalcap_reference_numbers():
    result = cider_d(CIDER_CANDIDATES, CIDER_REFERENCES)
    assert result.score == pytest.approx(CIDER_REFERENCE_SCORE, rel=1e-12)
    assert result.scores == pytest.approx(CIDER_REFERENCE_SCORES, rel=1e-12)
    pre = cider_d(
        [caption_tokenize(c) for c in CIDER_CANDIDATES],
        [[caption_tokenize(r) for r in refs] for refs in CIDER_REFERENCES],
        tokenize=False,
    )
    assert pre.score == pytest.approx(CIDER_REFERENCE_SCORE, rel=1e-12)


def test_cider_properties():
    assert caption_tokenize("A red Circle, at the top-left.") == "a red circle at the top left"
    assert cider_d(["a red circle"], [["a red circle"]]).score == 0.0  # one image: every idf is log(1) = 0
    # the length penalty: same words, a longer candidate scores lower
    refs = [["a red circle"], ["a blue square"], ["a green triangle"]]
    short = cider_d(["a red circle", "a blue square", "a green triangle"], refs).score
    long = cider_d(["a red circle red circle", "a blue square blue square", "a green triangle green triangle"], refs)
    assert short > long.score > 0
    assert math.isclose(cider_d(["x", "y"], [["a b"], ["c d"]]).score, 0.0)
    with pytest.raises(ValueError, match="non-empty list"):
        cider_d(["a"], [[]])
