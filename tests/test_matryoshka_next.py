"""Matryoshka-LLaVA-NeXT against its references: transformers' `LlavaNextForConditionalGeneration` (full scale, bit for
bit), the official M3 code's per-tile pooling and packing (written out here from `llava_arch.py`), transformers'
`LlavaNextProcessor` (placeholder counts), and the all-scale objective against per-scale losses."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

from comm_vlm.families import anyres_image_processor, family_processor
from comm_vlm.models.configuration_matryoshka_next import (
    MatryoshkaLlavaNextConfig,
    anyres_tile_grid,
    official_unpadded_grid,
    unpadded_grid,
)
from comm_vlm.models.modeling_matryoshka_next import MatryoshkaLlavaNextForConditionalGeneration, pool_tiles
from comm_vlm.models.processing_matryoshka_next import frames_to_grid_image
from comm_vlm.testing import (
    CHAT_TEMPLATE,
    IMAGE_TOKEN_ID,
    TINY_GRID_PINPOINTS,
    build_tiny_tokenizer,
    tiny_image_processor,
    tiny_next_config,
)
from comm_vlm.training import TrainingBatchCollator


GRID_3X3 = TINY_GRID_PINPOINTS + [[84, 84], [56, 84], [84, 56]]  # adds 3x3, 2x3 and 3x2 tile canvases
# (height, width): square, wide, tall, very wide/tall, and sizes whose canvases need unpadding on either axis
SIZES = [(56, 56), (40, 70), (70, 40), (30, 100), (100, 30), (90, 90), (61, 47), (25, 160)]
PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def picture(size, seed=0) -> Image.Image:
    height, width = size
    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype("uint8"))


def pair(pinpoints, seed=0):
    """Transformers' LLaVA-NeXT and ours on the same random weights, with our processor."""
    torch.manual_seed(seed)
    reference = LlavaNextForConditionalGeneration(tiny_next_config(next_class=True, image_grid_pinpoints=pinpoints))
    config = tiny_next_config(image_grid_pinpoints=pinpoints)
    model = MatryoshkaLlavaNextForConditionalGeneration(config)
    with torch.no_grad():  # random everywhere, so that a token in the wrong place changes the logits
        for param in reference.parameters():
            param.copy_(torch.randn_like(param) * 0.2)
    model.load_state_dict(reference.state_dict())
    processor = family_processor("matryoshka_llava_next", config, tiny_image_processor(28), build_tiny_tokenizer())
    return reference.eval(), model.eval(), processor


@pytest.fixture(scope="module", params=[TINY_GRID_PINPOINTS, GRID_3X3], ids=["2x2", "3x3"])
def models(request):
    return pair(request.param)


# --- full scale == transformers' LLaVA-NeXT ------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_full_scale_equals_llava_next_bit_for_bit(models, size):
    reference, model, processor = models
    inputs = processor(images=picture(size), text=PROMPT, return_tensors="pt")
    reference_processor = LlavaNextProcessor(
        processor.image_processor,
        processor.tokenizer,
        patch_size=7,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, as llava-hf's processors set it
    )
    reference_inputs = reference_processor(images=picture(size), text=PROMPT, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], reference_inputs["input_ids"])  # the same placeholders as transformers
    assert torch.equal(inputs["pixel_values"], reference_inputs["pixel_values"])
    with torch.no_grad():
        expected = reference(**reference_inputs).logits
        got = model(**inputs).logits
    assert torch.equal(got, expected), (got - expected).abs().max()
    greedy = {"max_new_tokens": 6, "do_sample": False}
    assert torch.equal(model.generate(**inputs, **greedy), reference.generate(**reference_inputs, **greedy))


def test_full_scale_equals_llava_next_on_a_batch_of_sizes(models):
    reference, model, processor = models
    images = [picture(size, seed) for seed, size in enumerate(SIZES[:4])]
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=images, text=[PROMPT] * 4, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = reference(**{k: v for k, v in inputs.items() if k != "matryoshka_image_scales"}).logits
        assert torch.equal(model(**inputs).logits, expected)


