"""The adaptive combiner under every decoding mode of `GenerationMixin` that COMM and M3 support: beam search and
`num_return_sequences` (rows expanded with their own images), sampling, assisted decoding (an assistant model or
prompt lookup), static cache, no cache; chunked prefill is refused. Each mode is checked against a reference that
is defined without it (each row alone, the expanded batch, greedy decoding)."""

import pytest
import torch
from test_combiner_model import randomize  # random values everywhere: open gates, LayerNorm affine
from transformers.modeling_outputs import BaseModelOutputWithPooling

from comm_vlm import AdaptiveCombinerConfig, AdaptiveCombinerForConditionalGeneration
from comm_vlm.families import get_family
from comm_vlm.testing import IMAGE_TOKEN_ID, tiny_comm_config


N = 4  # fused tokens per image (the encoder gives 16 visual tokens per image)
IMG = [IMAGE_TOKEN_ID] * N
PAD = 3
NEW = 4  # new tokens per generation: enough for beams to diverge, short enough to keep the file fast


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = AdaptiveCombinerConfig.from_comm_config(
        tiny_comm_config("llava"), combiner_num_latents=N, combiner_iterations=2
    )
    return randomize(AdaptiveCombinerForConditionalGeneration(config))


# Rows with two images, one image and none: the expansion must keep every row's own group of images.
ROWS = [[1, 5] + IMG + [6] + IMG + [7, 8], [1, 9] + IMG + [10], [1, 11, 12, 13]]
IMAGES_PER_ROW = [2, 1, 0]


@pytest.fixture(scope="module")
def batch():
    """Left-padded `input_ids`/`attention_mask` of `ROWS` and their images `(3, 3, 28, 28)`, in row order."""
    length = max(map(len, ROWS))
    ids = torch.tensor([[PAD] * (length - len(r)) + r for r in ROWS])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in ROWS])
    torch.manual_seed(1)
    return ids, mask, torch.randn(sum(IMAGES_PER_ROW), 3, 28, 28)


def row_images(pixels: torch.Tensor, row: int) -> torch.Tensor:
    start = sum(IMAGES_PER_ROW[:row])
    return pixels[start : start + IMAGES_PER_ROW[row]]


def generate_row(model, pixels, row: int, **kwargs) -> torch.Tensor:
    """Row `row` generated alone (no padding); returns the new tokens `(num_sequences, NEW)`."""
    images = row_images(pixels, row)
    extra = {"pixel_values": images} if len(images) else {}
    out = model.generate(input_ids=torch.tensor([ROWS[row]]), max_new_tokens=NEW, pad_token_id=PAD, **extra, **kwargs)
    return out[:, len(ROWS[row]) :]


def generate_batch(model, batch, **kwargs) -> torch.Tensor:
    ids, mask, pixels = batch
    out = model.generate(
        input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=NEW, pad_token_id=PAD, **kwargs
    )
    return out[:, ids.shape[1] :]


# --- the expansion -----------------------------------------------------------------------------------------------


def test_expansion_repeats_each_rows_group_of_images(model, batch):
    """Images [A, B | C | -] of rows [0 | 1 | 2] become [A, B, A, B | C, C] for 2 copies per row."""
    ids, _, pixels = batch
    features = [torch.full((16, 2), float(i)) for i in range(len(pixels))]  # A, B, C
    outputs = {"image": BaseModelOutputWithPooling(last_hidden_state=torch.stack(features), pooler_output=features)}
    expanded = model._expand_multimodal_outputs(ids, outputs, expand_size=2)["image"]
    assert [int(f[0, 0]) for f in expanded.pooler_output] == [0, 1, 0, 1, 2, 2]
    assert expanded.last_hidden_state.shape == (6, 16, 2)


def test_expansion_with_placeholders_that_do_not_match_the_images_is_a_clear_error(model, batch):
    ids, _, pixels = batch
    features = [torch.zeros(16, 2)] * (len(pixels) + 1)
    outputs = {"image": BaseModelOutputWithPooling(pooler_output=features)}
    with pytest.raises(ValueError, match="Expand each image placeholder to `combiner_num_latents` = 4"):
        model._expand_multimodal_outputs(ids, outputs, expand_size=2)


# --- beam search and num_return_sequences ------------------------------------------------------------------------


