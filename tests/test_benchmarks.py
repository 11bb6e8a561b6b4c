"""The published benchmarks read from their own files (`tests/fixtures/benchmarks/`, in the published schemas), and
their scores computed by hand from known predictions through the scoring path `evaluate` uses."""

import pytest
from benchmark_files import FIXTURES, make_layouts, write_hub_cache

from comm_vlm.evaluation import benchmarks as bm
from comm_vlm.evaluation.metrics import cider_d
from comm_vlm.evaluation.runners import _rows_by_task
from comm_vlm.evaluation.tasks import TASK_SPECS


SHORT = "\nAnswer the question using a single word or phrase."


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    return make_layouts(tmp_path_factory.mktemp("benchmarks"))


def score(dataset, predictions):
    rows = [dict(row) for row in dataset]
    return TASK_SPECS[rows[0]["task"]].score(predictions, rows)


def prompt_of(row):
    return row["messages"][0]["content"][1]["text"]


# ----------------------------------------------------------------------------------------------------------------
# POPE
# ----------------------------------------------------------------------------------------------------------------


def test_pope_official_files_settings_prompt_and_scores(layouts):
    files = [FIXTURES / "coco_pope_random.json", FIXTURES / "coco_pope_adversarial.json"]
    dataset = bm.load_benchmark("pope", files, images=layouts["images"])
    assert dataset["pope_setting"] == ["random"] * 4 + ["adversarial"] * 2 and set(dataset["split"]) == {"all"}
    assert prompt_of(dataset[0]) == "Is there a snowboard in the image?" + SHORT
    assert dataset[0]["images"][0]["path"] == str(layouts["images"] / "COCO_val2014_000000310196.jpg")
    # random: yes/no/yes/no; adversarial: yes/no. Answers that are not plain yes/no follow the official fallback.
    predictions = [
        "Yes, there is a snowboard.",  # starts with yes: tp
        "There is no dining table.",  # "no" among the first sentence's words: tn
        "I think so",  # no "no"/"not": yes -> tp
        "A giraffe is standing.",  # yes -> fp (3 of the 4 random answers are not plain yes/no)
        "no",  # fn
        "No.",  # tn
    ]
    result = score(dataset, predictions)
    random, adversarial = result.metrics["settings"]["random"], result.metrics["settings"]["adversarial"]
    assert (random["tp"], random["tn"], random["fp"], random["fn"]) == (2, 1, 1, 0)
    assert random["accuracy"] == 0.75 and random["f1"] == pytest.approx(0.8) and random["yes_ratio"] == 0.75
    assert adversarial["accuracy"] == 0.5 and adversarial["f1"] == 0.0 and adversarial["yes_ratio"] == 0.0
    assert result.metrics["accuracy"] == pytest.approx(0.625)  # COMM's avg POPE: the mean over the settings
    assert result.metrics["f1"] == pytest.approx(0.4) and result.metrics["unparsed"] == pytest.approx(0.375)
    assert result.correct == [True, True, True, False, False, True]


def test_pope_split_selects_a_setting_and_file_names_state_theirs(layouts):
    both = [FIXTURES / "coco_pope_random.json", FIXTURES / "coco_pope_adversarial.json"]
    assert bm.load_benchmark("pope", both, images=layouts["images"], split="adversarial").num_rows == 2
    alone = bm.load_benchmark("pope", FIXTURES / "coco_pope_random.json", images=layouts["images"])
    assert set(alone["split"]) == {"random"}  # the file's name says its setting
    with pytest.raises(ValueError, match="is of split 'popular'"):
        bm.load_benchmark("pope", FIXTURES / "coco_pope_random.json", images=layouts["images"], split="popular")
    with pytest.raises(ValueError, match="pass the folder that holds them with --images"):
        bm.load_benchmark("pope", FIXTURES / "coco_pope_random.json")


def test_pope_lmms_lab_parquet_category_split_and_cached_dataset_id(layouts, tmp_path, monkeypatch):
    dataset = bm.load_benchmark("pope", layouts["pope"], split="adversarial")
    assert dataset["question"] == ["Is there a snowboard in the image?", "Is there a skis in the image?"]
    assert dataset["answer"] == ["yes", "no"] and dataset[0]["images"][0]["bytes"][:4] == b"\x89PNG"
    result = score(dataset, ["yes", "yes"])
    assert result.metrics["accuracy"] == 0.5 and result.metrics["yes_ratio"] == 1.0

    from huggingface_hub import constants

    parquet = next(layouts["pope"].rglob("*.parquet"))
    write_hub_cache(tmp_path / "hub", "lmms-lab/POPE", {"data/test-00000-of-00001.parquet": parquet})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cached = bm.load_benchmark("pope", "lmms-lab/POPE")
    assert sorted(set(cached["pope_setting"])) == ["adversarial", "popular", "random"] and cached.num_rows == 4
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        bm.load_benchmark("pope", "lmms-lab/NotDownloaded")