# --- per-tile pooling and packing == the official code --------------------------------------------------------------


def official_pool(features, scale):
    """`matryoshka_vis_token_process` of mu-cai/matryoshka-mm `llava_arch.py`: (N, H*W, C) -> view (N, H, W, C) ->
    (N, C, H, W) -> avg_pool2d(kernel = stride = sqrt(H*W / S)) -> (N, S, C)."""
    n, hw, c = features.shape
    side = int(hw**0.5)
    grid = features.view(n, side, side, c).permute(0, 3, 1, 2)
    kernel = int(np.sqrt(hw / scale))
    return F.avg_pool2d(grid, kernel_size=kernel, stride=kernel).permute(0, 2, 3, 1).reshape(n, -1, c)


def official_pack(features, image_size_wh, pinpoints, tile_px, newline, unpad=official_unpadded_grid):
    """`prepare_inputs_labels_for_multimodal`'s anyres/spatial_unpad branch for one image (base view first, then the
    pooled tiles' map, unpadded, a newline per row). `unpad` chooses the rounding (see the module of the config)."""
    base, tiles = features[0], features[1:]
    side = int(np.sqrt(base.shape[0]))
    width, height = image_size_wh
    rows, cols = anyres_tile_grid((height, width), pinpoints, tile_px)
    grid = tiles.view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
    keep_h, keep_w = unpad(height, width, rows * side, cols * side)
    top, left = (rows * side - keep_h) // 2, (cols * side - keep_w) // 2
    grid = grid[:, top : top + keep_h, left : left + keep_w]
    grid = torch.cat((grid, newline[:, None, None].expand(*grid.shape[:-1], 1)), dim=-1)
    return torch.cat((base, grid.flatten(1, 2).transpose(0, 1)), dim=0)


@pytest.mark.parametrize("scale", [1, 4, 9, 16, 36, 64, 144, 576])
def test_tile_pooling_equals_the_official_pooling_per_tile(scale):
    tiles = torch.randn(5, 576, 48)  # a base view + 2x2 tiles of a 24x24 grid
    assert torch.allclose(pool_tiles(tiles, scale), official_pool(tiles, scale), rtol=0, atol=1e-6)
    for k in range(5):  # each tile alone gives its own rows: pooling never mixes tiles
        assert torch.allclose(pool_tiles(tiles[k : k + 1], scale)[0], official_pool(tiles, scale)[k], atol=1e-6)


@pytest.mark.parametrize("size", SIZES)
def test_image_features_at_every_scale_equal_the_official_pooling_and_packing(models, size):
    _, model, processor = models
    config = model.config
    inputs = processor(images=picture(size), text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        tiles, _ = model.model.encode_tiles(inputs["pixel_values"], inputs["image_sizes"])
        for scale in config.matryoshka_scales:
            features = model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], matryoshka_scale=scale)
            height, width = size
            expected = official_pack(
                official_pool(tiles[0], scale),
                (width, height),  # the official code reads PIL's (W, H)
                config.image_grid_pinpoints,
                28,
                model.model.image_newline,
                unpad=unpadded_grid,  # the rounding rule we follow (identical to truncation for most sizes)
            )
            assert torch.allclose(features.pooler_output[0], expected, atol=1e-6)
            assert features.pooler_output[0].shape[0] == processor.num_image_tokens(size, scale)
            assert features.pooler_output[0].shape[0] == config.num_image_tokens(size, scale)


