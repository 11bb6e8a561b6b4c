"""assemble_comm: real `from_pretrained` of encoders and LLM from local directories, offline."""

import torch
from PIL import Image
from transformers import AutoModel, CLIPVisionConfig, Dinov2Config, LlamaConfig, LlamaForCausalLM, pipeline

from comm_vlm.assemble import assemble_comm
from comm_vlm.testing import build_tiny_tokenizer, tiny_image_processor, tiny_text_config, tiny_vision_config


def _fields(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "model_type"}


def test_assemble_from_local_parts(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    clip = AutoModel.from_config(CLIPVisionConfig(**_fields(tiny_vision_config())))
    clip.save_pretrained(tmp_path / "clip")
    tiny_image_processor(28).save_pretrained(tmp_path / "clip")
    dino = AutoModel.from_config(Dinov2Config(**_fields(tiny_vision_config("dinov2"))))
    dino.save_pretrained(tmp_path / "dino")
    tokenizer = build_tiny_tokenizer(with_image_token=False)  # a published LLM knows no <image> token
    assert "<image>" not in tokenizer.get_vocab()
    llm = LlamaForCausalLM(LlamaConfig(**_fields(tiny_text_config(len(tokenizer))))).eval()
    llm.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")

    model, processor = assemble_comm(
        vision=tmp_path / "clip",
        secondary_vision=tmp_path / "dino",
        text=tmp_path / "llm",
        vision_feature_layer=[1, 2, 3, 4],
        secondary_vision_feature_layer=[3, 4],
    )
    for ours, theirs in ((model.model.vision_tower, clip), (model.model.secondary_vision_tower, dino)):
        theirs_state = theirs.state_dict()
        for name, tensor in ours.state_dict().items():
            assert torch.equal(tensor, theirs_state[name]), name
    assert model.config.text_config.vocab_size == len(tokenizer) + 1
    assert model.config.image_token_id == processor.image_token_id == len(tokenizer)
    ids = torch.tensor([[1, 10, 11, 12]])
    with torch.no_grad():
        ours_logits = model(input_ids=ids).logits
        torch.testing.assert_close(ours_logits[..., : len(tokenizer)], llm(input_ids=ids).logits)

    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    out = pipe(images=Image.new("RGB", (30, 30), "red"), text="USER: <image>\nHi ASSISTANT:", max_new_tokens=3)
    assert isinstance(out[0]["generated_text"], str)


def test_assemble_matryoshka_llava_next_from_local_parts(tmp_path, monkeypatch):
    from comm_vlm.testing import TINY_GRID_PINPOINTS

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    clip = AutoModel.from_config(CLIPVisionConfig(**_fields(tiny_vision_config())))
    clip.save_pretrained(tmp_path / "clip")
    tiny_image_processor(28).save_pretrained(tmp_path / "clip")
    tokenizer = build_tiny_tokenizer(with_image_token=False)
    LlamaForCausalLM(LlamaConfig(**_fields(tiny_text_config(len(tokenizer))))).save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    parts = dict(vision=tmp_path / "clip", text=tmp_path / "llm", family="matryoshka_llava_next")
    model, processor = assemble_comm(**parts, image_grid_pinpoints=TINY_GRID_PINPOINTS)
    clip_state = clip.state_dict()
    assert all(torch.equal(t, clip_state[n]) for n, t in model.model.vision_tower.state_dict().items())
    assert not model.model.image_newline.is_meta and model.model.image_newline.abs().sum() > 0  # initialised
    assert processor.image_processor.image_grid_pinpoints == TINY_GRID_PINPOINTS
    inputs = processor(
        images=Image.new("RGB", (70, 40), "red"),
        text="USER: <image>\nHi ASSISTANT:",
        matryoshka_scale=4,
        return_tensors="pt",
    )
    assert model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 3
    try:
        assemble_comm(**parts, secondary_vision=tmp_path / "clip")
    except ValueError as err:
        assert "one vision encoder" in str(err)
    else:
        raise AssertionError("a second encoder was accepted")