# ----------------------------------------------------------------------------------------------------------------
# RefCOCO: REC and REG
# ----------------------------------------------------------------------------------------------------------------


def test_refcoco_lmms_lab_parquet_boxes_splits_and_iou_at_exactly_half(layouts):
    dataset = bm.load_benchmark("refcoco", layouts["refcoco"])  # default split: val
    # bbox x, y, w, h = 32, 32, 128, 64 on a 256 x 128 image; one row per referring expression
    assert dataset["box"] == [[0.125, 0.25, 0.625, 0.75]] * 2 + [[0.0, 0.0, 0.25, 0.5]]
    assert dataset["question"] == ["man on the left", "left guy", "right cup"] and set(dataset["split"]) == {"val"}
    assert prompt_of(dataset[0]) == (
        "Please provide the bounding box coordinate of the region this sentence describes: man on the left."
    )
    predictions = [
        "[0.125,0.250,0.375,0.750]",  # half the target's area inside it: IoU exactly 0.5, a hit
        "It is at [0.125,0.250,0.374,0.750].",  # IoU 0.498: a miss
        "I cannot tell",  # no box: a miss
    ]
    result = score(dataset, predictions)
    assert result.per_sample[0] == 0.5 and result.per_sample[1] == pytest.approx(0.498)
    assert result.correct == [True, False, False] and result.metrics["accuracy"] == pytest.approx(1 / 3)
    assert result.metrics["unparsable"] == pytest.approx(1 / 3)
    assert bm.load_benchmark("refcoco", layouts["refcoco"], split="testA")["question"] == ["woman in red"]
    with pytest.raises(ValueError, match=r"no files of split 'testB' \(its files hold \['testA', 'val'\]\)"):
        bm.load_benchmark("refcoco", layouts["refcoco"], split="testB")
    with pytest.raises(ValueError, match="has the splits"):
        bm.load_benchmark("refcoco+", layouts["refcoco"], split="test")


def test_rec_rows_need_no_answer_column(layouts):
    dataset = bm.load_benchmark("refcoco", layouts["refcoco"]).remove_columns("answer")
    rows = _rows_by_task(dataset, None)["rec"]
    assert TASK_SPECS["rec"].score(["[0.125,0.250,0.625,0.750]"] * 3, rows).correct == [True, True, False]


def test_refcoco_shikra_jsonl_pixel_corners_and_split_from_the_name(layouts):
    path = FIXTURES / "REC_refcoco_unc_val.jsonl"
    dataset = bm.load_benchmark("refcoco", path, images=layouts["images"])
    # x1, y1, x2, y2 pixels over width / height (given, or read from the image: 200 x 100 for the second)
    assert dataset["box"] == [[0.125, 0.25, 0.625, 0.75], [0.25, 0.25, 0.75, 0.75]]
    assert set(dataset["split"]) == {"val"}
    predictions = ["[0.500,0.250,1.000,0.750]", "[0.250,0.250,0.750,0.750]"]  # IoU 1/7, then 1
    assert score(dataset, predictions).per_sample == pytest.approx([1 / 7, 1.0])
    with pytest.raises(ValueError, match="is of split 'testA'"):
        bm.load_benchmark("refcoco", path, images=layouts["images"], split="testA")


def test_refcocog_reg_groups_the_expressions_of_each_region(layouts):
    shikra = bm.load_benchmark("refcocog_reg", FIXTURES / "REC_refcocog_umd_val.jsonl", images=layouts["images"])
    parquet = bm.load_benchmark("refcocog_reg", layouts["refcocog"])
    expected = ["a man standing on the left side", "the man who stands at the left"]
    assert shikra["references"] == [expected, ["a grey square in the middle"]]
    assert parquet["references"] == [expected, ["a cup on the table"]]
    assert prompt_of(shikra[0]) == "Please provide a short description for this region: [0.125,0.250,0.625,0.750]."
    predictions = ["a man standing on the left", "a square"]
    result = score(shikra, predictions)
    reference = cider_d(predictions, shikra["references"])
    assert result.metrics["cider"] == pytest.approx(reference.score) and result.per_sample == reference.scores
    assert result.per_sample[0] > result.per_sample[1] and result.correct is None