def test_processor_counts_agree_with_the_model_packing_for_many_sizes():
    for pinpoints in (TINY_GRID_PINPOINTS, GRID_3X3):
        config = tiny_next_config(image_grid_pinpoints=pinpoints)
        processor = family_processor("matryoshka_llava_next", config, tiny_image_processor(28), build_tiny_tokenizer())
        model = MatryoshkaLlavaNextForConditionalGeneration(config).eval()
        for height, width in np.random.default_rng(0).integers(8, 400, size=(60, 2)).tolist():
            rows, cols = anyres_tile_grid((height, width), pinpoints, 28)
            tiles = [torch.randn(1 + rows * cols, 16, 64)]
            sizes = torch.tensor([[height, width]])
            for scale in config.matryoshka_scales:
                side = math.isqrt(scale)
                keep_h, keep_w = unpadded_grid(height, width, rows * side, cols * side)
                plain, _ = model.model.pack_image_features([pool_tiles(tiles[0], scale)], sizes, None, None)
                assert plain[0].shape[0] == scale + keep_h * keep_w
                with torch.no_grad():
                    packed = model.model.pooled_features(tiles, sizes, [scale])[0]
                assert packed.shape[0] == scale + keep_h * (keep_w + 1)
                assert packed.shape[0] == processor.num_image_tokens((height, width), scale)
                assert packed.shape[0] == config.num_image_tokens((height, width), scale)


def test_rounding_rule_differs_from_the_official_truncation_only_where_documented():
    # the examples of configuration_matryoshka_next's docstring, on LLaVA-NeXT's real 336 px pinpoints
    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    rows, cols = anyres_tile_grid((618, 1339), pinpoints, 336)
    assert unpadded_grid(618, 1339, rows * 6, cols * 6) == (6, 14)
    assert official_unpadded_grid(618, 1339, rows * 6, cols * 6) == (6, 12)
    rows, cols = anyres_tile_grid((107, 107), pinpoints, 336)
    assert (unpadded_grid(107, 107, rows, cols), official_unpadded_grid(107, 107, rows, cols)) == ((1, 2), (1, 0))
    # at the full 24x24 grid the two rules agree on a sweep of sizes
    for height in range(200, 1400, 37):
        for width in range(200, 1400, 41):
            rows, cols = anyres_tile_grid((height, width), pinpoints, 336)
            assert unpadded_grid(height, width, rows * 24, cols * 24) == official_unpadded_grid(
                height, width, rows * 24, cols * 24
            )


# --- the scale per request ------------------------------------------------------------------------------------------


def test_generate_relays_the_prompt_to_the_requested_scale(models):
    _, model, processor = models
    image = picture((40, 70))
    full = processor(images=image, text=PROMPT, return_tensors="pt")
    greedy = {"max_new_tokens": 5, "do_sample": False}
    for scale in model.config.matryoshka_scales:
        at_scale = processor(images=image, text=PROMPT, matryoshka_scale=scale, return_tensors="pt")
        assert int(at_scale["matryoshka_image_scales"][0]) == scale
        direct = model.generate(**at_scale, **greedy)[:, at_scale["input_ids"].shape[1] :]
        relaid = model.generate(**full, matryoshka_scale=scale, **greedy)
        assert torch.equal(relaid[:, : full["input_ids"].shape[1]], full["input_ids"])  # the caller's prompt
        assert torch.equal(relaid[:, full["input_ids"].shape[1] :], direct)
    small = processor(images=image, text=PROMPT, matryoshka_scale=1, return_tensors="pt")
    small.pop("matryoshka_image_scales")  # the scale is found from the placeholders
    with torch.no_grad():
        assert torch.equal(model(**small).logits, model(**small, matryoshka_scale=1).logits)


