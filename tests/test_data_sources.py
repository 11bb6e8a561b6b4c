"""Dataset sources: JSON / JSONL, parquet, image folders and Hub ids (offline, from the datasets cache), each in the
LLaVA, Shikra and TRL `messages` forms; LLaVA's and Shikra's published schemas; the errors that name the fix."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from datasets import Dataset, Features, List, Value
from datasets import Image as ImageFeature
from PIL import Image

from comm_vlm.demo.scenes import PROMPTS
from comm_vlm.models.image_utils import format_box, load_image, normalize_box
from comm_vlm.training import build_dataset, load_recipe, run_recipe
from comm_vlm.training.data import (
    REC_PROMPT,
    REG_PROMPT,
    check_dataset_spec,
    image_problem,
    load_source,
    messages_to_messages,
    read_source,
    sample_problem,
    shikra_to_messages,
    validate_samples,
)


FIXTURES = Path(__file__).parent / "fixtures" / "data"
HASH = "0123456789abcdef0123456789abcdef01234567"  # the commit a Hub load would have cached the dataset at


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Each test's own datasets cache (local parquet / image folder loads prepare Arrow files there)."""
    cache = tmp_path / "hf_datasets_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    return cache


def cache_as_hub_dataset(parquet_files: list[Path], repo_id: str, name: str, cache_dir: Path) -> Path:
    """Writes, without the network, the datasets cache entry an online `load_dataset(repo_id, name)` of these parquet
    files leaves behind: `<cache>/<org>___<name>/<config>/0.0.0/<commit>/<name>-train.arrow` + `dataset_info.json`."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet

    org, dataset_name = repo_id.split("/")
    builder = Parquet(
        cache_dir=str(cache_dir),
        dataset_name=dataset_name,
        config_name=name,
        config_id=name,
        data_files=DataFilesDict.from_patterns({"train": [str(f) for f in parquet_files]}),
        hash=HASH,
    )
    builder.download_and_prepare()
    target = cache_dir / f"{org}___{builder.dataset_name}"  # the name as datasets writes it (snake case)
    os.replace(cache_dir / builder.dataset_name, target)
    return target


def write_images(root: Path, sizes: dict[str, tuple[int, int]]) -> None:
    colours = [(220, 30, 30), (30, 200, 60), (30, 60, 220), (230, 200, 40)]
    for i, (relative, size) in enumerate(sizes.items()):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, colours[i % len(colours)]).save(path)


def comparable(dataset) -> list[dict]:
    """Rows with each image as its pixels (a path and the decoded image of the same file compare equal)."""
    return [
        {"messages": row["messages"], "images": [np.asarray(load_image(i)).tobytes() for i in row["images"]]}
        for row in dataset
    ]


# --- one set of records per form, written as every kind of source -----------------------------------------------

IMAGE_SIZES = {"img/0.png": (32, 24), "img/1.png": (40, 30)}
FORMS = {
    "llava": [
        {
            "id": "a",
            "image": "img/0.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is the square?"},
                {"from": "gpt", "value": "Red."},
            ],
        },
        {
            "id": "b",
            "image": "img/1.png",
            "conversations": [
                {"from": "human", "value": "Describe the picture.\n<image>"},
                {"from": "gpt", "value": "A green square."},
                {"from": "human", "value": "Is it large?"},
                {"from": "gpt", "value": "No."},
            ],
        },
    ],
    "shikra": [
        {  # Shikra's conversation layout: `boxes_seq` per turn
            "id": "s0",
            "image": "img/0.png",
            "boxes": [[2, 2, 20, 20], [0, 0, 32, 24]],
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is at <boxes>?", "boxes_seq": [[0]]},
                {"from": "gpt", "value": "A square <boxes>.", "boxes_seq": [[0, 1]]},
            ],
        },
        {"id": "s1", "img_path": "img/1.png", "expression": "the green square", "bbox": [4, 3, 36, 27]},  # REC
    ],
    "messages": [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
            ],
            "images": ["img/0.png"],
        },
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Which shape?"}, {"type": "image"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A square."}]},
            ],
            "images": ["img/1.png"],
        },
    ],
}
IMAGE_KEYS = ("image", "images", "img_path")


def as_dataset(records: list[dict]) -> Dataset:
    """A `Dataset` with every key of any record as a column (`Dataset.from_list` takes the first record's keys)."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    return Dataset.from_list([{k: r.get(k) for k in keys} for r in records])


def image_of(record: dict) -> str:
    value = next(record[k] for k in IMAGE_KEYS if k in record)
    return value[0] if isinstance(value, list) else value


def write_sources(root: Path, form: str, cache_dir: Path) -> dict[str, dict]:
    """The form's records as a JSON file (the reference), a JSONL file, a parquet file, an image folder with a
    metadata.jsonl, and a cached Hub dataset; returns each kind's source mapping."""
    records = FORMS[form]
    write_images(root, IMAGE_SIZES)
    (root / f"{form}.json").write_text(json.dumps(records))
    (root / f"{form}.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    as_dataset(records).to_parquet(root / f"{form}.parquet")
    folder = root / f"{form}_imagefolder"
    metadata = []
    shutil.copytree(root / "img", folder / "img")
    for record in records:
        rest = {k: v for k, v in record.items() if k not in IMAGE_KEYS}
        metadata.append({"file_name": image_of(record), **rest})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(m) for m in metadata))
    cache_as_hub_dataset([root / f"{form}.parquet"], f"someorg/{form}_set", "stage1", cache_dir)
    common = {"format": form, "image_folder": str(root)}
    return {
        "json": {"path": str(root / f"{form}.json"), **common},
        "jsonl": {"path": str(root / f"{form}.jsonl"), **common},
        "parquet": {"parquet": str(root / f"{form}.parquet"), **common},
        "imagefolder": {"imagefolder": str(folder), "format": form},
        "hub": {"hub": f"someorg/{form}_set", "name": "stage1", "split": "train", **common},
    }


