"""Hub-native use, per model type: pipeline == generate, model cards, save_for_hub / push_to_hub, the Hub cache.

`FAMILIES` is the table every Hub test runs over (also imported by test_remote_code.py).
"""

import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, constants
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

from comm_vlm import AdaptiveCombinerConfig, MatryoshkaLlavaConfig
from comm_vlm.families import family_processor
from comm_vlm.hub import (
    ModelCardInfo,
    add_to_hub_cache,
    check_remote_code,
    push_to_hub,
    render_model_card,
    save_for_hub,
)
from comm_vlm.serving import parse_pipeline_boxes
from comm_vlm.testing import (
    CHAT_TEMPLATE,
    IMAGE_TOKEN_ID,
    build_tiny_tokenizer,
    tiny_comm_config,
    tiny_image_processor,
    tiny_next_config,
    tiny_text_config,
    tiny_vision_config,
)


# model type -> (tiny config factory, image placeholders per image, processor call kwargs for a non-default setting)
FAMILIES = {
    "comm": (lambda: tiny_comm_config("comm"), 16, {}),
    "matryoshka_llava": (
        lambda: MatryoshkaLlavaConfig(
            vision_config=tiny_vision_config(), text_config=tiny_text_config(320), image_token_index=IMAGE_TOKEN_ID
        ),
        16,
        {"matryoshka_scale": 4},
    ),
    "adaptive_combiner": (
        lambda: AdaptiveCombinerConfig.from_comm_config(
            tiny_comm_config("llava"), combiner_num_latents=4, combiner_iterations=2
        ),
        4,
        {},
    ),
    # anyres tiles: the placeholders depend on the image size (the processor counts them)
    "matryoshka_llava_next": (lambda: tiny_next_config(), None, {"matryoshka_scale": 4}),
}
PROMPTS = ["USER: <image>\nWhat is this? ASSISTANT:", "USER: <image>\nWhere is the cat in the picture? ASSISTANT:"]
GREEDY = {"do_sample": False}


TINY_COMM = str(Path(__file__).parent / "recipes" / "tiny_comm.yaml")  # a random tiny COMM, both stages


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one intra-op thread (several thrash when the CPU is shared); restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@functools.cache
def build_family(model_type: str):
    """A tiny random model of `model_type` (through the Auto classes) and its registered processor."""
    make_config, num_image_tokens, _ = FAMILIES[model_type]
    config = make_config()
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).eval()
    with torch.no_grad():  # random everywhere (open combiner gates too) so the answers differ between inputs
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * 0.1 + (1.0 if "norm" in name and "weight" in name else 0.0))
            if name.endswith("_gate"):
                param.fill_(0.7)
    if num_image_tokens is None:
        return model, family_processor(model_type, config, tiny_image_processor(28), build_tiny_tokenizer())
    processor_class = PROCESSOR_MAPPING[type(config)]
    processor = processor_class(
        tiny_image_processor(28),
        build_tiny_tokenizer(),
        num_image_tokens=num_image_tokens,
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor


def image(seed: int = 0, size=(40, 50)) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((*size, 3)) * 255).astype("uint8"))


def chat(seed: int, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image(seed)}, {"type": "text", "text": question}]}]


def generate_and_decode(model, processor, inputs, **generate_kwargs) -> list[str]:
    ids = model.generate(**inputs, **generate_kwargs)[:, inputs["input_ids"].shape[1] :]
    return [processor.decode(row, skip_special_tokens=True) for row in ids]