def test_scales_differ_and_wrong_placeholders_are_refused(models):
    _, model, processor = models
    inputs = processor(images=picture((40, 70)), text=PROMPT, matryoshka_scale=4, return_tensors="pt")
    with torch.no_grad():
        with pytest.raises(ValueError, match="Image features and image tokens do not match"):
            model(**{**inputs, "matryoshka_image_scales": torch.tensor([16])})
        inputs.pop("matryoshka_image_scales")
        broken = torch.cat([inputs["input_ids"], torch.tensor([[IMAGE_TOKEN_ID]])], dim=1)
        with pytest.raises(ValueError, match="which no single scale gives"):
            model(input_ids=broken, pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    with pytest.raises(ValueError, match="cannot be produced from the 4x4"):
        processor(images=picture((40, 70)), text=PROMPT, matryoshka_scale=9)
    with pytest.raises(ValueError, match="must be an integer"):
        model.generate(**inputs, matryoshka_scale=2.0)


def test_visual_token_budget_picks_the_largest_scale_that_fits_per_prompt(models):
    _, model, processor = models
    images = [picture((40, 70), 1), picture((90, 30), 2)]
    text = ["USER: <image>\nA? ASSISTANT:", "USER: <image> and <image>\nB? ASSISTANT:"]
    three = [images[0], images[0], images[1]]
    need = {s: [processor.num_image_tokens((im.height, im.width), s) for im in three] for s in (1, 4, 16)}
    budget = need[4][1] + need[4][2]  # the second prompt fits 4 per tile, not 16; the first fits 16 if it can
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=three, text=text, visual_token_budget=budget, padding=True, return_tensors="pt")
    first = 16 if need[16][0] <= budget else 4
    assert inputs["matryoshka_image_scales"].tolist() == [first, 4, 4]
    full = processor(images=three, text=text, padding=True, return_tensors="pt")
    greedy = {"max_new_tokens": 4, "do_sample": False}
    out = model.generate(**full, visual_token_budget=budget, **greedy)[:, full["input_ids"].shape[1] :]
    assert torch.equal(out, model.generate(**inputs, **greedy)[:, inputs["input_ids"].shape[1] :])
    with pytest.raises(ValueError, match="cannot hold"):
        processor(images=three, text=text, visual_token_budget=need[1][1] + need[1][2] - 1)
    with pytest.raises(ValueError, match="cannot hold"):
        model.generate(**full, visual_token_budget=need[1][0] - 1, **greedy)


# --- training: the mean over scales -------------------------------------------------------------------------------


def test_loss_is_the_mean_of_the_per_scale_losses_and_trains_every_part(models):
    _, model, processor = models
    image = picture((40, 70))
    text = PROMPT + " a red square"
    inputs = processor(images=image, text=text, return_tensors="pt")
    labels = inputs["input_ids"].clone()
    model.train()
    try:
        output = model(**inputs, labels=labels)
        without_scales = model(**{k: v for k, v in inputs.items() if k != "matryoshka_image_scales"}, labels=labels)
        torch.testing.assert_close(output.loss, without_scales.loss)
        per_scale = []
        for scale in model.config.matryoshka_scales:
            at = processor(images=image, text=text, matryoshka_scale=scale, return_tensors="pt")
            per_scale.append(model(**at, labels=at["input_ids"].clone(), matryoshka_scale=scale).loss)
        torch.testing.assert_close(output.matryoshka_scale_losses, torch.stack(per_scale).detach())
        torch.testing.assert_close(output.loss, torch.stack(per_scale).mean())
        assert output.logits.shape[1] == inputs["input_ids"].shape[1]  # the logits of the input's own scale
        output.loss.backward()
        grads = {name.split(".")[1] for name, p in model.named_parameters() if p.grad is not None and p.grad.any()}
        assert {"vision_tower", "multi_modal_projector", "language_model", "image_newline"} <= grads
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_a_batch_relaid_for_all_scales_gives_the_same_objective_outside_the_model(models):
    _, model, processor = models
    images = [picture((40, 70), 1), picture((90, 30), 2)]
    text = [PROMPT + " a red square", "USER: <image>\nWhere? ASSISTANT: left"]
    processor.tokenizer.padding_side = "right"
    batch = dict(processor(images=images, text=text, padding=True, return_tensors="pt"))
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    relaid = TrainingBatchCollator(lambda rows: rows[0], model.config)([batch])
    assert relaid["input_ids"].shape[0] == 2 * len(model.config.matryoshka_scales)
    assert relaid["matryoshka_image_index"].tolist() == [0, 0, 0, 1, 1, 1]
    assert relaid["matryoshka_image_scales"].tolist() == [1, 4, 16, 1, 4, 16]
    model.train()
    try:
        with torch.no_grad():
            expected = model(**batch).loss  # the model's own loop over the scales
            call = {k: v for k, v in relaid.items() if k != "labels"}
            logits = model(**call).logits[:, :-1]
        targets = relaid["labels"][:, 1:]
        token_mean = F.cross_entropy(logits[targets != -100], targets[targets != -100])
        torch.testing.assert_close(token_mean, expected)  # same labelled tokens at every scale: mean of the means
        unprepared = {k: v for k, v in batch.items() if k != "labels"}
        with pytest.raises(ValueError, match="not re-laid for its scales"):
            model(**unprepared)
    finally:
        model.eval()