@pytest.fixture
def offline(monkeypatch):
    """`HF_HUB_OFFLINE=1` as datasets and huggingface_hub read it (at import, hence patched)."""
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_every_kind_reads_the_same_rows_as_json(form, tmp_path, datasets_cache, offline):
    sources = write_sources(tmp_path, form, datasets_cache)
    reference, dropped = read_source(sources.pop("json"))
    assert len(reference) == len(FORMS[form]) and not dropped
    assert all(isinstance(i, str) for row in reference for i in row["images"])
    for kind, spec in sources.items():
        rows, dropped = read_source(spec)
        assert comparable(rows) == comparable(reference), kind
        assert not dropped
        kept, report = validate_samples(rows, dropped=dropped)
        assert (report.total, report.kept) == (len(FORMS[form]), len(FORMS[form])), kind
    # Image folders (and Hub / parquet image columns) keep their images in the dataset: rows hold decoded images.
    stored = read_source(sources["imagefolder"])[0]
    assert isinstance(stored.features["images"].feature, ImageFeature)
    assert all(isinstance(image, Image.Image) for row in stored for image in row["images"])
    assert all(sample_problem(row) is None and image_problem(row["images"][0]) is None for row in stored)


def test_imagefolder_metadata_csv_stores_lists_as_json(tmp_path, datasets_cache, offline):
    import csv

    sources = write_sources(tmp_path, "shikra", datasets_cache)
    folder = Path(sources["imagefolder"]["imagefolder"])
    (folder / "metadata.jsonl").unlink()
    with open(folder / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["file_name", "id", "boxes", "conversations", "expression", "bbox"])
        writer.writeheader()
        for record in FORMS["shikra"]:
            row = {k: json.dumps(v) if isinstance(v, list) else v for k, v in record.items() if k not in IMAGE_KEYS}
            writer.writerow({"file_name": image_of(record), **row})
    rows, dropped = read_source(sources["imagefolder"])
    assert comparable(rows) == comparable(read_source(sources["json"])[0]) and not dropped


def test_shikra_rows_have_the_boxes_written_like_the_processor(tmp_path):
    write_images(tmp_path, IMAGE_SIZES)
    rows = [shikra_to_messages(r, tmp_path) for r in FORMS["shikra"]]
    assert rows[0]["messages"][0]["content"][1]["text"] == "What is at [0.062,0.083,0.625,0.833]?"
    assert (
        rows[0]["messages"][1]["content"][0]["text"] == "A square [0.062,0.083,0.625,0.833;0.000,0.000,1.000,1.000]."
    )
    assert rows[1]["messages"][0]["content"][1]["text"] == REC_PROMPT.format(expression="the green square")
    assert rows[1]["messages"][1]["content"][0]["text"] == "[0.100,0.100,0.900,0.900]"