# --- pipeline == generate + decode, per model type ---------------------------------------------------------------


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_pipeline_plain_prompts_single_and_batched_equal_generate(model_type):
    model, processor = build_family(model_type)
    pipe = pipeline("image-text-to-text", model=model, processor=processor)

    def kwargs():  # the pipeline writes max_new_tokens into generate_kwargs: a fresh dict per call
        return {
            "max_new_tokens": 6,
            "generate_kwargs": {**GREEDY, "repetition_penalty": 1.3},
            "return_full_text": False,
        }

    single = pipe(images=image(0), text=PROMPTS[0], **kwargs())
    inputs = processor(images=image(0), text=PROMPTS[0], return_tensors="pt")
    assert [r["generated_text"] for r in single] == generate_and_decode(
        model, processor, inputs, max_new_tokens=6, repetition_penalty=1.3, **GREEDY
    )
    batched = pipe(images=[image(0), image(1)], text=PROMPTS, **kwargs())  # one padded batch
    inputs = processor(images=[image(0), image(1)], text=PROMPTS, return_tensors="pt", padding=True)
    assert inputs["attention_mask"].min() == 0  # the rows differ in length: left padding is exercised
    expected = generate_and_decode(model, processor, inputs, max_new_tokens=6, repetition_penalty=1.3, **GREEDY)
    assert [r["generated_text"] for r in batched] == expected
    full = pipe(images=image(0), text=PROMPTS[0], max_new_tokens=6, generate_kwargs=dict(GREEDY))[0]["generated_text"]
    assert full.startswith(PROMPTS[0])


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_pipeline_chats_single_and_batched_equal_generate(model_type):
    model, processor = build_family(model_type)
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    chats = [chat(0, "What is this?"), chat(1, "Where is the cat in it?")]
    gen = {"max_new_tokens": 5, "min_new_tokens": 5, **GREEDY}
    outputs = pipe(text=chats, batch_size=2, generate_kwargs=dict(gen))
    template = {"add_generation_prompt": True, "tokenize": True, "return_dict": True, "return_tensors": "pt"}
    inputs = processor.apply_chat_template(chats, padding=True, **template)
    expected = generate_and_decode(model, processor, inputs, **gen)
    answers = [out[0]["generated_text"][-1] for out in outputs]
    assert [a["role"] for a in answers] == ["assistant", "assistant"]
    assert [a["content"] for a in answers] == expected
    single = pipe(text=chats[1], generate_kwargs=dict(gen))[0]["generated_text"][-1]["content"]
    inputs = processor.apply_chat_template(chats[1], **template)
    assert [single] == generate_and_decode(model, processor, inputs, **gen)


@pytest.mark.parametrize("model_type", [t for t in sorted(FAMILIES) if FAMILIES[t][2]])
def test_pipeline_family_setting_per_request(model_type):
    """The family's per-request setting (the Matryoshka scale) goes through the pipeline, plain and chat."""
    model, processor = build_family(model_type)
    call_kwargs = FAMILIES[model_type][2]  # the pipeline writes into processor_kwargs: pass copies
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    out = pipe(
        images=image(2),
        text=PROMPTS[0],
        max_new_tokens=5,
        generate_kwargs=dict(GREEDY),
        return_full_text=False,
        **call_kwargs,
    )[0]["generated_text"]
    inputs = processor(images=image(2), text=PROMPTS[0], return_tensors="pt", **call_kwargs)
    assert [out] == generate_and_decode(model, processor, inputs, max_new_tokens=5, **GREEDY)
    default = processor(images=image(2), text=PROMPTS[0], return_tensors="pt")
    assert inputs["input_ids"].shape != default["input_ids"].shape  # the setting changed the visual tokens
    answer = pipe(
        text=chat(2, "Hi?"), max_new_tokens=4, generate_kwargs=dict(GREEDY), processor_kwargs=dict(call_kwargs)
    )
    inputs = processor.apply_chat_template(
        chat(2, "Hi?"),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs=dict(call_kwargs),
    )
    assert [answer[0]["generated_text"][-1]["content"]] == generate_and_decode(
        model, processor, inputs, max_new_tokens=4, **GREEDY
    )


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_pipeline_boxes_from_a_grounding_answer(model_type):
    """An assistant prefill holding a box: the answer's box comes back parsed, the question's box does not."""
    model, processor = build_family(model_type)
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    messages = chat(0, "What is at [0.100,0.100,0.200,0.200]?") + [
        {"role": "assistant", "content": [{"type": "text", "text": "The cat is at [0.120,0.305,0.451,0.622]"}]}
    ]
    outputs = parse_pipeline_boxes(
        pipe(text=[messages, messages], batch_size=2, max_new_tokens=3, generate_kwargs=dict(GREEDY))
    )
    for out in outputs:
        assert out[0]["boxes"] == [(0.12, 0.305, 0.451, 0.622)]
        assert out[0]["generated_text"][-1]["content"][-1]["text"].startswith(
            "The cat is at [0.120,0.305,0.451,0.622]"
        )


def test_parse_pipeline_boxes_shapes_and_errors():
    plain = {
        "input_text": "Where is [0.1,0.1,0.2,0.2]?",
        "generated_text": "Where is [0.1,0.1,0.2,0.2]? At [0,0,0.5,1]",
    }
    new_text = {"input_text": "Where?", "generated_text": "at [0.1,0.2,0.3,0.4;0.5,0.5,0.6,0.7] and [0.9,0.1,0.2]"}
    chat_out = {"generated_text": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "none"}]}
    result = parse_pipeline_boxes([[plain], [new_text, chat_out]])
    assert plain["boxes"] == [(0.0, 0.0, 0.5, 1.0)] and plain["box_errors"] == []
    assert new_text["boxes"] == [(0.1, 0.2, 0.3, 0.4), (0.5, 0.5, 0.6, 0.7)] and len(new_text["box_errors"]) == 1
    assert chat_out["boxes"] == [] and result[1][1] is chat_out
    with pytest.raises(ValueError, match="pipeline outputs"):
        parse_pipeline_boxes("text")