def test_image_placeholders_are_never_targets(models):
    _, model, processor = models
    inputs = processor(images=picture((40, 70)), text=PROMPT + " yes", matryoshka_scale=4, return_tensors="pt")
    labels = inputs["input_ids"].clone()
    with torch.no_grad():
        loss = model(**inputs, labels=labels).loss
        masked = labels.masked_fill(labels == IMAGE_TOKEN_ID, -100)
        assert torch.equal(loss, model(**inputs, labels=masked).loss)


# --- video ----------------------------------------------------------------------------------------------------------


def test_video_frames_become_one_three_by_two_picture():
    frames = np.stack([np.full((10, 16, 3), 20 * t, dtype=np.uint8) for t in range(13)])  # frame t is grey 20*t
    grid = np.asarray(frames_to_grid_image(frames))
    assert grid.shape == (30, 32, 3)  # 3 rows x 2 columns of 10 x 16 frames
    step = 13 // 6  # frames 0, 2, 4, 6, 8, 10
    for k in range(6):
        row, col = divmod(k, 2)
        assert (grid[row * 10 : (row + 1) * 10, col * 16 : (col + 1) * 16] == 20 * step * k).all()
    mixed = [Image.new("RGB", (20, 12), "red"), Image.new("RGB", (16, 10), "blue")] * 3
    assert frames_to_grid_image(mixed).size == (32, 30)  # resized to the smallest frame
    assert frames_to_grid_image(frames[:3]).size == (32, 20)  # 3 frames: 2 per row, a white cell fills the last row
    with pytest.raises(ValueError, match="no frames"):
        frames_to_grid_image([])


def test_a_video_goes_through_the_single_image_anyres_path(models):
    _, _, processor = models
    frames = (np.random.default_rng(3).random((24, 20, 30, 3)) * 255).astype("uint8")
    video = processor(videos=[frames], text=PROMPT, matryoshka_scale=1, return_tensors="pt")
    image = processor(images=frames_to_grid_image(frames), text=PROMPT, matryoshka_scale=1, return_tensors="pt")
    for key in ("input_ids", "pixel_values", "image_sizes", "matryoshka_image_scales"):
        assert torch.equal(video[key], image[key])
    with pytest.raises(ValueError, match="either images or videos"):
        processor(images=picture((40, 70)), videos=[frames], text=PROMPT)


# --- configuration ------------------------------------------------------------------------------------------------


