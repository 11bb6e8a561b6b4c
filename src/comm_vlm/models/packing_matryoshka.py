"""Scale batches for Matryoshka-LLaVA (M3, Cai et al. 2024): rewrite image placeholder runs to other scales.

M3's objective averages the next-token loss over all visual-token scales for every sample. Instead of M language
model passes, the scale variants of a batch are written as rows of one batch, in one of three row formats:

* ``packed_shared`` (default): one packed row per sample holding the text before the first image (the *prefix*)
  once, followed by every variant's continuation (images + text): ``[prefix | body@576 | body@144 | ... | body@1]``;
  with ``split_largest`` the longest variant (the full grid) gets a plain row of its own (``prefix + body@576``) and
  the packed row holds the others. A 4D attention mask lets each body see the prefix and itself (causally) and
  nothing else, and positions restart after the prefix for every body, so each body computes exactly what the
  single-scale sequence ``prefix + body@Si`` computes. Prefix-token losses are the same at every scale; they are
  computed once per row and weighted by the number of bodies reading them, which keeps the loss *exactly* the mean
  of the M single-scale losses.
* ``packed``: the same rows with the prefix repeated before every body (block-diagonal mask) and uniform loss
  weights (used when the loss is computed outside the model, e.g. TRL's fused LM head, and the prefix has labels).
* ``padded``: one row per (sample, scale), padded to the longest; a plain 2D mask, so any attention implementation
  works (the fallback for attention kernels without custom 4D masks, and the rows of single-scale rewrites).

The model runs plain rows and packed rows as separate LLM calls, each trimmed to its own longest row. With
``split_largest`` that is one causal call on the full-grid rows and one short masked call: on CPU about the cost of
the tokens, where one long packed row pays a dense attention over its whole mask; on GPU one call (no split) is
cheaper. Every row format sets the labels of image placeholders to -100 (the image is never a target, as in LLaVA's
training), so all variants of a sample have the same labelled tokens and a token-mean over the rewritten batch equals
the mean over scales of each scale's token-mean.

`relay_training_inputs` applies this to a model's keyword arguments from the config alone: the model's own forward
calls it (with the shared prefix and its loss weights), and so does the training collator (`comm_vlm.training`,
uniform weights, for losses computed outside the model). The rows' attention is given by `segment_ids`; the model
builds the 4D masks of packed rows from them (`packed_attention_mask`), so the batch keeps a plain 2D padding mask.

torch only (and the M3 config helpers), so that it can ship as remote code.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .configuration_matryoshka import as_integer, check_matryoshka_scale


IGNORE_INDEX = -100
ROW_FORMATS = ("packed_shared", "packed", "padded")


@dataclass
class MatryoshkaScaleBatch:
    """A batch whose image placeholder runs are rewritten to other scales (one or several variants per sample).

    Args:
        input_ids (`torch.LongTensor` of shape `(R, L)`): R rows (samples or sample x scale), image runs rewritten.
        attention_mask (`torch.LongTensor` of shape `(R, L)`): 1 on real tokens, 0 on padding. Packed rows also need
            the 4D mask `packed_attention_mask(segment_ids)`, which the model builds.
        segment_ids (`torch.LongTensor` of shape `(R, L)`): per position, 0 for a shared prefix, k >= 1 for the k-th
            variant of its row, -1 for padding; a plain row is all 1 (then -1).
        position_ids (`torch.LongTensor` of shape `(R, L)`, *optional*): restart per variant in packed rows; `None`
            for `padded`.
        labels (`torch.LongTensor` of shape `(R, L)`, *optional*): -100 on images, padding and dropped tokens.
        label_weights (`torch.FloatTensor` of shape `(R, L)`, *optional*): loss weight per label position (M on the
            shared prefix of `packed_shared`, else 1); `None` when uniform.
        image_scales (`torch.LongTensor` of shape `(num_occurrences,)`): visual tokens of each image run, in order.
        image_index (`torch.LongTensor` of shape `(num_occurrences,)`): which input image fills each run.
        row_source (`torch.LongTensor` of shape `(R,)`): the input sample of each row.
        rows (`torch.LongTensor` of shape `(R, 2)`): per row, its real length and whether it packs several variants
            (1) or is a plain causal sequence (0); the model runs the two kinds as separate, trimmed LLM calls.
        row_format (`str`): `packed_shared`, `packed` or `padded`.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    segment_ids: torch.Tensor
    position_ids: torch.Tensor | None
    labels: torch.Tensor | None
    label_weights: torch.Tensor | None
    image_scales: torch.Tensor
    image_index: torch.Tensor
    row_source: torch.Tensor
    rows: torch.Tensor
    row_format: str