# --- model cards ------------------------------------------------------------------------------------------------

CARD_INFO = ModelCardInfo(
    repo_id="comm-vlm-test/tiny-comm",
    base_model=["openai/clip-vit-large-patch14-336", "facebook/dinov2-large", "lmsys/vicuna-7b-v1.5"],
    datasets=["liuhaotian/LLaVA-Instruct-150K"],
    training=[
        {
            "stage": "comm_pretrain",
            "data": "data/stage1.json (llava)",
            "trainable": ["merges", "aligners", "llm"],
            "hyperparameters": {"learning_rate": 2e-5, "lr_scheduler_type": "cosine"},
        },
        {"stage": "comm_instruct", "data": ["llava_instruct_150k.json (weight 0.5)", "shikra_rd.jsonl (weight 0.5)"]},
    ],
    eval_results=[
        {
            "task_type": "visual-question-answering",
            "dataset_type": "HuggingFaceM4/VQAv2",
            "dataset_name": "VQAv2",
            "dataset_split": "validation",
            "metric_type": "accuracy",
            "metric_value": 79.05,
        },
        {
            "task_type": "image-to-text",
            "dataset_type": "nlphuji/flickr30k",
            "dataset_name": "Flickr30k",
            "metric_type": "cider",
            "metric_value": 88.2,
        },
    ],
    notes=["Tiny random weights, for tests."],
    limitations=["Not trained: the answers are noise."],
)
EXPECTED_COMM_CARD_HEAD = """---
base_model:
- openai/clip-vit-large-patch14-336
- facebook/dinov2-large
- lmsys/vicuna-7b-v1.5
datasets:
- liuhaotian/LLaVA-Instruct-150K
language:
- en
library_name: transformers
license: apache-2.0
pipeline_tag: image-text-to-text
tags:
- comm-vlm
- comm
- llava
- clip
- dinov2
- multi-level-feature-merging
- image-text-to-text
- custom_code
- arxiv:2310.08825
model-index:
- name: tiny-comm
  results:
  - task:
      type: visual-question-answering
    dataset:
      name: VQAv2
      type: HuggingFaceM4/VQAv2
      split: validation
    metrics:
    - type: accuracy
      value: 79.05
  - task:
      type: image-to-text
    dataset:
      name: Flickr30k
      type: nlphuji/flickr30k
    metrics:
    - type: cider
      value: 88.2
---

# tiny-comm
"""
EXPECTED_COMM_CARD_SECTIONS = """## Architecture (from `config.json`)

| component | setting |
|---|---|
| primary encoder | `clip_vision_model`, 4 layers, width 32, 28 px, patch 7 (4x4 patches) |
| primary layers used | 1-4 (`hidden_states` indices, 0 = embeddings) |
| primary merge / aligner | `lln_layerscale` / identity |
| secondary encoder | `dinov2`, 4 layers, width 32, 28 px, patch 7 (4x4 patches) |
| secondary layers used | 3, 4 (`hidden_states` indices, 0 = embeddings) |
| secondary merge / aligner | `lln_layerscale` / mlp (2 layers, ratio 8, gelu) |
| projector | linear, to the LLM width 64 |
| language model | llama, 2 layers, width 64, vocabulary 320 |
| visual tokens per image | 16 |

## Training

### Stage 1: comm_pretrain

- data: data/stage1.json (llava)
- trained: merges, aligners, llm (everything else frozen)
- hyper-parameters: `learning_rate=2e-05`, `lr_scheduler_type=cosine`

### Stage 2: comm_instruct

- data: llava_instruct_150k.json (weight 0.5); shikra_rd.jsonl (weight 0.5)

Datasets on the Hub: liuhaotian/LLaVA-Instruct-150K.

## Evaluation

| task | dataset | split | metric | value |
|---|---|---|---|---|
| visual-question-answering | VQAv2 | validation | accuracy | 79.05 |
| image-to-text | Flickr30k |  | cider | 88.2 |

These results are also in the `model-index` metadata above.
"""
CITATIONS = {
    "comm": "arXiv:2310.08825",
    "matryoshka_llava": "arXiv:2405.17430",
    "adaptive_combiner": "arXiv:2305.19924",
    "matryoshka_llava_next": "arXiv:2405.17430",
}


