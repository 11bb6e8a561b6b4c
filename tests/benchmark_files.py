"""The published benchmark layouts, made on disk from `tests/fixtures/benchmarks/`: images drawn here, the lmms-lab
parquet files written with `datasets` (image bytes embedded), and a fake Hugging Face Hub cache entry."""

import io
import json
from pathlib import Path

from datasets import Dataset, Image
from PIL import Image as PILImage


FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"

# Image name -> (width, height): the sizes the fixtures' boxes and Shikra's `width` / `height` assume.
IMAGE_SIZES = {
    "COCO_val2014_000000310196.jpg": (64, 48),
    "COCO_val2014_000000210789.jpg": (48, 64),
    "COCO_train2014_000000000001.jpg": (256, 128),
    "COCO_train2014_000000000002.jpg": (200, 100),
    "val2014/COCO_val2014_000000262148.jpg": (40, 30),
    "val2014/COCO_val2014_000000393225.jpg": (40, 30),
    "COCO_val2014_000000297147.jpg": (40, 30),
    "COCO_val2014_000000001915.jpg": (40, 30),
    "val2014/COCO_val2014_000000391895.jpg": (40, 30),
    "val2014/COCO_val2014_000000522418.jpg": (40, 30),
    "train2014/COCO_train2014_000000318556.jpg": (40, 30),
    "1000092795.jpg": (40, 30),
    "10002456.jpg": (40, 30),
    "n15740.jpg": (40, 30),
    "n161313.jpg": (40, 30),
    "003a8ae2ef43b901.jpg": (40, 30),
}


def png(size: tuple[int, int], colour: str = "grey") -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_images(folder: Path) -> Path:
    """Every fixture image under `folder` (JPEG files of the sizes in `IMAGE_SIZES`)."""
    for name, size in IMAGE_SIZES.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        PILImage.new("RGB", size, "grey").save(path, format="JPEG")
    return folder


def read_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines() if line.strip()]


def write_parquet(rows_file: str, path: Path, size: tuple[int, int] = (256, 128)) -> Path:
    """The rows of a fixture JSONL with an `image` column of PNG bytes, as an lmms-lab parquet file."""
    rows = [{**row, "image": {"bytes": png(size), "path": None}} for row in read_rows(rows_file)]
    dataset = Dataset.from_list(rows).cast_column("image", Image())
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.to_parquet(str(path))
    return path


def write_hub_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """A Hub-cache entry of a dataset repo (`datasets--owner--name/snapshots/<sha>/...`, `refs/main`)."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"datasets--{repo_id.replace('/', '--')}"
    for relative, source in files.items():
        target = root / "snapshots" / sha / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(sha)
    return root


def make_layouts(root: Path) -> dict[str, Path]:
    """Images and parquet folders under `root`: `images`, `pope` (lmms-lab/POPE), `refcoco`, `refcocog`, `mme`."""
    layouts = {"images": write_images(root / "images")}
    write_parquet("lmms_lab_pope.jsonl", root / "pope/data/test-00000-of-00001.parquet", (64, 48))
    layouts["pope"] = root / "pope"
    write_parquet("lmms_lab_refcoco_val.jsonl", root / "refcoco/data/val-00000-of-00001.parquet")
    write_parquet("lmms_lab_refcoco_testA.jsonl", root / "refcoco/data/testA-00000-of-00001.parquet")
    layouts["refcoco"] = root / "refcoco"
    write_parquet("lmms_lab_refcocog_val.jsonl", root / "refcocog/data/val-00000-of-00001.parquet")
    layouts["refcocog"] = root / "refcocog"
    write_parquet("lmms_lab_mme.jsonl", root / "mme/data/test-00000-of-00001.parquet", (40, 30))
    layouts["mme"] = root / "mme"
    return layouts
