"""When a tiny random LLM learns REC: reading a box out of the visual tokens vs binding a phrase to an object.

COMM (Jiang et al. 2023) reads boxes as text (Shikra's `[x1,y1,x2,y2]`). To answer "the yellow square" the LLM must
(a) *bind*: attend, from the answer position, to the visual tokens of the object the phrase names, and (b) *read*:
turn those tokens into box digits. On the main job's tiny COMM (same sizes, same encoder warm-up, same init) this
script measures each part on the x1 coordinate's tenths digit (the first informative token of a box):

1. Probes on the frozen visual tokens (after the initial projector), per number of objects in the scene:
   `object mean`: a linear probe on the tokens averaged over the named object's patches (binding given: the ceiling
   of reading); `image mean`: the same on the whole image's mean token (no binding: what flat attention gives);
   `attention probe`: one attention head whose query is a learned embedding of the named category, trained like the
   LLM (binding learned, but from a query handed to it instead of composed from the phrase's tokens).
2. The LLM trained on REC rows alone (plain AdamW loop, batch 16, lr 1e-3, encoders frozen as in the recipe), once
   on one-object scenes (reading only) and once on the main job's 1-4-object scenes (reading and binding): x1-tenths
   accuracy of the next-token prediction on held-out 1-4-object REC rows during training.

It keeps the settings `research/results/rec_binding.md` was recorded with: LLaVA-1.5's system prompt and the 600-step
encoder warm-up. Writes `<name>.md` (tables) and `<name>.png` (accuracy vs steps, probes as lines; `--name`, default
`rec_binding`) to `--output-dir` (default `research/results`; with `--quick`, `outputs/quick`).

    PYTHONPATH=src python research/rec_binding.py                 # about 11 minutes on 2 cores
    PYTHONPATH=src python research/rec_binding.py --quick         # smoke run, seconds
    # the LLM alone for 3000 steps, question first and image first:
    PYTHONPATH=src python research/rec_binding.py --llm-only --steps 3000 --question-first \
        --name rec_binding_question_first
    PYTHONPATH=src python research/rec_binding.py --llm-only --steps 3000 --name rec_binding_image_first
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import AutoModelForImageTextToText  # noqa: E402

from comm_vlm.chat_templates import VICUNA_SYSTEM_PROMPT  # noqa: E402
from comm_vlm.demo.encoder_warmup import patch_labels, warm_up_encoders  # noqa: E402
from comm_vlm.demo.main_job import MainJobConfig, build_family_model  # noqa: E402
from comm_vlm.demo.synthetic import (  # noqa: E402
    COLOURS,
    SHAPES,
    SyntheticConfig,
    generate_scenes,
    make_synthetic_splits,
)
from comm_vlm.models.configuration_comm import patch_grid  # noqa: E402
from comm_vlm.models.image_utils import normalize_box  # noqa: E402
from comm_vlm.testing import tiny_text_config  # noqa: E402


BOX_TOKENS = 25  # " [" + 4 x "0.ddd" + 3 "," + "]"
X1_TENTHS = 3  # " [", "0", ".", then the tenths digit of x1


def x1_tenths(obj, scene) -> int:
    return min(int(normalize_box(obj.box, (scene.width, scene.height))[0] * 10), 9)


def probe_features(model, processor, scenes) -> dict[str, torch.Tensor]:
    """Frozen visual tokens of `scenes` (after the initial projector) and, per object, what the probes read.

    Returns:
        `tokens (S, N, D)`, and per object (M of them): `object_mean (M, D)` over its patches, `image_mean (M, D)`,
        `scene (M,)` index into `tokens`, `category (M,)` colour-shape class, `digit (M,)` x1 tenths, `count (M,)`
        objects in its scene.
    """
    grid = patch_grid(model.config.vision_config)
    pixel_values = processor.image_processor([s.render() for s in scenes], return_tensors="pt").pixel_values
    with torch.no_grad():
        tokens = model.model.get_image_features(pixel_values).last_hidden_state  # (S, grid * grid, D)
    found: dict[str, list] = {k: [] for k in ("object_mean", "image_mean", "scene", "category", "digit", "count")}
    for index, (scene, feats) in enumerate(zip(scenes, tokens)):
        for obj in scene.objects:
            alone = type(scene)(scene_id=scene.scene_id, width=scene.width, height=scene.height, objects=[obj])
            mask = patch_labels(alone, grid, list(COLOURS), list(SHAPES))[0] > 0  # (grid * grid,)
            if not mask.any():
                continue
            found["object_mean"].append(feats[mask].mean(0))
            found["image_mean"].append(feats.mean(0))
            found["scene"].append(index)
            found["category"].append(list(COLOURS).index(obj.colour) * len(SHAPES) + SHAPES.index(obj.shape))
            found["digit"].append(x1_tenths(obj, scene))
            found["count"].append(len(scene.objects))
    stacked = {k: torch.stack(v) if k.endswith("mean") else torch.tensor(v) for k, v in found.items()}
    return {"tokens": tokens, **stacked}


def linear_probe(train_x, train_y, test_x, steps: int = 1500) -> torch.Tensor:
    """Softmax regression on standardised features (full batch, Adam); returns the test predictions."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    head = torch.nn.Linear(train_x.shape[1], 10)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(head((train_x - mean) / std), train_y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return head((test_x - mean) / std).argmax(-1)