# ----------------------------------------------------------------------------------------------------------------
# VQAv2, OK-VQA, TextVQA, GQA
# ----------------------------------------------------------------------------------------------------------------


def test_vqav2_official_pair_in_any_order_with_normalised_answers(layouts):
    files = [FIXTURES / "v2_mscoco_val2014_annotations.json", FIXTURES / "v2_OpenEnded_mscoco_val2014_questions.json"]
    dataset = bm.load_benchmark("vqav2", files, images=layouts["images"])
    assert set(dataset["split"]) == {"val2014"} and all(len(r) == 10 for r in dataset["references"])
    assert dataset[0]["images"][0]["path"].endswith("val2014/COCO_val2014_000000262148.jpg")
    assert prompt_of(dataset[0]) == "How many dogs are there?" + SHORT
    # "Two" -> "2" (10 of 10); "A frisbee." -> "frisbee", 2 of 10 humans: (2 x 1/3 + 8 x 2/3) / 10; "Yes." -> "yes"
    result = score(dataset, ["Two", "A frisbee.", "Yes."])
    assert result.per_sample == pytest.approx([1.0, 0.6, 1.0])
    assert result.metrics["accuracy"] == pytest.approx(2.6 / 3)
    assert result.metrics["per_question_type"] == pytest.approx({"number": 1.0, "other": 0.6, "yes/no": 1.0})
    with pytest.raises(ValueError, match="read two files"):
        bm.load_benchmark("vqav2", files[1], images=layouts["images"])


def test_okvqa_official_pair(layouts):
    files = [FIXTURES / "OpenEnded_mscoco_val2014_questions.json", FIXTURES / "mscoco_val2014_annotations.json"]
    dataset = bm.load_benchmark("okvqa", files, images=layouts["images"])
    assert dataset["answer"] == ["race", "surf"]  # no multiple_choice_answer: the most frequent answer
    # "Racing": 4 of 10 humans, every 9-subset has >= 3; "surfing": 1 of 10, 9 subsets with 1 -> 9 x 1/3 / 10
    assert score(dataset, ["Racing", "surfing"]).per_sample == pytest.approx([1.0, 0.3])


def test_textvqa_references_are_normalised_as_the_prediction(layouts):
    dataset = bm.load_benchmark("textvqa", FIXTURES / "TextVQA_0.5.1_val.json", images=layouts["images"])
    assert set(dataset["split"]) == {"val"} and dataset["answer"] == ["dakota", "copenhagen"]
    # "Dakota Digital": 3 of 10 -> (3 x 2/3 + 7 x 1) / 10; "Copenhagen." -> "copenhagen", 9 of 10
    assert score(dataset, ["Dakota Digital", "Copenhagen."]).per_sample == pytest.approx([0.9, 1.0])


def test_gqa_exact_match_per_structural_type(layouts):
    dataset = bm.load_benchmark("gqa", FIXTURES / "testdev_balanced_questions.json", images=layouts["images"])
    assert set(dataset["split"]) == {"testdev_balanced"} and dataset["question_type"] == ["verify", "query"]
    assert dataset[1]["images"][0]["path"].endswith("n161313.jpg")
    result = score(dataset, ["Yes.", "a cup"])  # trailing period and case forgiven; the article is not
    assert result.correct == [True, False]
    assert result.metrics["per_question_type"] == {"query": 0.0, "verify": 1.0}


# ----------------------------------------------------------------------------------------------------------------
# Captions, MME
# ----------------------------------------------------------------------------------------------------------------


def test_karpathy_splits_of_coco_and_flickr30k(layouts):
    coco = bm.load_benchmark("coco_caption", FIXTURES / "dataset_coco.json", images=layouts["images"])
    assert coco["references"][0] == [
        "A man with a red helmet on a small moped on a dirt road.",
        "Man riding a motor bike on a dirt road on the countryside.",
    ]
    assert coco.num_rows == 2 and coco[0]["images"][0]["path"].endswith("val2014/COCO_val2014_000000391895.jpg")
    assert prompt_of(coco[0]) == "Describe the image briefly."
    train = bm.load_benchmark("coco_caption", FIXTURES / "dataset_coco.json", images=layouts["images"], split="train")
    assert train["question_id"] == ["318556"]
    flickr = bm.load_benchmark("flickr30k", FIXTURES / "dataset_flickr30k.json", images=layouts["images"])
    assert flickr.num_rows == 1 and flickr[0]["images"][0]["path"].endswith("/1000092795.jpg")
    predictions = ["a man riding a moped on a dirt road", "a woman cutting a cake"]
    assert score(coco, predictions).metrics["cider"] == pytest.approx(cider_d(predictions, coco["references"]).score)