def test_comm_card_snapshot_and_metadata():
    text = render_model_card(tiny_comm_config("comm"), CARD_INFO).content
    assert text.startswith(EXPECTED_COMM_CARD_HEAD)
    assert EXPECTED_COMM_CARD_SECTIONS in text
    assert "Tiny random weights, for tests." in text and "- Not trained: the answers are noise.\n" in text
    assert 'from_pretrained("comm-vlm-test/tiny-comm", trust_remote_code=True)' in text
    assert "\n\n\n" not in text and not any(line != line.rstrip() for line in text.splitlines())
    data = ModelCard(text).data  # huggingface_hub parses the metadata back
    assert data.library_name == "transformers" and data.pipeline_tag == "image-text-to-text"
    assert data.base_model == CARD_INFO.base_model and data.datasets == CARD_INFO.datasets
    assert data.model_name == "tiny-comm"
    assert [(r.dataset_name, r.metric_type, r.metric_value) for r in data.eval_results] == [
        ("VQAv2", "accuracy", 79.05),
        ("Flickr30k", "cider", 88.2),
    ]


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_card_per_model_type_cites_its_paper_and_shows_its_settings(model_type):
    config = build_family(model_type)[0].config
    card = render_model_card(config)
    text = card.content
    assert f"journal={{arXiv preprint {CITATIONS[model_type]}}}" in text
    assert f"`model_type: {model_type}`" in text
    assert "No training recipe was recorded" in text and "No evaluation results were recorded" in text
    assert "model-index" not in text and card.data.eval_results is None
    for name in ("matryoshka_scales", "combiner_num_latents"):
        assert (f"| `{name}` |" in text) == hasattr(config, name)
    assert ModelCard(text).data.tags[:2] == ["comm-vlm", model_type]
    assert "\n\n\n" not in text and not any(line != line.rstrip() for line in text.splitlines())


def test_card_errors_name_the_problem():
    with pytest.raises(ValueError, match="Unknown model-card fields \\['colour'\\]"):
        ModelCardInfo.from_dict({"colour": "red"})
    with pytest.raises(ValueError, match="metric_value"):
        render_model_card(tiny_comm_config("comm"), ModelCardInfo(eval_results=[{"task_type": "vqa"}]))
    config = tiny_comm_config("comm")
    config.model_type = "unknown_family"
    with pytest.raises(ValueError, match="method_unknown_family.md"):
        render_model_card(config)


# --- save_for_hub / push_to_hub ---------------------------------------------------------------------------------

REMOTE_CODE = {
    "comm": {
        "checkpoint_files.py",
        "configuration_comm.py",
        "feature_merging.py",
        "image_utils.py",
        "modeling_comm.py",
        "processing_comm.py",
    },
    "matryoshka_llava": {
        "configuration_matryoshka.py",
        "modeling_matryoshka.py",
        "processing_matryoshka.py",
        "scale_selector_matryoshka.py",
    },
    "adaptive_combiner": {"configuration_combiner.py", "modeling_combiner.py", "combiner.py"},
    "matryoshka_llava_next": {
        "configuration_matryoshka_next.py",
        "modeling_matryoshka_next.py",
        "processing_matryoshka_next.py",
        "pooling_matryoshka.py",
        "packing_matryoshka.py",
        "packing_matryoshka_next.py",
        "image_utils.py",
    },
}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_push_to_hub_commits_every_file_without_network(model_type, monkeypatch):
    model, processor = build_family(model_type)
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_commit(self, repo_id, operations, **kwargs):
        assert all(isinstance(op, CommitOperationAdd) for op in operations)
        calls["files"] = {op.path_in_repo: open(op.path_or_fileobj, "rb").read() for op in operations}
        calls["commit"] = (repo_id, kwargs)
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    info = push_to_hub(model, f"comm-vlm-test/tiny-{model_type}", processor, max_shard_size="200KB", private=True)
    assert info == "commit-info"
    assert calls["create_repo"] == (
        f"comm-vlm-test/tiny-{model_type}",
        {"private": True, "token": None, "exist_ok": True},
    )
    files = calls["files"]
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    index = json.loads(files["model.safetensors.index.json"])
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert len(index["weight_map"]) == len(model.state_dict())  # names may be saved in their checkpoint layout
    expected = {
        "config.json",
        "generation_config.json",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "README.md",
        "model.safetensors.index.json",
    }
    assert expected | REMOTE_CODE[model_type] <= set(files)
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)
    config = json.loads(files["config.json"])
    assert config["model_type"] == model_type and set(config["auto_map"]) == {
        "AutoConfig",
        "AutoModel",
        "AutoModelForImageTextToText",
    }
    assert json.loads(files["processor_config.json"])["auto_map"]["AutoProcessor"].startswith("processing_")
    card = ModelCard(files["README.md"].decode())
    assert card.data.pipeline_tag == "image-text-to-text" and f"comm-vlm-test/tiny-{model_type}" in card.content
    # the package's classes are left as they were: a plain save writes no remote code
    assert type(model)._auto_class is None and getattr(model.config, "auto_map", None) is None