def test_beam_search_equals_each_row_searched_alone(model, batch):
    batched = generate_batch(model, batch, num_beams=2, do_sample=False)
    for row in range(len(ROWS)):
        assert batched[row].tolist() == generate_row(model, batch[2], row, num_beams=2, do_sample=False)[0].tolist()


def test_beams_returning_several_sequences_equal_each_row_alone(model, batch):
    batched = generate_batch(model, batch, num_beams=2, num_return_sequences=2, do_sample=False)
    assert batched.shape[0] == 2 * len(ROWS)
    for row in range(len(ROWS)):
        alone = generate_row(model, batch[2], row, num_beams=2, num_return_sequences=2, do_sample=False)
        assert batched[2 * row : 2 * row + 2].tolist() == alone.tolist()


def test_sampling_several_sequences_equals_sampling_the_expanded_batch(model, batch):
    """`num_return_sequences=3` with a seed equals sampling the batch whose rows (and images) are repeated 3 times."""
    ids, mask, pixels = batch
    torch.manual_seed(7)
    sampled = generate_batch(model, batch, do_sample=True, num_return_sequences=3)
    expanded = (
        ids.repeat_interleave(3, dim=0),
        mask.repeat_interleave(3, dim=0),
        torch.cat([row_images(pixels, row) for row in range(len(ROWS)) for _ in range(3)]),
    )
    torch.manual_seed(7)
    reference = generate_batch(model, expanded, do_sample=True)
    assert torch.equal(sampled, reference)


def test_beam_search_without_a_cache_equals_with_one(model, batch):
    """Without a cache every step re-fuses the (expanded) images with the recorded prompt."""
    cached = generate_batch(model, batch, num_beams=2, do_sample=False)
    assert torch.equal(generate_batch(model, batch, num_beams=2, do_sample=False, use_cache=False), cached)


# --- assisted decoding, static cache, chunked prefill ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["assistant_model", "prompt_lookup", "static_cache"])
def test_assisted_decoding_and_static_cache_equal_greedy(model, batch, mode):
    kwargs = {
        "assistant_model": {"assistant_model": model},
        "prompt_lookup": {"prompt_lookup_num_tokens": 2},
        "static_cache": {"cache_implementation": "static"},
    }[mode]
    greedy = generate_row(model, batch[2], 0, do_sample=False)
    assert torch.equal(generate_row(model, batch[2], 0, do_sample=False, **kwargs), greedy)


def test_the_assistant_fuses_the_prompt_with_the_images(model, batch):
    """transformers runs an assistant as if past its first step, which would drop its images: the assistant's
    prefill gets them, so it fuses the same prompt and images as the main model."""
    calls = []
    handle = model.model.combiner.register_forward_hook(lambda m, args, out: calls.append((args[2].sum(), out)))
    try:
        generate_row(model, batch[2], 0, do_sample=False, assistant_model=model)
    finally:
        handle.remove()
    assert len(calls) == 2  # the main model's prefill and the assistant's
    assert calls[0][0] == calls[1][0]
    torch.testing.assert_close(calls[0][1], calls[1][1])


def test_chunked_prefill_is_refused(model, batch):
    with pytest.raises(ValueError, match="cannot prefill in chunks"):
        generate_row(model, batch[2], 0, prefill_chunk_size=4)


# --- the same modes on COMM and M3 ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["comm", "matryoshka_llava"])
def test_comm_and_m3_beams_and_assistant_follow_the_same_references(family):
    torch.manual_seed(0)
    model = randomize(get_family(family).model_class(tiny_comm_config("llava", family=family)))
    img = [IMAGE_TOKEN_ID] * 16
    rows = [[1, 5] + img + [7], [1, 9, 10] + img + [11, 12]]
    ids = torch.tensor([[PAD] * (len(rows[1]) - len(rows[0])) + rows[0], rows[1]])
    mask = (ids != PAD).long()
    pixels = torch.randn(2, 3, 28, 28)
    kwargs = dict(max_new_tokens=NEW, pad_token_id=PAD, do_sample=False)
    batched = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, num_beams=2, **kwargs)
    for row in range(2):
        alone = model.generate(
            input_ids=torch.tensor([rows[row]]), pixel_values=pixels[row : row + 1], num_beams=2, **kwargs
        )
        assert batched[row, ids.shape[1] :].tolist() == alone[0, len(rows[row]) :].tolist()
    single = dict(input_ids=torch.tensor([rows[0]]), pixel_values=pixels[:1], **kwargs)
    assert torch.equal(model.generate(**single, assistant_model=model), model.generate(**single))