def test_messages_with_string_contents_get_their_image_parts_as_trl_places_them():
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What colour?"},
            {"role": "assistant", "content": "Red."},
        ],
        "images": ["x.png"],
    }
    row = messages_to_messages(record, "/data")
    assert row["images"] == [os.path.join("/data", "x.png")]
    assert row["messages"][1]["content"] == [{"type": "image", "text": None}, {"type": "text", "text": "What colour?"}]
    assert row["messages"][2]["content"] == [{"type": "text", "text": "Red."}]
    # Image parts that carry their image supply `images`.
    inline = {"messages": [{"role": "user", "content": [{"type": "image", "image": "y.png"}]}, record["messages"][2]]}
    assert messages_to_messages(inline)["images"] == ["y.png"]


def test_mixture_by_ratio_across_kinds(tmp_path, datasets_cache, offline):
    llava = write_sources(tmp_path / "llava", "llava", datasets_cache)
    messages = write_sources(tmp_path / "messages", "messages", datasets_cache)
    spec = {
        "mixture": [
            {**llava["json"], "weight": 3.0},  # image paths
            {**messages["imagefolder"], "weight": 1.0},  # images stored in the dataset
            {**llava["hub"], "weight": 1.0},
        ]
    }
    mixed, report = build_dataset(spec, seed=0)
    assert (report.total, report.kept, report.skipped) == (6, 6, 0)
    assert isinstance(mixed.features["images"].feature, ImageFeature)  # paths and stored images mixed as images
    texts = [row["messages"][0]["content"][-1]["text"] or "" for row in mixed]
    assert texts.count("What colour is the square?") > texts.count("What colour?")  # weight 3 against 1 (x2 rows)
    assert all(sample_problem(row) is None for row in mixed)


def test_bad_stored_images_are_counted_not_raised(tmp_path):
    """An image folder listing a missing and a corrupt file, a parquet embedding corrupt bytes: counted by reason."""
    folder = tmp_path / "folder"
    write_images(folder, {"good.png": (16, 16)})
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    turns = FORMS["llava"][0]["conversations"]
    names = ["good.png", "bad.png", "gone.png"]
    (folder / "metadata.jsonl").write_text(
        "\n".join(json.dumps({"file_name": n, "conversations": turns}) for n in names)
    )
    rows, report = build_dataset({"imagefolder": str(folder)})
    assert (len(rows), report.total, dict(report.reasons)) == (1, 3, {"corrupt image": 1, "missing image": 1})
    features = Features(
        {"conversations": List({"from": Value("string"), "value": Value("string")}), "image": ImageFeature()}
    )
    stored = [{"bytes": (folder / n).read_bytes(), "path": None} for n in names[:2]]
    Dataset.from_list([{"conversations": turns, "image": i} for i in stored], features=features).to_parquet(
        tmp_path / "p.parquet"
    )
    rows, report = build_dataset({"parquet": str(tmp_path / "p.parquet")})
    assert (len(rows), report.total, dict(report.reasons)) == (1, 2, {"corrupt image": 1})
    assert isinstance(rows[0]["images"][0], Image.Image)


# --- a tiny stage trained from parquet, an image folder and a Hub id --------------------------------------------


def train_tiny_stage(tmp_path: Path, dataset: dict):
    recipe = {
        "model": {"tiny": "llava"},
        "stages": [
            {
                "stage": "llava_instruct",
                "dataset": dataset,
                "args": {
                    "max_steps": 2,
                    "per_device_train_batch_size": 2,
                    "learning_rate": 1e-3,
                    "save_strategy": "no",
                },
            }
        ],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    (result,) = run_recipe(load_recipe(str(path)), tmp_path / "run")
    assert math.isfinite(result.train_loss) and result.log_history[-1]["step"] == 2
    assert (Path(result.output_dir) / "config.json").exists()
    return result


def test_parquet_trains_a_stage(tmp_path, datasets_cache, offline):
    sources = write_sources(tmp_path, "llava", datasets_cache)
    result = train_tiny_stage(tmp_path, sources["parquet"])
    assert (result.skip_report.total, result.skip_report.kept) == (2, 2)


def test_imagefolder_trains_a_stage_on_decoded_images(tmp_path, datasets_cache, offline):
    sources = write_sources(tmp_path, "shikra", datasets_cache)
    result = train_tiny_stage(tmp_path, sources["imagefolder"])
    assert (result.skip_report.total, result.skip_report.kept) == (2, 2)


def write_hub_parquet(tmp_path: Path) -> Path:
    """Rows as the Hub's vision SFT sets store them: `messages` with content parts and `images` in the parquet."""
    write_images(tmp_path, IMAGE_SIZES)
    features = Features(
        {
            "messages": List(
                {
                    "role": Value("string"),
                    "content": List({"index": Value("int64"), "text": Value("string"), "type": Value("string")}),
                }
            ),
            "images": List(ImageFeature()),
        }
    )
    rows = []
    for relative, answer in zip(IMAGE_SIZES, ["Red.", "Green."]):
        image = {"bytes": (tmp_path / relative).read_bytes(), "path": None}
        rows.append(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"index": 0, "text": None, "type": "image"},
                            {"index": None, "text": "Colour?", "type": "text"},
                        ],
                    },
                    {"role": "assistant", "content": [{"index": None, "text": answer, "type": "text"}]},
                ],
                "images": [image],
            }
        )
    path = tmp_path / "train-00000-of-00001.parquet"
    Dataset.from_list(rows * 2, features=features).to_parquet(path)
    return path