def test_save_for_hub_local_directory_and_remote_code_check(tmp_path):
    model, processor = build_family("comm")
    files = save_for_hub(model, tmp_path / "out", processor, card=CARD_INFO)
    assert "README.md" in files and "model.safetensors" in files and REMOTE_CODE["comm"] <= set(files)
    assert ModelCard.load(tmp_path / "out" / "README.md").data.model_name == "tiny-comm"
    assert check_remote_code(tmp_path / "out") == sorted(REMOTE_CODE["comm"])
    (tmp_path / "out" / "modeling_comm.py").write_text("import yaml\nfrom .tiny import x\n")
    with pytest.raises(ValueError, match="modeling_comm.py: import yaml; modeling_comm.py: relative import of .tiny"):
        check_remote_code(tmp_path / "out")


# --- loading by repo id from a populated Hub cache, offline -----------------------------------------------------


def test_load_by_repo_id_from_the_hub_cache_offline(tmp_path, monkeypatch):
    model, processor = build_family("comm")
    save_for_hub(model, tmp_path / "ckpt", processor)
    cache = tmp_path / "hub"
    snapshot = add_to_hub_cache(tmp_path / "ckpt", "comm-vlm-test/tiny-comm", cache_dir=cache)
    repo = cache / "models--comm-vlm-test--tiny-comm"
    assert (repo / "refs" / "main").read_text() == snapshot.name and len(snapshot.name) == 40
    assert os.path.islink(snapshot / "config.json") or not hasattr(os, "symlink")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    loaded = AutoModelForImageTextToText.from_pretrained("comm-vlm-test/tiny-comm").eval()
    loaded_processor = AutoProcessor.from_pretrained("comm-vlm-test/tiny-comm")
    assert type(loaded) is type(model) and type(loaded_processor) is type(processor)
    inputs = loaded_processor(images=image(0), text=PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
    pipe = pipeline("image-text-to-text", model="comm-vlm-test/tiny-comm")
    out = pipe(text=chat(0, "What is this?"), max_new_tokens=4, generate_kwargs=dict(GREEDY))[0]["generated_text"][-1]
    inputs = processor.apply_chat_template(
        chat(0, "What is this?"), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert [out["content"]] == generate_and_decode(model, processor, inputs, max_new_tokens=4, **GREEDY)
    with pytest.raises(OSError):
        AutoModelForImageTextToText.from_pretrained("comm-vlm-test/not-in-the-cache")


def test_cli_push_to_a_local_directory_with_card_and_recipe(tmp_path, capsys):
    from comm_vlm.cli import main
    from comm_vlm.testing import build_tiny_checkpoint

    build_tiny_checkpoint(tmp_path / "ckpt", layout="llava")
    (tmp_path / "card.json").write_text(json.dumps({"base_model": ["llava-hf/llava-1.5-7b-hf"], "tags": ["tiny"]}))
    argv = ["push", str(tmp_path / "ckpt"), "me/tiny", "--local-dir", str(tmp_path / "out")]
    assert (
        main(
            [
                *argv,
                "--card",
                str(tmp_path / "card.json"),
                "--recipe",
                TINY_COMM,
            ]
        )
        == 0
    )
    assert "README.md" in capsys.readouterr().out
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == ["llava-hf/llava-1.5-7b-hf"] and "tiny" in card.data.tags
    assert "### Stage 2: comm_instruct" in card.content and "synthetic tiny data (16 samples)" in card.content
    assert 'from_pretrained("me/tiny", trust_remote_code=True)' in card.content
    (tmp_path / "bad.json").write_text(json.dumps({"licence": "mit"}))
    assert main([*argv, "--card", str(tmp_path / "bad.json")]) == 2
    assert "Unknown model-card fields ['licence']" in capsys.readouterr().err
