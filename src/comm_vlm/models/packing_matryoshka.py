"""Sequence layouts for Matryoshka-LLaVA (M3, Cai et al. 2024): rewrite image placeholder runs to other scales.

M3's objective averages the next-token loss over all visual-token scales for every sample. Instead of M language
model passes, the scale variants of a batch are laid out as rows of one batch:

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
  works (the fallback for attention kernels without custom 4D masks, and the layout of single-scale rewrites).

The model runs plain rows and packed rows as separate LLM calls, each trimmed to its own longest row. With
``split_largest`` that is one causal call on the full-grid rows and one short masked call: on CPU about the cost of
the tokens, where one long packed row pays a dense attention over its whole mask; on GPU one call (no split) is
cheaper. Every layout sets the labels of image placeholders to -100 (the image is never a target, as in LLaVA's
training), so all variants of a sample have the same labelled tokens and a token-mean over the layout equals the mean
over scales of each scale's token-mean.

torch only, so that it can ship as remote code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


IGNORE_INDEX = -100
LAYOUTS = ("packed_shared", "packed", "padded")


@dataclass
class MatryoshkaLayout:
    """A batch rewritten for M3.

    Args:
        input_ids (`torch.LongTensor` of shape `(R, L)`): R rows (samples or sample x scale), image runs rewritten.
        attention_mask (`torch.Tensor`): `(R, L)` 0/1 for `padded`; `(R, 1, L, L)` bool (True = attend) or additive
            float for the packed layouts.
        position_ids (`torch.LongTensor` of shape `(R, L)`, *optional*): restart per variant in packed layouts.
        labels (`torch.LongTensor` of shape `(R, L)`, *optional*): -100 on images, padding and dropped tokens.
        label_weights (`torch.FloatTensor` of shape `(R, L)`, *optional*): loss weight per label position (M on the
            shared prefix of `packed_shared`, else 1); `None` when uniform.
        image_scales (`torch.LongTensor` of shape `(num_occurrences,)`): visual tokens of each image run, in order.
        image_index (`torch.LongTensor` of shape `(num_occurrences,)`): which input image fills each run.
        row_source (`torch.LongTensor` of shape `(R,)`): the input sample of each row.
        rows (`torch.LongTensor` of shape `(R, 2)`): per row, its real length and whether it packs several variants
            (1) or is a plain causal sequence (0); the model runs the two kinds as separate, trimmed LLM calls.
        layout (`str`): the layout used.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor | None
    labels: torch.Tensor | None
    label_weights: torch.Tensor | None
    image_scales: torch.Tensor
    image_index: torch.Tensor
    row_source: torch.Tensor
    rows: torch.Tensor
    layout: str


def image_runs(placeholder_mask: torch.Tensor) -> list[list[tuple[int, int]]]:
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
    runs = image_runs(placeholder_mask)
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


def build_layout(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    image_token_id: int,
    variants: Sequence[Sequence[Sequence[int]]],
    token_counts: Sequence[int] | None = None,
    pad_token_id: int = 0,
    layout: str = "padded",
    padding_side: str = "right",
    mask_dtype: torch.dtype | None = None,
    split_largest: bool = True,
) -> MatryoshkaLayout:
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
        layout (`str`): `packed_shared`, `packed` or `padded` (see the module docstring); samples with one variant
            always get a plain row.
        padding_side (`str`): `right` or `left` (only `padded` rows; packed layouts pad right).
        mask_dtype (`torch.dtype`, *optional*): `None` gives a bool 4D mask (True = attend, for SDPA); a float dtype
            gives an additive mask (0 / dtype min, for eager attention).
        split_largest (`bool`): packed layouts put each sample's longest variant (the full grid) in a plain row of its
            own and pack the other variants into a second row; `False` packs all variants into one row.

    Returns:
        [`MatryoshkaLayout`]; image occurrences are ordered as the rows read, so `image_index` says which input image
        fills each run (images are numbered in order of appearance over the batch).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown layout {layout!r}; use one of {LAYOUTS}.")
    batch = input_ids.shape[0]
    if len(variants) != batch:
        raise ValueError(f"`variants` has {len(variants)} entries for a batch of {batch}; give one list per sample.")
    device = input_ids.device  # the layout is built on CPU (small integer tensors, Python loops), then moved
    input_ids = input_ids.cpu()
    attention_mask = None if attention_mask is None else attention_mask.cpu()
    labels = None if labels is None else labels.cpu()
    rows, row_labels = _compact(input_ids, attention_mask, labels)
    lengths = [row.shape[0] for row in rows]
    max_len = max(lengths) if lengths else 0
    padded = torch.stack([torch.cat([r, r.new_full((max_len - r.shape[0],), pad_token_id)]) for r in rows])
    keep = torch.arange(max_len)[None, :] < torch.tensor(lengths)[:, None]
    placeholder = (padded == image_token_id) & keep
    num_images = sum(len(r) for r in image_runs(placeholder)) if token_counts is None else len(token_counts)
    occurrences = split_image_occurrences(placeholder, num_images, token_counts)

    multi = layout != "padded"
    share = layout == "packed_shared"
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
    pos_t = torch.stack([pad(x, 0) for x in out_pos]).to(device)
    if multi:
        attention = _packed_mask(seg_t)
        if mask_dtype is not None:  # additive mask for eager attention
            blocked = torch.finfo(mask_dtype).min
            attention = torch.zeros(attention.shape, dtype=mask_dtype).masked_fill(~attention, blocked)
        attention = attention.to(device)
    else:
        attention = (seg_t >= 0).long().to(device)
        pos_t = None
    row_info = torch.stack(
        [torch.tensor([x.shape[0] for x in out_ids]), torch.tensor(out_packed, dtype=torch.long)], 1
    )
    return MatryoshkaLayout(
        input_ids=ids_t,
        attention_mask=attention,
        position_ids=pos_t,
        labels=labels_t,
        label_weights=weights.to(device) if has_weights else None,
        image_scales=torch.tensor(scales, dtype=torch.long, device=device),
        image_index=torch.tensor(index, dtype=torch.long, device=device),
        row_source=torch.tensor(source, dtype=torch.long, device=device),
        rows=row_info.to(device),
        layout=layout if multi else "padded",
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


def _packed_mask(segments: torch.Tensor) -> torch.Tensor:
    """`(R, 1, L, L)` bool mask from segment ids (0 = shared prefix, k >= 1 = variant k, -1 = padding)."""
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    query, key = segments[:, :, None], segments[:, None, :]
    allowed = (query == key) & (query >= 0)
    allowed |= (key == 0) & (query > 0)  # every body reads the shared prefix of its row
    allowed &= causal
    allowed |= torch.eye(length, dtype=torch.bool)[None] & (query < 0)  # padding attends to itself: no NaN rows
    return allowed[:, None]


def weighted_next_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Weighted next-token cross-entropy: `sum(w * nll) / sum(w)` over positions whose label is not -100.

    Args:
        logits (`torch.Tensor` of shape `(R, L, V)`).
        labels (`torch.LongTensor` of shape `(R, L)`): unshifted targets (shifted here).
        label_weights (`torch.Tensor` of shape `(R, L)`, *optional*): weight of each label position
            (`MatryoshkaLayout.label_weights`).
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


__all__ = [
    "IGNORE_INDEX",
    "LAYOUTS",
    "MatryoshkaLayout",
    "build_layout",
    "image_runs",
    "split_image_occurrences",
    "weighted_next_token_loss",
]