def test_hub_id_from_the_offline_cache_trains_a_stage(tmp_path, datasets_cache, offline):
    cache_as_hub_dataset([write_hub_parquet(tmp_path)], "someorg/vision_sft", "default", datasets_cache)
    (tmp_path / "img").rename(tmp_path / "moved")  # the rows carry their images: no file is read
    spec = {"hub": "someorg/vision_sft", "name": "default", "split": "train", "format": "messages"}
    rows, dropped = read_source(spec)
    assert len(rows) == 4 and not dropped
    assert rows[0]["messages"][0]["content"] == [{"type": "image", "text": None}, {"type": "text", "text": "Colour?"}]
    result = train_tiny_stage(tmp_path, spec)
    assert (result.skip_report.total, result.skip_report.kept) == (4, 4)


def test_hub_id_loads_with_the_offline_environment_variables(tmp_path):
    """The real `load_dataset(id, name, split=...)` offline path, configured by the environment as users set it."""
    home = tmp_path / "hf_home"
    write_images(tmp_path, IMAGE_SIZES)
    parquet = tmp_path / "llava.parquet"
    Dataset.from_list(FORMS["llava"]).to_parquet(parquet)
    cache_as_hub_dataset([parquet], "liuhaotian/LLaVA-Instruct-150K", "sample", home / "datasets")
    spec = {"hub": "liuhaotian/LLaVA-Instruct-150K", "name": "sample", "split": "train", "image_folder": str(tmp_path)}
    missing = {**spec, "hub": "someorg/never_loaded"}  # not in the cache: the error says how to get it there
    script = f"""
import json
from comm_vlm.training.data import build_dataset
rows, report = build_dataset({spec!r})
try:
    build_dataset({missing!r})
    error = None
except ConnectionError as err:
    error = str(err)
print(json.dumps({{"rows": len(rows), "kept": report.kept, "image": rows[0]["images"][0], "error": error}}))
"""
    env = {**os.environ, "HF_HOME": str(home), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("HF_DATASETS_CACHE", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert (out["rows"], out["kept"], out["image"]) == (2, 2, str(tmp_path / "img/0.png"))
    assert "someorg/never_loaded" in out["error"] and "Load it once online with the same id" in out["error"]


# --- published schemas ------------------------------------------------------------------------------------------


def fixture_records(name: str) -> list[dict]:
    text = (FIXTURES / name).read_text()
    return json.loads(text) if name.endswith(".json") else [json.loads(line) for line in text.splitlines()]


def test_llava_pretrain_schema(tmp_path):
    records = fixture_records("blip_laion_cc_sbu_558k.json")
    write_images(tmp_path, {r["image"]: (48, 32) for r in records[:3]})  # the fourth image was never downloaded
    spec = {"path": str(FIXTURES / "blip_laion_cc_sbu_558k.json"), "format": "llava", "image_folder": str(tmp_path)}
    rows, report = build_dataset(spec)
    assert (report.total, report.kept, dict(report.reasons)) == (4, 3, {"missing image": 1})
    first = rows[0]["messages"]
    assert first[0]["content"] == [
        {"type": "text", "text": "Render a clear and concise summary of the photo."},
        {"type": "image", "text": None},
    ]
    assert first[1] == {
        "role": "assistant",
        "content": [{"type": "text", "text": records[0]["conversations"][1]["value"]}],
    }
    assert rows[0]["images"] == [str(tmp_path / "00453/004539375.jpg")]


def test_llava_mix665k_schema_keeps_text_only_rows(tmp_path):
    records = fixture_records("llava_v1_5_mix665k.json")
    images = [r["image"] for r in records if "image" in r]
    write_images(tmp_path, {image: (64, 48) for image in images if not image.startswith("ocr_vqa")})  # OCR-VQA absent
    (tmp_path / images[-1]).write_bytes(b"\xff\xd8\xff truncated")  # a TextVQA download cut short
    spec = {"path": str(FIXTURES / "llava_v1_5_mix665k.json"), "format": "llava", "image_folder": str(tmp_path)}
    rows, report = build_dataset(spec)
    assert (report.total, report.kept) == (6, 4)
    assert report.reasons == {"missing image": 1, "corrupt image": 1}
    # ShareGPT's text-only conversations (no `image` key) train as they are, as in LLaVA-1.5.
    text_only = [row for row in rows if not row["images"]]
    assert len(text_only) == 1 and len(text_only[0]["messages"]) == 4
    assert all(part["type"] == "text" for m in text_only[0]["messages"] for part in m["content"])
    coco = rows[0]["messages"]
    assert [m["role"] for m in coco] == ["user", "assistant", "user", "assistant"]
    assert coco[0]["content"][0] == {"type": "image", "text": None}
    assert {os.path.relpath(r["images"][0], tmp_path).split("/")[0] for r in rows if r["images"]} == {
        "coco",
        "gqa",
        "vg",
    }


def test_shikra_rec_reg_schema(tmp_path):
    records = fixture_records("REC_ref3_train.jsonl")
    write_images(tmp_path, {r["img_path"]: (r["width"], r["height"]) for r in records[:2]})  # the third is missing
    spec = {"path": str(FIXTURES / "REC_ref3_train.jsonl"), "format": "shikra", "image_folder": str(tmp_path)}
    rec, report = build_dataset(spec)
    assert (report.total, report.kept, dict(report.reasons)) == (3, 2, {"missing image": 1})
    box = format_box(normalize_box(records[0]["bbox"], (640, 427)))
    assert rec[0]["messages"][0]["content"] == [
        {"type": "image", "text": None},
        {"type": "text", "text": REC_PROMPT.format(expression="the bowl behind the others")},
    ]
    assert rec[0]["messages"][1]["content"] == [{"type": "text", "text": box}]
    reg, report = build_dataset({**spec, "task": "reg"})
    assert report.kept == 2
    assert reg[0]["messages"][0]["content"][1]["text"] == REG_PROMPT.format(box=box)
    assert reg[0]["messages"][1]["content"][0]["text"] == "the bowl behind the others"
    # Training asks REC and REG exactly as the evaluation rows do.
    assert (REC_PROMPT, REG_PROMPT) == (PROMPTS["rec"], PROMPTS["reg"])


def test_shikra_flickr30k_and_rd_schemas(tmp_path):
    write_images(tmp_path, {"1000092795.jpg": (500, 333), "10002456.jpg": (500, 333)})
    common = {"format": "shikra", "image_folder": str(tmp_path)}
    flickr, report = build_dataset({"path": str(FIXTURES / "CWB_flickr30k_train.jsonl"), **common})
    assert (report.total, report.kept) == (2, 2)
    answer = flickr[1]["messages"][1]["content"][0]["text"]
    dog, grass = (format_box(normalize_box(b, (500, 333))) for b in ([120, 60, 300, 330], [0, 250, 500, 333]))
    assert answer == f"A dog{dog} runs across the grass{grass} ."
    assert flickr[1]["images"] == [str(tmp_path / "10002456.jpg")]
    rd, report = build_dataset({"path": str(FIXTURES / "GPT4GEN_RD_BoxCoT_train.jsonl"), **common})
    assert (report.total, report.kept) == (2, 2)
    question = rd[1]["messages"][0]["content"][1]["text"]
    assert question.startswith(f"Is the dog{dog} running or lying down?")
    assert rd[1]["messages"][1]["content"][0]["text"].startswith(f"The dog{dog} has its legs stretched out")


def test_malformed_records_are_counted(tmp_path):
    write_images(tmp_path, IMAGE_SIZES)
    records = [
        *FORMS["shikra"],
        {**FORMS["shikra"][0], "id": "too-few-boxes", "boxes": [[0, 0, 4, 4]]},  # boxes_seq indexes box 1
        {"id": "no-layout", "image": "img/0.png", "caption": "a square"},
    ]
    path = tmp_path / "shikra.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    rows, report = build_dataset({"path": str(path), "format": "shikra", "image_folder": str(tmp_path)})
    assert (report.total, report.kept, dict(report.reasons)) == (4, 2, {"malformed shikra record": 2})
    assert "2 of 4 samples skipped (malformed shikra record: 2)" in str(report)
    assert len(load_source(path, "shikra", tmp_path)) == 2


# --- errors -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec,message",
    [
        ({"path": "a.json", "parquet": "a.parquet"}, "needs exactly one of these keys"),
        ({"format": "llava"}, "needs exactly one of these keys"),
        ({"path": "a.json", "split": "train"}, r"`split` belongs to `parquet:`, `imagefolder:`, `hub:` sources"),
        ({"path": "a.json", "image_dir": "x"}, r"Unknown key\(s\) \['image_dir'\].*Remove or rename them"),
        ({"path": "a.json", "format": "sharegpt"}, r"unknown `format: sharegpt`; use one of \['llava', 'messages'"),
        ({"path": "a.json", "task": "reg"}, "`task: rec` or `task: reg` goes with `format: shikra`"),
        ({"path": "a.json", "weight": 2.0}, "`weight` applies to `mixture:` entries"),
        ({"mixture": [{"path": "a.json", "weight": 0}]}, "`weight` must be a number > 0"),
        ({"mixture": []}, "non-empty list of sources"),
    ],
)
def test_bad_specs_name_the_fix(spec, message):
    with pytest.raises(ValueError, match=message):
        check_dataset_spec(spec)


def test_read_errors_name_the_fix(tmp_path, datasets_cache, offline):
    write_images(tmp_path, IMAGE_SIZES)
    with pytest.raises(ValueError, match=r"needs `split:` \(e.g. `split: train`\)"):
        build_dataset({"hub": "someorg/x", "name": "default"})
    with pytest.raises(ConnectionError, match="holds no prepared copy"):
        build_dataset({"hub": "someorg/not_cached", "split": "train"})
    with pytest.raises(ValueError, match="for a parquet file write `parquet: "):
        build_dataset({"path": str(tmp_path / "x.parquet")})
    with pytest.raises(FileNotFoundError, match="matches no file"):
        build_dataset({"parquet": str(tmp_path / "nothing-*.parquet")})
    with pytest.raises(ValueError, match="has no metadata.jsonl or metadata.csv"):
        build_dataset({"imagefolder": str(tmp_path / "img")})
    # Columns missing for the chosen format: the message names them and the format the columns fit.
    Dataset.from_list(FORMS["messages"]).to_parquet(tmp_path / "m.parquet")
    with pytest.raises(ValueError, match=r"needs the column\(s\) \[.conversations.\].*use `format: messages`"):
        build_dataset({"parquet": str(tmp_path / "m.parquet"), "format": "llava"})
    # ... or that `columns:` maps them.
    renamed = [{"dialogue": r["conversations"], "image": r["image"]} for r in FORMS["llava"]]
    Dataset.from_list(renamed).to_parquet(tmp_path / "r.parquet")
    with pytest.raises(ValueError, match=r"rename columns with `columns: \{their_name: conversations\}`"):
        build_dataset({"parquet": str(tmp_path / "r.parquet")})
    spec = {"parquet": str(tmp_path / "r.parquet"), "columns": {"dialogue": "conversations"}}
    assert build_dataset({**spec, "image_folder": str(tmp_path)})[1].kept == 2
    with pytest.raises(ValueError, match=r"`columns:` renames \['dialog'\], absent"):
        build_dataset({**spec, "columns": {"dialog": "conversations"}})
    # An image column of an unexpected type.
    Dataset.from_list([{**r, "image": 7} for r in FORMS["llava"]]).to_parquet(tmp_path / "i.parquet")
    with pytest.raises(ValueError, match=r"the image column `image` holds Value\('int64'\); it must hold paths"):
        build_dataset({"parquet": str(tmp_path / "i.parquet")})
    # No record converts: the reasons are given.
    (tmp_path / "bad.json").write_text(json.dumps([{"conversations": [{"from": "human"}]}]))
    with pytest.raises(ValueError, match=r"none of its 1 records is a valid 'llava' sample \(malformed llava record"):
        build_dataset({"path": str(tmp_path / "bad.json")})