def placeholder_runs(placeholder_mask: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Contiguous runs of image placeholders per row: `[(start, length), ...]`.

    Args:
        placeholder_mask (`torch.BoolTensor` of shape `(B, T)`).
    """
    runs = []
    mask = placeholder_mask.to(torch.int8)
    edges = torch.diff(mask, dim=1, prepend=mask.new_zeros(mask.shape[0], 1), append=mask.new_zeros(mask.shape[0], 1))
    for row in edges.tolist():
        starts = [i for i, v in enumerate(row) if v == 1]
        ends = [i for i, v in enumerate(row) if v == -1]
        runs.append([(s, e - s) for s, e in zip(starts, ends)])
    return runs


def split_image_occurrences(
    placeholder_mask: torch.Tensor, num_occurrences: int, token_counts: Sequence[int] | None = None
) -> list[list[tuple[int, int]]]:
    """Splits the placeholder runs of a batch into one `(start, length)` per image, row by row in order.

    With `token_counts` (visual tokens of each image, as the processor returns them in `matryoshka_image_scales`)
    runs are cut by those counts. Without, every run is one image when there are `num_occurrences` runs; otherwise all
    images are assumed to have the same count (adjacent placeholders of equal-scale images).

    Args:
        placeholder_mask (`torch.BoolTensor` of shape `(B, T)`): image placeholder positions.
        num_occurrences (`int`): images the runs must hold.
        token_counts (`Sequence[int]`, *optional*): tokens of each image, in order.

    Raises:
        ValueError: the placeholders cannot be split into `num_occurrences` images (the message gives the counts).
    """
    runs = placeholder_runs(placeholder_mask)
    flat = [length for row in runs for _, length in row]
    total = sum(flat)
    if token_counts is None:
        if len(flat) == num_occurrences:
            return runs
        each = total // num_occurrences if num_occurrences > 0 and total % num_occurrences == 0 else 0
        if each > 0 and all(n % each == 0 for n in flat):
            token_counts = [each] * num_occurrences
        else:
            raise ValueError(
                f"Cannot match the image placeholders to {num_occurrences} image(s): the text has {total} image "
                f"tokens in runs of {flat}. Give every image one run of a valid scale (the processor does), or pass "
                "`matryoshka_image_scales` with the tokens of each image."
            )
    counts = [int(c) for c in token_counts]
    if len(counts) != num_occurrences or sum(counts) != total:
        raise ValueError(
            f"`matryoshka_image_scales`={counts} does not match the text: it has {total} image tokens in runs of "
            f"{flat} for {num_occurrences} image(s). Pass one count per image, summing to the placeholders."
        )
    occurrences, k = [], 0
    for row in runs:
        row_occ = []
        for start, length in row:
            while length > 0:
                if k >= len(counts) or counts[k] > length:
                    raise ValueError(
                        f"`matryoshka_image_scales`={counts} does not split the placeholder runs {flat}: every count "
                        "must fall inside one run."
                    )
                row_occ.append((start, counts[k]))
                start, length, k = start + counts[k], length - counts[k], k + 1
        occurrences.append(row_occ)
    return occurrences


def _compact(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor | None):
    """Drops padding: per row, the kept token ids and labels."""
    rows, row_labels = [], []
    for b in range(input_ids.shape[0]):
        keep = torch.ones_like(input_ids[b], dtype=torch.bool) if attention_mask is None else attention_mask[b].bool()
        rows.append(input_ids[b][keep])
        row_labels.append(labels[b][keep] if labels is not None else None)
    return rows, row_labels


def build_scale_batch(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    image_token_id: int,
    variants: Sequence[Sequence[Sequence[int]]],
    token_counts: Sequence[int] | None = None,
    pad_token_id: int = 0,
    row_format: str = "padded",
    padding_side: str = "right",
    split_largest: bool = True,
) -> MatryoshkaScaleBatch:
    """Rewrites every image placeholder run of a batch to other token counts, one or several variants per sample.

    Args:
        input_ids (`torch.LongTensor` of shape `(B, T)`): text with image placeholder runs (any padding side).
        attention_mask (`torch.Tensor` of shape `(B, T)`, *optional*): 0 on padding, which is dropped.
        labels (`torch.LongTensor` of shape `(B, T)`, *optional*): next-token targets; image positions become -100.
        image_token_id (`int`): the placeholder id.
        variants (`Sequence` of length B): per sample, a list of variants, each a list with the new token count of
            every image of that sample (e.g. `[[576], [144], [36], [9], [1]]` for one image at five scales).
        token_counts (`Sequence[int]`, *optional*): current tokens of every image of the batch (see
            `split_image_occurrences`); inferred from the runs when `None`.
        pad_token_id (`int`): id written on padding.
        row_format (`str`): `packed_shared`, `packed` or `padded` (see the module docstring); samples with one
            variant always get a plain row.
        padding_side (`str`): `right` or `left` (only `padded` rows; packed rows pad right).
        split_largest (`bool`): packed row formats put each sample's longest variant (the full grid) in a plain row
            of its own and pack the other variants into a second row; `False` packs all variants into one row.

    Returns:
        [`MatryoshkaScaleBatch`]; image occurrences are ordered as the rows read, so `image_index` says which input
        image fills each run (images are numbered in order of appearance over the batch).
    """
    if row_format not in ROW_FORMATS:
        raise ValueError(f"Unknown row_format {row_format!r}; use one of {ROW_FORMATS}.")
    batch = input_ids.shape[0]
    if len(variants) != batch:
        raise ValueError(f"`variants` has {len(variants)} entries for a batch of {batch}; give one list per sample.")
    device = input_ids.device  # the rows are built on CPU (small integer tensors, Python loops), then moved
    input_ids = input_ids.cpu()
    attention_mask = None if attention_mask is None else attention_mask.cpu()
    labels = None if labels is None else labels.cpu()
    rows, row_labels = _compact(input_ids, attention_mask, labels)
    lengths = [row.shape[0] for row in rows]
    max_len = max(lengths) if lengths else 0
    padded = torch.stack([torch.cat([r, r.new_full((max_len - r.shape[0],), pad_token_id)]) for r in rows])
    keep = torch.arange(max_len)[None, :] < torch.tensor(lengths)[:, None]
    placeholder = (padded == image_token_id) & keep
    num_images = sum(len(r) for r in placeholder_runs(placeholder)) if token_counts is None else len(token_counts)
    occurrences = split_image_occurrences(placeholder, num_images, token_counts)

    multi = row_format != "padded"
    share = row_format == "packed_shared"
    out_ids, out_labels, out_weights, out_pos, out_segments, out_packed = [], [], [], [], [], []
    scales, index, source = [], [], []
    image_offset = 0
    for b in range(batch):
        ids, lab, occ = rows[b], row_labels[b], occurrences[b]
        cut = occ[0][0] if occ else ids.shape[0]
        bodies = []
        for v in variants[b]:
            if len(v) != len(occ):
                raise ValueError(f"Sample {b} has {len(occ)} image(s) but a variant gives counts {list(v)}.")
            pieces, piece_labels = [], []
            for j, (start, length) in enumerate(occ):
                end_text = occ[j + 1][0] if j + 1 < len(occ) else ids.shape[0]
                pieces += [ids.new_full((int(v[j]),), image_token_id), ids[start + length : end_text]]
                if lab is not None:
                    piece_labels += [lab.new_full((int(v[j]),), IGNORE_INDEX), lab[start + length : end_text]]
            body = torch.cat(pieces) if pieces else ids[:0]
            body_lab = (torch.cat(piece_labels) if piece_labels else lab[:0]) if lab is not None else None
            bodies.append((body, body_lab, [int(c) for c in v]))
        if not multi or len(bodies) == 1:
            groups = [[k] for k in range(len(bodies))]
        elif split_largest:
            largest = max(range(len(bodies)), key=lambda k: bodies[k][0].shape[0])
            groups = [[largest], [k for k in range(len(bodies)) if k != largest]]
        else:
            groups = [list(range(len(bodies)))]
        for group in groups:
            shared = share and len(group) > 1
            row = _Row()
            if shared:  # the prefix once, weighted by the number of bodies that read it
                row.add(ids[:cut], None if lab is None else lab[:cut], 0, 0, float(len(group)))
            for k, variant in enumerate(group, start=1):
                body, body_lab, counts = bodies[variant]
                seq = body if shared else torch.cat([ids[:cut], body])
                seq_lab = None if lab is None else (body_lab if shared else torch.cat([lab[:cut], body_lab]))
                if seq_lab is not None and k > 1 and not shared and seq_lab.numel():
                    # a segment's first token has no predecessor in its own sequence: never a cross-segment target
                    seq_lab = torch.cat([seq_lab.new_full((1,), IGNORE_INDEX), seq_lab[1:]])
                row.add(seq, seq_lab, k, cut if shared else 0, 1.0)
                scales.extend(counts)
                index.extend(range(image_offset, image_offset + len(occ)))
            out_ids.append(torch.cat(row.ids))
            out_labels.append(torch.cat(row.labels) if lab is not None else None)
            out_weights.append(torch.cat(row.weights))
            out_pos.append(torch.cat(row.positions))
            out_segments.append(torch.cat(row.segments))
            out_packed.append(len(group) > 1)
            source.append(b)
        image_offset += len(occ)

    length = max(x.shape[0] for x in out_ids)
    left = padding_side == "left" and not multi

    def pad(x: torch.Tensor, value) -> torch.Tensor:
        fill = x.new_full((length - x.shape[0],), value)
        return torch.cat([fill, x]) if left else torch.cat([x, fill])

    ids_t = torch.stack([pad(x, pad_token_id) for x in out_ids]).to(device)
    seg_t = torch.stack([pad(x, -1) for x in out_segments])
    labels_t = torch.stack([pad(x, IGNORE_INDEX) for x in out_labels]).to(device) if labels is not None else None
    weights = torch.stack([pad(x, 0.0) for x in out_weights])
    has_weights = labels is not None and bool((weights[seg_t >= 0] != 1).any())
    pos_t = torch.stack([pad(x, 0) for x in out_pos]).to(device) if multi else None
    row_info = torch.stack(
        [torch.tensor([x.shape[0] for x in out_ids]), torch.tensor(out_packed, dtype=torch.long)], 1
    )
    return MatryoshkaScaleBatch(
        input_ids=ids_t,
        attention_mask=(seg_t >= 0).long().to(device),
        segment_ids=seg_t.to(device),
        position_ids=pos_t,
        labels=labels_t,
        label_weights=weights.to(device) if has_weights else None,
        image_scales=torch.tensor(scales, dtype=torch.long, device=device),
        image_index=torch.tensor(index, dtype=torch.long, device=device),
        row_source=torch.tensor(source, dtype=torch.long, device=device),
        rows=row_info.to(device),
        row_format=row_format if multi else "padded",
    )


class _Row:
    """Pieces of one output row: token ids, labels, segment ids, positions and loss weights."""

    def __init__(self) -> None:
        self.ids, self.labels, self.segments, self.positions, self.weights = [], [], [], [], []

    def add(self, ids: torch.Tensor, labels: torch.Tensor | None, segment: int, offset: int, weight: float) -> None:
        n = ids.shape[0]
        self.ids.append(ids)
        if labels is not None:
            self.labels.append(labels)
        self.segments.append(torch.full((n,), segment, dtype=torch.long))
        self.positions.append(torch.arange(n) + offset)
        self.weights.append(torch.full((n,), weight))


def packed_attention_mask(segment_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The 4D attention mask of packed rows: each variant sees its row's shared prefix and itself, causally.

    Args:
        segment_ids (`torch.LongTensor` of shape `(R, L)`): `MatryoshkaScaleBatch.segment_ids` (0 = shared prefix,
            k >= 1 = variant k, -1 = padding).
        dtype (`torch.dtype`, *optional*): `None` gives a bool mask (True = attend, for SDPA); a float dtype gives an
            additive mask (0 / dtype min, for eager attention).

    Returns:
        `torch.Tensor` of shape `(R, 1, L, L)`.
    """
    length, device = segment_ids.shape[1], segment_ids.device
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    query, key = segment_ids[:, :, None], segment_ids[:, None, :]
    allowed = (query == key) & (query >= 0)
    allowed |= (key == 0) & (query > 0)  # every body reads the shared prefix of its row
    allowed &= causal
    allowed |= torch.eye(length, dtype=torch.bool, device=device)[None] & (query < 0)  # padding sees itself: no NaN
    allowed = allowed[:, None]
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


def weighted_next_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Weighted next-token cross-entropy: `sum(w * nll) / sum(w)` over positions whose label is not -100.

    Args:
        logits (`torch.Tensor` of shape `(R, L, V)`).
        labels (`torch.LongTensor` of shape `(R, L)`): unshifted targets (shifted here).
        label_weights (`torch.Tensor` of shape `(R, L)`, *optional*): weight of each label position
            (`MatryoshkaScaleBatch.label_weights`).
    """
    shift_labels = labels[:, 1:].to(logits.device)
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(shift_labels)
    weights = (shift_labels != IGNORE_INDEX).float()
    if label_weights is not None:
        weights = weights * label_weights[:, 1:].float()
    return (nll * weights).sum() / weights.sum().clamp(min=1.0)


def _as_list(value) -> list[int] | None:
    if value is None:
        return None
    return [int(v) for v in (value.tolist() if isinstance(value, torch.Tensor) else value)]


def build_training_scale_batch(
    config,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    matryoshka_scale: int | None = None,
    image_token_counts: torch.Tensor | Sequence[int] | None = None,
    num_images: int | None = None,
    weighted: bool = True,
    training: bool = True,
    device_type: str | None = None,
) -> MatryoshkaScaleBatch:
    """The batch the LLM sees for M3's training objective, from a `MatryoshkaLlavaConfig` and a collated batch.

    Every sample gets a variant per trained scale (`config.matryoshka_scales`; one random scale per sample in
    `random_scale` mode while `training`; only `matryoshka_scale` when given), in the row format the config's attention
    kernel supports: `packed_shared` (`config.matryoshka_share_prefix`) or `packed` for SDPA and eager attention,
    `padded` for the others.

    Args:
        config (`MatryoshkaLlavaConfig`): scales, training mode, packing, placeholder and pad ids.
        input_ids (`torch.LongTensor` of shape `(B, T)`): one placeholder run per image, any length.
        attention_mask (`torch.Tensor` of shape `(B, T)`, *optional*): padding (either side) is dropped.
        labels (`torch.LongTensor` of shape `(B, T)`, *optional*): targets; image positions become -100.
        matryoshka_scale (`int`, *optional*): one scale for every image (a single-scale loss).
        image_token_counts (`torch.LongTensor` of shape `(num_images,)`, *optional*): the current tokens of each image
            (the processor's `matryoshka_image_scales`), to split touching runs.
        num_images (`int`, *optional*): images in the batch (inferred from the runs when `None`).
        weighted (`bool`): allow the shared-prefix rows with prefix loss weights (the model's own loss). `False`
            gives uniform weights, for losses computed outside the model (a plain token mean is then the mean over
            scales of each scale's token mean).
        training (`bool`): whether `random_scale` mode draws a scale (evaluation averages all scales).
        device_type (`str`, *optional*): where the LLM runs (`config.matryoshka_packing="auto"` splits rows on CPU);
            default the device of `input_ids`.
    """
    counts = _as_list(image_token_counts)
    mask = input_ids == config.image_token_id
    if attention_mask is not None and attention_mask.ndim == 2:
        mask &= attention_mask.bool()
    if num_images is None:
        num_images = len(counts) if counts is not None else sum(len(row) for row in placeholder_runs(mask))
    occurrences = split_image_occurrences(mask, num_images, counts)
    counts = [length for row in occurrences for _, length in row]
    if matryoshka_scale is not None:
        matryoshka_scale = as_integer(matryoshka_scale, "matryoshka_scale")
        check_matryoshka_scale(matryoshka_scale, config.matryoshka_grid)
        variants = [[[matryoshka_scale] * len(occ)] for occ in occurrences]
    elif config.matryoshka_training_mode == "random_scale" and training:
        scales = config.matryoshka_scales
        picks = torch.randint(len(scales), (len(occurrences),)).tolist()
        variants = [[[scales[p]] * len(occ)] for p, occ in zip(picks, occurrences)]
    else:
        variants = [[[s] * len(occ) for s in config.matryoshka_scales] for occ in occurrences]
    text_config = config.get_text_config()
    # Packed rows need a custom 4D mask (bool for SDPA, additive for eager); other kernels get padded rows.
    attn = getattr(text_config, "_attn_implementation", None) or "sdpa"
    row_format = "packed_shared" if config.matryoshka_share_prefix else "packed"
    if attn not in ("sdpa", "eager"):
        row_format = "padded"
    device_type = input_ids.device.type if device_type is None else device_type
    packing = config.matryoshka_packing
    pad_id = text_config.pad_token_id
    build = functools.partial(
        build_scale_batch,
        input_ids,
        attention_mask if attention_mask is None or attention_mask.ndim == 2 else None,
        labels,
        config.image_token_id,
        variants,
        token_counts=counts,
        pad_token_id=0 if pad_id is None else pad_id,
        split_largest=packing == "split" or (packing == "auto" and device_type == "cpu"),
    )
    batch = build(row_format=row_format)
    if not weighted and batch.label_weights is not None:
        weighted_labels = (batch.label_weights != 1) & (batch.labels != IGNORE_INDEX)
        if bool(weighted_labels.any()):
            batch = build(row_format="packed")
    return batch


# Inputs the re-lay rewrites or consumes; any other per-token tensor of the batch could not follow the new rows.
_RELAID_INPUTS = ("input_ids", "attention_mask", "labels", "matryoshka_scale", "matryoshka_image_scales")


def relay_training_inputs(
    config, inputs: dict, weighted: bool, training: bool = True, device_type: str | None = None
) -> tuple[dict, MatryoshkaScaleBatch | None]:
    """Re-lays a model's keyword arguments for M3's objective when they hold labels, images and `input_ids`.

    Shared by `MatryoshkaLlavaForConditionalGeneration.forward` (its own loss, `weighted=True`) and the training
    collator of `comm_vlm.training` (`weighted=False`). Inputs without labels or images, or already re-laid (they carry
    `matryoshka_image_index`), come back as they are, with `None`.

    Args:
        config (`MatryoshkaLlavaConfig`).
        inputs (`dict`): `input_ids` `(B, T)`, `attention_mask` `(B, T)`, `labels` `(B, T)`, `pixel_values` or
            `mm_encoder_outputs`, and optionally `matryoshka_scale` and `matryoshka_image_scales` `(num_images,)`.
        weighted, training, device_type: see `build_training_scale_batch`.

    Returns:
        `(inputs, batch)`: the re-laid inputs (`input_ids`, `attention_mask`, `labels` `(R, L)`, `position_ids` for
        packed rows, `matryoshka_image_scales`, `matryoshka_image_index`, `matryoshka_segment_ids`; the other inputs
        unchanged) and the [`MatryoshkaScaleBatch`] they come from.
    """
    labels = inputs.get("labels")
    has_images = inputs.get("pixel_values") is not None or (inputs.get("mm_encoder_outputs") or {}).get("image")
    if labels is None or not has_images or inputs.get("matryoshka_image_index") is not None:
        return inputs, None
    input_ids = inputs.get("input_ids")
    if input_ids is None:
        raise ValueError("The Matryoshka objective re-lays `input_ids`; pass input_ids, not inputs_embeds.")
    if inputs.get("position_ids") is not None or inputs.get("past_key_values") is not None:
        raise ValueError(
            "The Matryoshka objective builds its own positions; train without position_ids/past_key_values "
            "(padded batches, no padding-free packing)."
        )
    per_token = [
        key
        for key, value in inputs.items()
        if key not in _RELAID_INPUTS and isinstance(value, torch.Tensor) and value.shape == input_ids.shape
    ]
    if per_token:
        raise ValueError(
            f"The Matryoshka objective rewrites the rows of the batch, but {per_token} are per-token inputs it cannot "
            "rewrite; drop them from the batch."
        )
    pixel_values = inputs.get("pixel_values")
    batch = build_training_scale_batch(
        config,
        input_ids,
        inputs.get("attention_mask"),
        labels,
        matryoshka_scale=inputs.get("matryoshka_scale"),
        image_token_counts=inputs.get("matryoshka_image_scales"),
        num_images=None if pixel_values is None else pixel_values.shape[0],
        weighted=weighted,
        training=training,
        device_type=device_type,
    )
    relaid = {key: value for key, value in inputs.items() if key not in ("matryoshka_scale", "position_ids")}
    relaid.update(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        labels=batch.labels,
        matryoshka_image_scales=batch.image_scales,
        matryoshka_image_index=batch.image_index,
        matryoshka_segment_ids=batch.segment_ids,
    )
    if batch.position_ids is not None:
        relaid["position_ids"] = batch.position_ids
    return relaid, batch


__all__ = [
    "IGNORE_INDEX",
    "ROW_FORMATS",
    "MatryoshkaScaleBatch",
    "build_scale_batch",
    "build_training_scale_batch",
    "packed_attention_mask",
    "placeholder_runs",
    "relay_training_inputs",
    "split_image_occurrences",
    "weighted_next_token_loss",
]
