"""`comm-vlm` command line.

    comm-vlm demo [--output-dir DIR] [--layout comm|llava]

`demo` (the main job until training/evaluation land): builds a tiny random COMM (CLIP + DINOv2 with LLN-Layerscale
merging) and its processor fully offline, saves them with `save_pretrained` (safetensors), reloads with the Auto
classes, checks the reload is exact, and answers a chat prompt about a generated image through
`pipeline("image-text-to-text")`. The weights are random, so the answer is noise: the demo proves the plumbing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def _demo_image(size: tuple[int, int] = (96, 72)) -> Image.Image:
    """A synthetic scene: a red box on a blue background (so no image is downloaded)."""
    image = Image.new("RGB", size, (30, 60, 200))
    ImageDraw.Draw(image).rectangle([12, 10, 52, 50], fill=(220, 30, 30))
    return image


def run_demo(output_dir: str | Path, layout: str = "comm", seed: int = 0) -> dict:
    """Runs the demo and returns what it measured (also printed by the CLI)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

    from .processing_comm import format_box, normalize_box, parse_boxes
    from .tiny import build_tiny_checkpoint

    output_dir = Path(output_dir)
    model, _ = build_tiny_checkpoint(output_dir, layout=layout, seed=seed)
    reloaded = AutoModelForImageTextToText.from_pretrained(output_dir).eval()
    processor = AutoProcessor.from_pretrained(output_dir)

    image = _demo_image()
    box_text = format_box(normalize_box((12, 10, 52, 50), image.size))
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="comm-vlm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build, save, reload and serve a tiny COMM offline")
    demo.add_argument("--output-dir", default="outputs/demo")
    demo.add_argument("--layout", choices=["comm", "llava"], default="comm")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    np.random.seed(args.seed)
    result = run_demo(args.output_dir, layout=args.layout, seed=args.seed)
    width = max(len(k) for k in result)
    for key, value in result.items():
        sys.stdout.write(f"{key:<{width}}  {value}\n")
    if result["reload_max_abs_logit_diff"] != 0.0:
        sys.stderr.write("reload changed the logits\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