def test_mme_pairs_accuracy_plus_and_the_perception_cognition_sums(layouts):
    dataset = bm.load_benchmark("mme", layouts["mme"])
    assert prompt_of(dataset[0]) == "Is there a train in this image?" + SHORT  # its own yes/no request replaced
    assert dataset["answer"][:2] == ["yes", "no"] and dataset["image_id"][0] == "existence/000000006040.jpg"
    assert set(dataset["split"]) == {"test"}
    predictions = [
        "Yes", "No",  # existence, image 1: both right
        "Yes, there is.", "Yes",  # image 2: only the first right
        "Not sure", "no",  # code_reasoning: "not " holds "no" in its first 4 characters -> "no": only the second right
    ]  # fmt: skip
    result = score(dataset, predictions)
    existence, code = result.metrics["categories"]["existence"], result.metrics["categories"]["code_reasoning"]
    assert (existence["accuracy"], existence["accuracy_plus"], existence["score"]) == (0.75, 0.5, 1.25)
    assert (code["accuracy"], code["accuracy_plus"]) == (0.5, 0.0)
    assert result.metrics["perception"] == 1.25 and result.metrics["cognition"] == 0.5  # x100: 125 and 50
    assert result.correct == [True, True, True, False, False, True]
    assert TASK_SPECS["mme"].baseline([dict(r) for r in dataset])["perception"] == 0.5 + 0.0


# ----------------------------------------------------------------------------------------------------------------
# Options, errors, model-index
# ----------------------------------------------------------------------------------------------------------------


def test_limit_and_prompt_override(layouts):
    path = FIXTURES / "coco_pope_random.json"
    assert bm.load_benchmark("pope", path, images=layouts["images"], limit=1).num_rows == 1
    custom = bm.load_benchmark("pope", path, images=layouts["images"], prompt="Q: {question} A:")
    assert prompt_of(custom[0]) == "Q: Is there a snowboard in the image? A:"
    with pytest.raises(ValueError, match="cannot be filled"):
        bm.load_benchmark("pope", path, images=layouts["images"], prompt="{expression}")
    with pytest.raises(ValueError, match="positive"):
        bm.load_benchmark("pope", path, images=layouts["images"], limit=0)


def test_files_of_another_schema_and_missing_paths_say_how_to_fix(layouts, tmp_path):
    with pytest.raises(ValueError, match=r"lacks \['question_id', 'question', 'answer', 'image', 'category'\]"):
        bm.load_benchmark("pope", FIXTURES / "REC_refcoco_unc_val.jsonl", images=layouts["images"])
    with pytest.raises(ValueError, match="Unknown benchmark 'ocr'"):
        bm.load_benchmark("ocr", "x.json")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        bm.load_benchmark("pope", tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        bm.load_benchmark("pope", FIXTURES / "coco_pope_random.json", images=tmp_path / "nowhere")


def test_every_benchmark_is_scored_by_a_registered_task():
    assert {b.task for b in bm.BENCHMARKS.values()} <= set(TASK_SPECS)
    assert all(name == b.name for name, b in bm.BENCHMARKS.items())


def test_model_index_entries_use_the_papers_units():
    metrics = {"perception": 12.349, "cognition": 3.604}
    entries = bm.model_index_entries("mme", "test", metrics)
    assert [(e["metric_type"], e["metric_value"]) for e in entries] == [
        ("mme_perception", 1234.9),
        ("mme_cognition", 360.4),
    ]
    assert entries[0]["dataset_type"] == "lmms-lab/MME" and entries[0]["dataset_split"] == "test"
    scaled = bm.model_index_entries("gqa", "testdev_balanced", {"accuracy": 0.5}, scale=9, tokens=9.0)
    assert scaled[0]["metric_config"] == "matryoshka_scale=9" and scaled[0]["metric_name"] == "Acc (9 visual tokens)"
