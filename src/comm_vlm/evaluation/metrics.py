"""Evaluation metrics of the COMM / M3 benchmarks, as their reference implementations define them.

* **REC** (referring expression comprehension; RefCOCO/+/g as evaluated by Shikra, Chen et al. 2023, and COMM, Jiang
  et al. 2023): the first well-formed Shikra box `[x1,y1,x2,y2]` found in the generated text (see
  `comm_vlm.models.processing_comm.parse_boxes`) is compared with the target box; a sample is correct when IoU >= 0.5
  (inclusive). A text with no well-formed box counts as wrong (IoU 0), as in Shikra's evaluation, which scores a failed
  extraction as an empty box.
* **CIDEr** for REG and captioning: CIDEr-D exactly as the COCO caption evaluation computes it (Vedantam et al. 2015,
  `pycocoevalcap/cider/cider_scorer.py`): tf-idf vectors of 1- to 4-grams, document frequencies counted over the
  references of the evaluated set (corpus-level idf, so a single image always scores 0), clipped cosine similarity,
  a gaussian length penalty with sigma = 6, the mean over n, the mean over the references, times 10. The score is in
  the coco-caption unit (papers print it x100: COMM's 127.3 COCO CIDEr is 1.273 here). The reference pipeline's
  tokenizer is the Stanford PTB tokenizer (Java); we tokenise with `caption_tokenize` instead (lowercase, every
  character other than a-z, 0-9 and the apostrophe is a separator), which matches PTB-then-punctuation-removal on
  plain sentences but not on contractions ("don't" stays one token; PTB gives "do n't").
* **POPE** (Li et al. 2023): accuracy, precision, recall, F1 of the "yes" class, and the yes-ratio. An answer is
  normalised with `parse_yes_no` (strip, lowercase, starts with "yes" / "no"); anything else is resolved by the
  `unknown` policy: `"pope"` (default) applies the official POPE script's rule (first sentence, commas removed, "no" /
  "No" / "not" among its words -> no, otherwise yes), `"wrong"` counts it as an error that is never a "yes"
  prediction.
* **VQA accuracy** (Antol et al. 2015; the official `vqaEval.py` of GT-Vision-Lab/VQA): the prediction goes through
  `process_punctuation` and `process_digit_article` (contractions, number words -> digits, articles dropped), the
  references through `process_punctuation` when they are not all identical; the score is the mean, over the leave-one-
  out subsets of the references (10 choose 9 for VQAv2's 10 answers), of min(#matching answers in the subset / 3, 1).
* **MME** (Fu et al. 2023; the official `calculation.py`): an answer is yes / no when it is exactly that or its first
  4 characters hold it (`parse_mme_answer`); per category accuracy + accuracy+ (both questions of an image right),
  summed over the perception and the cognition categories.

All accuracy-type values are fractions in [0, 1]; the runners print them x100 as the papers do.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers.utils import logging

from ..models.image_utils import parse_boxes


logger = logging.get_logger(__name__)

REC_IOU_THRESHOLD = 0.5

# ----------------------------------------------------------------------------------------------------------------
# REC
# ----------------------------------------------------------------------------------------------------------------


def _as_box(box: Any, name: str) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(v) for v in box)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} {box!r} is not a box: give 4 numbers (x1, y1, x2, y2).") from err
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} {box!r} is not a box: give 4 finite numbers (x1, y1, x2, y2).")
    if values[2] < values[0] or values[3] < values[1]:
        raise ValueError(f"{name} {box!r} has x2 < x1 or y2 < y1: write the top-left corner first.")
    return values  # type: ignore[return-value]


def box_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """Intersection over union of two `(x1, y1, x2, y2)` boxes in the same units (continuous coordinates).

    Boxes that only touch share no area (IoU 0); when the union has zero area (two degenerate boxes) the IoU is 0.

    Args:
        box_a (`Sequence[float]`): first box, top-left then bottom-right corner.
        box_b (`Sequence[float]`): second box.

    Raises:
        ValueError: a box is not 4 finite numbers or has its corners swapped.
    """
    ax1, ay1, ax2, ay2 = _as_box(box_a, "box_a")
    bx1, by1, bx2, by2 = _as_box(box_b, "box_b")
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def first_box(text: str) -> tuple[float, float, float, float] | None:
    """The first well-formed Shikra box in `text` (malformed brackets are skipped), or None.

    Args:
        text (`str`): generated text.
    """
    boxes = parse_boxes(text).boxes
    return boxes[0] if boxes else None


def rec_ious(predictions: Sequence[str], target_boxes: Sequence[Sequence[float]]) -> list[float | None]:
    """Per sample, the IoU of the first box parsed from the prediction with the target (None: no box parsed).

    Args:
        predictions (`Sequence[str]`): generated texts.
        target_boxes (`Sequence[Sequence[float]]`): normalized `(x1, y1, x2, y2)` targets, one per prediction.

    Raises:
        ValueError: the lengths differ or a target is not a valid box.
    """
    if len(predictions) != len(target_boxes):
        raise ValueError(f"Got {len(predictions)} predictions for {len(target_boxes)} target boxes; give one each.")
    ious: list[float | None] = []
    for text, target in zip(predictions, target_boxes):
        box = first_box(text)
        ious.append(None if box is None else box_iou(box, target))
    return ious


def rec_accuracy(
    predictions: Sequence[str], target_boxes: Sequence[Sequence[float]], threshold: float = REC_IOU_THRESHOLD
) -> dict[str, float]:
    """REC accuracy: the fraction of samples whose first parsed box has IoU >= `threshold` with the target.

    Args:
        predictions (`Sequence[str]`): generated texts.
        target_boxes (`Sequence[Sequence[float]]`): normalized target boxes, one per prediction.
        threshold (`float`, defaults to 0.5): IoU needed for a hit (inclusive).

    Returns:
        `dict`: `accuracy`, `mean_iou` (unparsable samples count as 0), `unparsable` (fraction with no box),
        `num_samples`.
    """
    ious = rec_ious(predictions, target_boxes)
    num = len(ious)
    if num == 0:
        raise ValueError("rec_accuracy got no samples; pass at least one prediction.")
    hits = sum(1 for iou in ious if iou is not None and iou >= threshold)
    return {
        "accuracy": hits / num,
        "mean_iou": sum(iou or 0.0 for iou in ious) / num,
        "unparsable": sum(iou is None for iou in ious) / num,
        "num_samples": num,
    }


# ----------------------------------------------------------------------------------------------------------------
# CIDEr-D
# ----------------------------------------------------------------------------------------------------------------

_NON_WORD = re.compile(r"[^a-z0-9']+")


def caption_tokenize(text: str) -> str:
    """Lowercases and splits on everything but letters, digits and apostrophes; returns space-joined tokens.

    Args:
        text (`str`): a caption.
    """
    return " ".join(_NON_WORD.split(text.lower())).strip()


def _ngram_counts(sentence: str, n: int) -> dict[tuple[str, ...], int]:
    words = sentence.split()
    counts: dict[tuple[str, ...], int] = defaultdict(int)
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


@dataclass
class CiderResult:
    """Corpus CIDEr-D (`score`, the mean of `scores`) and the per-sample scores, in coco-caption units.

    Args:
        score (`float`): mean over samples.
        scores (`list[float]`): one score per prediction.
    """

    score: float
    scores: list[float] = field(default_factory=list)


def cider_d(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    n: int = 4,
    sigma: float = 6.0,
    tokenize: bool = True,
) -> CiderResult:
    """CIDEr-D as `pycocoevalcap.cider.Cider` computes it (see the module docstring), on raw or tokenised text.

    Reproduces the reference arithmetic, including its length term: the length penalty compares the numbers of
    bigrams of the candidate and the reference (the reference counts n-grams at index 1), i.e. their word counts
    minus one.

    Args:
        predictions (`Sequence[str]`): one candidate per sample.
        references (`Sequence[Sequence[str]]`): per sample, one or more reference sentences.
        n (`int`, defaults to 4): largest n-gram order.
        sigma (`float`, defaults to 6.0): standard deviation of the gaussian length penalty.
        tokenize (`bool`, defaults to `True`): apply `caption_tokenize` to every sentence first; `False` means the
            texts are already space-separated tokens (as the reference code expects).

    Raises:
        ValueError: the lengths differ, no samples, or a sample has no reference.
    """
    if len(predictions) != len(references):
        raise ValueError(f"Got {len(predictions)} predictions for {len(references)} reference lists; give one each.")
    if not predictions:
        raise ValueError("cider_d got no samples; pass at least one prediction.")
    prep = caption_tokenize if tokenize else (lambda s: s)
    tests = [_ngram_counts(prep(p), n) for p in predictions]
    refs = []
    for i, group in enumerate(references):
        if isinstance(group, str) or not group:
            raise ValueError(f"Sample {i}: references must be a non-empty list of strings, got {group!r}.")
        refs.append([_ngram_counts(prep(r), n) for r in group])
    doc_freq: dict[tuple[str, ...], float] = defaultdict(float)
    for group in refs:
        for ngram in {g for counts in group for g in counts}:
            doc_freq[ngram] += 1
    log_num_docs = math.log(float(len(refs)))

    def to_vec(counts):
        vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for ngram, tf in counts.items():
            order = len(ngram) - 1
            weight = float(tf) * (log_num_docs - math.log(max(1.0, doc_freq.get(ngram, 0.0))))
            vec[order][ngram] = weight
            norm[order] += weight**2
            if order == 1:
                length += tf
        return vec, [math.sqrt(v) for v in norm], length

    def similarity(hyp, ref) -> list[float]:
        (vec_h, norm_h, len_h), (vec_r, norm_r, len_r) = hyp, ref
        penalty = math.exp(-(float(len_h - len_r) ** 2) / (2 * sigma**2))
        out = []
        for k in range(n):
            val = sum(min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec_h[k].items())
            if norm_h[k] != 0 and norm_r[k] != 0:
                val /= norm_h[k] * norm_r[k]
            out.append(val * penalty)
        return out

    scores = []
    for test, group in zip(tests, refs):
        hyp = to_vec(test)
        total = [0.0] * n
        for ref in group:
            total = [a + b for a, b in zip(total, similarity(hyp, to_vec(ref)))]
        scores.append(sum(total) / n / len(group) * 10.0)
    return CiderResult(score=sum(scores) / len(scores), scores=scores)


# ----------------------------------------------------------------------------------------------------------------
# POPE
# ----------------------------------------------------------------------------------------------------------------


_YES_NO = re.compile(r"(yes|no)\b")


def parse_yes_no(text: str) -> str | None:
    """`"yes"` / `"no"` when the stripped, lowercased answer starts with that word, else None.

    Args:
        text (`str`): generated answer.
    """
    match = _YES_NO.match(text.strip().lower())
    return match.group(1) if match else None


def pope_official_answer(text: str) -> str:
    """The official POPE script's rule: first sentence, commas removed, "No"/"no"/"not" among the words -> "no".

    Args:
        text (`str`): generated answer.
    """
    sentence = text.split(".")[0] if "." in text else text
    words = sentence.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


_POPE_UNKNOWN = {"pope": pope_official_answer, "wrong": lambda text: None}


def resolve_yes_no(text: str, unknown: str = "pope") -> str | None:
    """The POPE answer of a generated text: `parse_yes_no`, then the `unknown` policy (None: counts as wrong).

    Args:
        text (`str`): generated answer.
        unknown (`str`, defaults to `"pope"`): `"pope"` (official fallback) or `"wrong"`.
    """
    if unknown not in _POPE_UNKNOWN:
        raise ValueError(f"Unknown `unknown` policy {unknown!r}; use one of {sorted(_POPE_UNKNOWN)}.")
    answer = parse_yes_no(text)
    return _POPE_UNKNOWN[unknown](text) if answer is None else answer


def pope_metrics(predictions: Sequence[str], labels: Sequence[str], unknown: str = "pope") -> dict[str, float]:
    """POPE accuracy, precision, recall, F1 (positive class "yes") and yes-ratio.

    Args:
        predictions (`Sequence[str]`): generated answers.
        labels (`Sequence[str]`): `"yes"` / `"no"` ground truth, one per prediction.
        unknown (`str`, defaults to `"pope"`): how an answer that does not start with yes/no counts: `"pope"` (the
            official script's fallback, see `pope_official_answer`) or `"wrong"` (an error, not a "yes").

    Returns:
        `dict`: `accuracy`, `precision`, `recall`, `f1`, `yes_ratio` (fraction of "yes" predictions), `tp`, `fp`,
        `tn`, `fn`, `unparsed` (fraction not starting with yes/no), `num_samples`.
    """
    if unknown not in _POPE_UNKNOWN:
        raise ValueError(f"Unknown `unknown` policy {unknown!r}; use one of {sorted(_POPE_UNKNOWN)}.")
    if len(predictions) != len(labels):
        raise ValueError(f"Got {len(predictions)} predictions for {len(labels)} labels; give one label each.")
    if not predictions:
        raise ValueError("pope_metrics got no samples; pass at least one prediction.")
    tp = fp = tn = fn = unparsed = 0
    for text, label in zip(predictions, labels):
        label = str(label).strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"POPE label {label!r} is neither 'yes' nor 'no'; fix the dataset's `answer` column.")
        unparsed += parse_yes_no(text) is None
        answer = resolve_yes_no(text, unknown)
        if answer == "yes":
            tp, fp = (tp + 1, fp) if label == "yes" else (tp, fp + 1)
        elif answer == "no":
            tn, fn = (tn + 1, fn) if label == "no" else (tn, fn + 1)
        elif label == "yes":
            fn += 1  # an unusable answer misses a positive; on a negative it is simply wrong
    num = len(predictions)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / num,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": (tp + fp) / num,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "unparsed": unparsed / num,
        "num_samples": num,
    }


# ----------------------------------------------------------------------------------------------------------------
# VQA accuracy (official vqaEval.py)
# ----------------------------------------------------------------------------------------------------------------

# Copied from the official evaluation (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py), including
# its oddities: the capitalised keys ("Im", "Ive", "Id've", "I'dve") never match because words are lowercased first,
# and "somebody'd" maps to "somebodyd".
VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
VQA_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
VQA_ARTICLES = ("a", "an", "the")
VQA_PUNCTUATION = (
    ";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip
# The official regexes, verbatim: "(?!<=\d)" is a negative *lookahead* for the text "<=digit" (a typo for a
# lookbehind), kept so that results match the official numbers.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
# The official code calls `periodStrip.sub("", text, re.UNICODE)`, which passes re.UNICODE (32) as `count`.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """The official `processPunctuation`: each listed mark is deleted when it touches a space (or the text has a
    digit-comma-digit) and replaced by a space otherwise; periods not followed by a digit are deleted.

    Args:
        text (`str`): an answer.
    """
    out = text
    comma_in_number = _COMMA_STRIP.search(text) is not None
    for mark in VQA_PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or comma_in_number:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """The official `processDigitArticle`: lowercase, number words -> digits, articles dropped, contractions fixed.

    Args:
        text (`str`): an answer (after `process_punctuation`).
    """
    words = [VQA_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in VQA_ARTICLES]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """A prediction as the official evaluation normalises it (newlines/tabs to spaces, strip, punctuation, digits,
    articles, contractions): `"Two"` -> `"2"`, `"a dog"` -> `"dog"`, `"dont"` -> `"don't"`, `"yes."` -> `"yes"`.

    Args:
        text (`str`): a generated answer.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_score(prediction: str, references: Sequence[str]) -> float:
    """Official VQA accuracy of one answer: mean over leave-one-out subsets of min(#matches / 3, 1).

    With VQAv2's 10 human answers that is the average over the 10 subsets of 9 answers. References are compared
    after `process_punctuation` only (as the official code does; VQA annotations are distributed already normalised),
    and only when they are not all identical.

    Args:
        prediction (`str`): the generated answer (normalised here with `normalize_vqa_answer`).
        references (`Sequence[str]`): the human answers (10 for VQAv2/OK-VQA; with one answer the score is always
            0, since the leave-one-out subset is empty: repeat it 10 times for a synthetic single-answer dataset).

    Raises:
        ValueError: no references.
    """
    if isinstance(references, str) or not references:
        raise ValueError(f"vqa_score needs a non-empty list of reference answers, got {references!r}.")
    answer = normalize_vqa_answer(prediction)
    refs = [r.replace("\n", " ").replace("\t", " ").strip() for r in references]
    if len(set(refs)) > 1:
        refs = [process_punctuation(r) for r in refs]
    accs = []
    for i in range(len(refs)):
        matches = sum(1 for j, ref in enumerate(refs) if j != i and ref == answer)
        accs.append(min(1.0, matches / 3.0))
    return sum(accs) / len(accs)


def vqa_accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean official VQA accuracy.

    Args:
        predictions (`Sequence[str]`): generated answers.
        references (`Sequence[Sequence[str]]`): per sample, the human answers.

    Returns:
        `dict`: `accuracy`, `exact_match` (fraction with full credit), `num_samples`.
    """
    if len(predictions) != len(references):
        raise ValueError(f"Got {len(predictions)} predictions for {len(references)} reference lists; give one each.")
    if not predictions:
        raise ValueError("vqa_accuracy got no samples; pass at least one prediction.")
    if any(len(r) < 10 for r in references):
        logger.warning_once(
            "Some VQA samples have fewer than 10 reference answers: the official formula cannot give them full "
            "credit with fewer than 4 matching answers (a single answer always scores 0)."
        )
    scores = [vqa_score(p, r) for p, r in zip(predictions, references)]
    return {
        "accuracy": sum(scores) / len(scores),
        "exact_match": sum(s >= 1.0 for s in scores) / len(scores),
        "num_samples": len(scores),
    }


# ----------------------------------------------------------------------------------------------------------------
# MME (Fu et al. 2023; the official eval_tool/calculation.py)
# ----------------------------------------------------------------------------------------------------------------

MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def parse_mme_answer(text: str) -> str:
    """The official MME reading of an answer: `"yes"` / `"no"` when the lowercased, stripped answer is exactly that,
    else the first of "yes" / "no" found in its first 4 characters, else `"other"` (always wrong).

    Args:
        text (`str`): generated answer.
    """
    answer = text.strip().lower()
    if answer in ("yes", "no"):
        return answer
    head = answer[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def mme_scores(
    predictions: Sequence[str], labels: Sequence[str], categories: Sequence[str], image_ids: Sequence[str]
) -> dict[str, Any]:
    """MME scores as the official calculation gives them, as fractions (x100 = the published numbers).

    Per category: `accuracy` (questions answered right), `accuracy_plus` (images whose questions, two per image, are
    all right) and `score` = accuracy + accuracy_plus. `perception` sums the scores of the 10 perception categories,
    `cognition` those of the 4 cognition categories present (x100: the published 0-2000 and 0-800 scales).

    Args:
        predictions (`Sequence[str]`): generated answers.
        labels (`Sequence[str]`): `"Yes"` / `"No"` ground truth (any case).
        categories (`Sequence[str]`): each question's MME category (`MME_PERCEPTION` or `MME_COGNITION`).
        image_ids (`Sequence[str]`): each question's image (the pair key; lmms-lab/MME's `question_id`).

    Returns:
        `dict`: `perception`, `cognition`, `total`, `accuracy` (over all questions), `categories` (per category
        `accuracy`, `accuracy_plus`, `score`, `num_questions`, `num_images`), `incomplete_images` (images without
        exactly 2 questions, e.g. after a row limit), `num_samples`.

    Raises:
        ValueError: lengths differ, no samples, or a label is neither yes nor no.
    """
    if not len(predictions) == len(labels) == len(categories) == len(image_ids):
        raise ValueError("mme_scores needs one label, category and image id per prediction; the lengths differ.")
    if not predictions:
        raise ValueError("mme_scores got no samples; pass at least one prediction.")
    images: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    right = 0
    for text, label, category, image in zip(predictions, labels, categories, image_ids):
        label = str(label).strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"MME label {label!r} is neither 'yes' nor 'no'; fix the dataset's `answer` column.")
        images[category][image].append(parse_mme_answer(text) == label)
        right += images[category][image][-1]
    unknown = sorted(set(images) - set(MME_PERCEPTION) - set(MME_COGNITION))
    if unknown:
        logger.warning(f"MME categories {unknown} are neither perception nor cognition; left out of both sums.")
    per_category, incomplete = {}, 0
    for category, by_image in images.items():
        answers = [c for results in by_image.values() for c in results]
        incomplete += sum(len(results) != 2 for results in by_image.values())
        accuracy = sum(answers) / len(answers)
        accuracy_plus = sum(all(results) for results in by_image.values()) / len(by_image)
        per_category[category] = {
            "accuracy": accuracy,
            "accuracy_plus": accuracy_plus,
            "score": accuracy + accuracy_plus,
            "num_questions": len(answers),
            "num_images": len(by_image),
        }
    if incomplete:
        logger.warning(f"{incomplete} MME images do not have exactly 2 questions; accuracy+ uses the ones given.")
    perception = sum(per_category[c]["score"] for c in MME_PERCEPTION if c in per_category)
    cognition = sum(per_category[c]["score"] for c in MME_COGNITION if c in per_category)
    return {
        "perception": perception,
        "cognition": cognition,
        "total": perception + cognition,
        "accuracy": right / len(predictions),
        "categories": dict(sorted(per_category.items())),
        "incomplete_images": incomplete,
        "num_samples": len(predictions),
    }


__all__ = [
    "MME_COGNITION",
    "MME_PERCEPTION",
    "REC_IOU_THRESHOLD",
    "CiderResult",
    "box_iou",
    "caption_tokenize",
    "cider_d",
    "first_box",
    "mme_scores",
    "normalize_vqa_answer",
    "parse_mme_answer",
    "parse_yes_no",
    "pope_metrics",
    "pope_official_answer",
    "process_digit_article",
    "process_punctuation",
    "rec_accuracy",
    "resolve_yes_no",
    "rec_ious",
    "vqa_accuracy",
    "vqa_score",
]
