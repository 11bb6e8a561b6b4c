"""The plumbing check behind `comm-vlm plumbing`: a random tiny COMM saved, reloaded and served, offline, in seconds.

`run_plumbing` builds a tiny random COMM and its processor (`comm_vlm.testing.build_tiny_checkpoint`), saves them with
`save_pretrained` (safetensors), reloads them with the Auto classes, checks that the reload gives the same logits, and
answers a chat prompt about a generated image through `pipeline("image-text-to-text")`. The weights are random, so the
answer is noise: this checks the save/load/serve path, not the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

from ..models.image_utils import format_box, normalize_box, parse_boxes
from ..testing import build_tiny_checkpoint


BOX = (12, 10, 52, 50)


def plumbing_image(size: tuple[int, int] = (96, 72)) -> Image.Image:
    """A synthetic scene: a red box at `BOX` on a blue background (so no image is downloaded)."""
    image = Image.new("RGB", size, (30, 60, 200))
    ImageDraw.Draw(image).rectangle(list(BOX), fill=(220, 30, 30))
    return image


def run_plumbing(output_dir: str | Path, layout: str = "comm", seed: int = 0) -> dict[str, Any]:
    """Builds, saves, reloads and serves a tiny random COMM (`layout="llava"`: its LLaVA-equivalent configuration).

    Returns what it measured, among it `reload_max_abs_logit_diff` (0.0 when the reload is exact).
    """
    output_dir = Path(output_dir)
    model, _ = build_tiny_checkpoint(output_dir, layout=layout, seed=seed)
    reloaded = AutoModelForImageTextToText.from_pretrained(output_dir).eval()
    processor = AutoProcessor.from_pretrained(output_dir)

    image = plumbing_image()
    box_text = format_box(normalize_box(BOX, image.size))
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image},
                {"type": "text", "text": f"What is the object at {box_text}?"},
            ],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        max_diff = (model(**inputs).logits - reloaded(**inputs).logits).abs().max().item()

    pipe = pipeline("image-text-to-text", model=reloaded, processor=processor)
    answer = pipe(text=messages, max_new_tokens=12, generate_kwargs={"do_sample": False})[0]["generated_text"][-1]
    config = reloaded.config
    return {
        "output_dir": str(output_dir),
        "files": sorted(p.name for p in output_dir.iterdir()),
        "encoders": [
            f"{getattr(config, f'{p}_config').model_type}: layers {config.branch(p)['layers']}, "
            f"{config.branch(p)['merge']} -> {config.branch(p)['aligner']}"
            for p in config.encoder_prefixes
        ],
        "parameters": sum(p.numel() for p in reloaded.parameters()),
        "visual_tokens_per_image": config.image_seq_length,
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "reload_max_abs_logit_diff": max_diff,
        "prompt_box": box_text,
        "boxes_in_answer": parse_boxes(answer["content"]).boxes,
        "answer": answer["content"],
    }