def test_config_defaults_follow_llava_next_and_refuse_bad_fields():
    config = MatryoshkaLlavaNextConfig()
    assert config.matryoshka_scales == [1, 9, 36, 144, 576] and config.matryoshka_default_scale == 576
    assert config.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    # a 672x672 image: 2x2 tiles, no unpadding: 576 base + 48 rows x 49 = 2928 at the full scale, 9 + 6 x 7 at 9
    assert config.num_image_tokens((672, 672)) == 576 + 48 * 49
    assert config.num_image_tokens((672, 672), 9) == 9 + 6 * 7
    with pytest.raises(ValueError, match="keeps the CLS token"):
        MatryoshkaLlavaNextConfig(vision_feature_select_strategy="full")
    with pytest.raises(ValueError, match="not a trained scale"):
        MatryoshkaLlavaNextConfig(matryoshka_scales=[9, 576], matryoshka_default_scale=36)
    with pytest.raises(ValueError, match="not multiples of the tile size"):
        MatryoshkaLlavaNextConfig(image_grid_pinpoints=[[336, 600]])
    with pytest.raises(ValueError, match="cannot be produced"):
        MatryoshkaLlavaNextConfig(matryoshka_scales=[5])


def test_an_anyres_processor_keeps_its_settings():
    config = tiny_next_config()
    image_processor = anyres_image_processor(config, tiny_image_processor(28))
    assert image_processor.image_grid_pinpoints == TINY_GRID_PINPOINTS
    assert anyres_image_processor(config, image_processor) is image_processor
    processor = family_processor(
        "matryoshka_llava_next", config, image_processor, build_tiny_tokenizer(), CHAT_TEMPLATE
    )
    assert processor.matryoshka_scales == [1, 4, 16] and processor.patch_size == 7


# --- the learned "auto" scale ----------------------------------------------------------------------------------------


def test_auto_scale_picks_per_image_and_equals_the_chosen_fixed_scales(tmp_path):
    from comm_vlm.models.scale_selector_matryoshka import auto_image_scales
    from comm_vlm.testing import build_tiny_checkpoint

    model, processor = build_tiny_checkpoint(
        tmp_path, family="matryoshka_llava_next", matryoshka_scale_selector={"width": 16, "margin": 0.0}
    )
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a spread-out random selector, so that images and prompts get different scales
        for param in model.scale_selector.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 2.0)
    model.save_pretrained(tmp_path)
    model.eval()
    processor.tokenizer.padding_side = "left"
    sizes = [(40, 70), (70, 40), (56, 56), (30, 90), (90, 30), (50, 50)]
    prompts = [PROMPT, "USER: <image>\nHow many circles? ASSISTANT:", "USER: <image>\nIs it red? ASSISTANT:"] * 2
    images = [picture(size, seed) for seed, size in enumerate(sizes)]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        tiles, _ = model.model.encode_tiles(inputs["pixel_values"], inputs["image_sizes"])
        base = torch.stack([t[0] for t in tiles])
    chosen = auto_image_scales(model, inputs["input_ids"], inputs["attention_mask"], base, [1] * len(images))
    assert len(set(chosen)) > 1, chosen  # the test needs images at different scales
    out = model.generate(**inputs, matryoshka_scale="auto", **{"max_new_tokens": 4, "do_sample": False})
    for k, scale in enumerate(chosen):
        single = processor(images=images[k], text=prompts[k], matryoshka_scale=scale, return_tensors="pt")
        expected = model.generate(**single, max_new_tokens=4, do_sample=False)[:, single["input_ids"].shape[1] :]
        assert torch.equal(out[k : k + 1, inputs["input_ids"].shape[1] :], expected)
    by_processor = processor(images=images, text=prompts, padding=True, matryoshka_scale="auto", return_tensors="pt")
    assert by_processor["matryoshka_scale"] == "auto"
    reloaded = MatryoshkaLlavaNextForConditionalGeneration.from_pretrained(tmp_path).eval()
    again = reloaded.generate(**by_processor, max_new_tokens=4, do_sample=False)
    assert torch.equal(again, out)
    with pytest.raises(ValueError, match="Call `model.generate"):
        model(**by_processor)
    with pytest.raises(ValueError, match="needs a learned scale selector"):
        pair(TINY_GRID_PINPOINTS)[1].generate(**inputs, matryoshka_scale="auto", max_new_tokens=2)