class AttentionProbe(torch.nn.Module):
    """One attention head whose query is a learned embedding of the object's category (binding given the phrase)."""

    def __init__(self, width: int, num_categories: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.query = torch.nn.Embedding(num_categories, width)
        self.key = torch.nn.Linear(width, width)
        self.value = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, 10)

    def forward(self, tokens: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        """`tokens (B, N, D)`, `category (B,)` -> x1 tenths logits `(B, 10)`."""
        tokens = self.norm(tokens)
        scores = torch.einsum("bnd,bd->bn", self.key(tokens), self.query(category)) / tokens.shape[-1] ** 0.5
        return self.head(torch.einsum("bn,bnd->bd", scores.softmax(-1), self.value(tokens)))


def attention_probe(train: dict, test: dict, steps: int, seed: int) -> torch.Tensor:
    """Trains `AttentionProbe` like the LLM (batch 16, AdamW, lr 1e-3, `steps` steps); returns the test predictions."""
    torch.manual_seed(seed)
    probe = AttentionProbe(train["tokens"].shape[-1], len(COLOURS) * len(SHAPES))
    optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(train["digit"]), (16,), generator=generator)
        logits = probe(train["tokens"][train["scene"][idx]], train["category"][idx])
        loss = F.cross_entropy(logits, train["digit"][idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return probe(test["tokens"][test["scene"]], test["category"]).argmax(-1)


def rec_batches(processor, split) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Tokenised REC rows of a split (labels on the box only), each row's x1-tenths position and scene's objects."""
    rows = [row for row in split if row["task"] == "rec"]
    texts = [processor.apply_chat_template(row["messages"], tokenize=False) for row in rows]
    batch = processor(images=[[row["images"][0]] for row in rows], text=texts, return_tensors="pt", padding=True).data
    ids = batch["input_ids"]  # (R, T)
    labels = torch.full_like(ids, -100)
    positions = []
    for i in range(len(rows)):
        eos = (ids[i] == processor.tokenizer.eos_token_id).nonzero()[-1].item()
        labels[i, eos - BOX_TOKENS : eos + 1] = ids[i, eos - BOX_TOKENS : eos + 1]
        positions.append(eos - BOX_TOKENS + X1_TENTHS)
    batch["labels"] = labels
    return batch, torch.tensor(positions), torch.tensor([row["num_objects"] for row in rows])


def x1_correct(model, batch, positions, chunk: int = 64) -> torch.Tensor:
    """Whether the next-token prediction at each row's x1 tenths digit is right, `(R,)` bool."""
    correct = []
    with torch.no_grad():
        for start in range(0, len(positions), chunk):
            rows = torch.arange(start, min(start + chunk, len(positions)))
            logits = model(**{k: v[rows] for k, v in batch.items() if k != "labels"}).logits  # (r, T, V)
            local = torch.arange(len(rows))
            predicted = logits[local, positions[rows] - 1].argmax(-1)
            correct.append(predicted == batch["input_ids"][rows, positions[rows]])
    return torch.cat(correct)


def train_llm(init_dir, processor, train_split, test, steps: int, every: int, seed: int):
    """REC-only training from the shared init.

    Returns:
        `(curve, final)`: `[(step, accuracy on all test rows)]` every `every` steps, and the last step's per-row
        correctness `(R,)`.
    """
    model = AutoModelForImageTextToText.from_pretrained(init_dir)
    for name, param in model.named_parameters():
        param.requires_grad_("vision_tower" not in name)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    batch, _, _ = rec_batches(processor, train_split)
    test_batch, test_positions, _ = test
    generator = torch.Generator().manual_seed(seed)
    curve = []
    for step in tqdm(range(steps + 1), desc="REC-only training"):
        if step % every == 0 or step == steps:
            model.eval()
            correct = x1_correct(model, test_batch, test_positions)
            curve.append((step, correct.float().mean().item()))
            model.train()
        if step == steps:
            return curve, correct
        idx = torch.randint(len(batch["input_ids"]), (16,), generator=generator)
        loss = model(**{k: v[idx] for k, v in batch.items()}).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def run_probes(
    model, processor, train_scenes: int, steps: int, seed: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The three probes; per probe, whether each held-out object's digit is right `(M,)` and its scene's objects."""
    train = probe_features(model, processor, generate_scenes(train_scenes, 0, "train"))
    held_out = probe_features(model, processor, generate_scenes(200, 0, "test"))
    predictions = {
        "linear probe, object mean (binding given)": linear_probe(
            train["object_mean"], train["digit"], held_out["object_mean"]
        ),
        "linear probe, image mean (no binding)": linear_probe(
            train["image_mean"], train["digit"], held_out["image_mean"]
        ),
        f"attention probe, category query, {steps} steps": attention_probe(train, held_out, steps, seed),
    }
    return {name: (predicted == held_out["digit"], held_out["count"]) for name, predicted in predictions.items()}


def row(label: str, right: torch.Tensor, counts: torch.Tensor) -> str:
    """A table row: accuracy by objects in the scene (1-4) and overall."""
    cells = [f"{100 * right[counts == k].float().mean():.1f}" if (counts == k).any() else "-" for k in range(1, 5)]
    return f"| {label} | " + " | ".join(cells) + f" | {100 * right.float().mean():.1f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", help="default: research/results (with --quick: outputs/quick)")
    parser.add_argument("--name", default="rec_binding", help="stem of the .md and .png written")
    parser.add_argument("--steps", type=int, default=1500, help="REC-only training steps per LLM run")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data, a few steps")
    variants = parser.add_argument_group("LLM variants (with --llm-only: no probes, only the 1-4-object LLM run)")
    variants.add_argument("--llm-only", action="store_true")
    variants.add_argument("--llm-layers", type=int, help="LLM layers (main job: 3)")
    variants.add_argument("--llm-heads", type=int, help="attention heads = key/value heads (main job: 4 and 2)")
    variants.add_argument("--llm-init-std", type=float, help="LLM init std (main job: 1/sqrt(width))")
    variants.add_argument("--question-first", action="store_true", help="the question before the image")
    variants.add_argument("--train-scenes", type=int, default=2000, help="training scenes (main job: 600)")
    args = parser.parse_args()
    torch.manual_seed(0)
    # As recorded: LLaVA-1.5's template and the 600-step encoder warm-up.
    config = MainJobConfig.quick() if args.quick else MainJobConfig(warmup_steps=600)
    config = replace(config, system_prompt=VICUNA_SYSTEM_PROMPT)
    config = replace(config, llm_layers=args.llm_layers or config.llm_layers, llm_init_std=args.llm_init_std)
    steps, every = (4, 2) if args.quick else (args.steps, 250)
    train_scenes = config.train_scenes if args.quick else args.train_scenes
    synthetic = {"image_after_question": args.question_first}
    overrides = {}
    if args.llm_heads:
        std = config.llm_init_std or config.llm_width**-0.5
        heads = {"num_attention_heads": args.llm_heads, "num_key_value_heads": args.llm_heads}
        text = tiny_text_config(config.vocab_size, config.llm_width, config.llm_layers, initializer_range=std, **heads)
        overrides["text_config"] = text
    out = Path(args.output_dir or ("outputs/quick" if args.quick else "research/results"))
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "| x1 tenths accuracy on held-out objects, by objects in the scene | 1 | 2 | 3 | 4 | all |",
        "|---|" + "---:|" * 5,
    ]

    with tempfile.TemporaryDirectory() as tmp:
        model, processor = build_family_model("comm", config, tmp, **overrides)
        scenes = generate_scenes(config.train_scenes, config.seed, "train")
        warm_up_encoders(model, processor.image_processor, scenes, steps=config.warmup_steps, seed=config.seed)
        model.save_pretrained(tmp)

        # 1. Probes: perfect binding (object mean), none (image mean), binding learned from a category query.
        probes = {} if args.llm_only else run_probes(model, processor, train_scenes, steps, config.seed)
        lines += [row(name, right, counts) for name, (right, counts) in probes.items()]

        # 2. The LLM, REC rows only: one-object scenes vs the main job's scenes; tested on the main job's scenes.
        test_scenes = 4 if args.quick else 100
        test = rec_batches(
            processor,
            make_synthetic_splits(2, test_scenes, seed=0, tasks=["rec"], config=SyntheticConfig(**synthetic))["test"],
        )
        runs = (("1-4-object scenes", 4),) if args.llm_only else (("1-object scenes", 1), ("1-4-object scenes", 4))
        curves = {}
        for label, max_objects in runs:
            split_config = SyntheticConfig(max_objects=max_objects, **synthetic)
            split = make_synthetic_splits(train_scenes, 2, seed=0, tasks=["rec"], config=split_config)
            curves[label], final = train_llm(tmp, processor, split["train"], test, steps, every, config.seed)
            lines.append(row(f"LLM after {steps} REC-only steps on {label}", final, test[2]))

    lines += ["", "| LLM trained on | " + " | ".join(f"step {s}" for s, _ in curves[label]) + " |"]
    lines.append("|---|" + "---:|" * len(curves[label]))
    for label, curve in curves.items():
        lines.append(f"| {label} | " + " | ".join(f"{100 * a:.1f}" for _, a in curve) + " |")
    table = "\n".join(lines)
    (out / f"{args.name}.md").write_text(table + "\n")

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, curve in curves.items():
        ax.plot(*zip(*[(s, 100 * a) for s, a in curve]), marker="o", label=f"LLM trained on {label}")
    for (name, (right, _)), style in zip(probes.items(), ("--", ":", "-.")):
        ax.axhline(100 * right.float().mean().item(), color="grey", linestyle=style, label=name)
    ax.set_xlabel("REC-only training steps")
    ax.set_ylabel("x1 tenths accuracy, held-out 1-4-object rows (%)")
    ax.set_title("Tiny COMM: reading a box vs binding a phrase to an object")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{args.name}.png", dpi=120)
    print(table)


if __name__ == "__main__":
    main()
