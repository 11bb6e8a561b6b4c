"""Serving helpers: grounding boxes out of `pipeline("image-text-to-text")` answers.

pipe = pipeline("image-text-to-text", model="out/")
parse_pipeline_boxes(pipe(text=messages))   # each record gains "boxes" and "box_errors"
"""

from __future__ import annotations

from typing import Any

from .models.image_utils import BoxParseResult, parse_boxes


def _answer_text(record: dict[str, Any]) -> str:
    generated = record.get("generated_text")
    if isinstance(generated, list):  # chat mode: the conversation with the answer as last message
        last = generated[-1] if generated else {}
        content = last.get("content", "") if last.get("role") == "assistant" else ""
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if part.get("type") == "text")
        return content
    text = generated or ""
    prompt = record.get("input_text")
    if isinstance(prompt, str) and prompt and text.startswith(prompt):  # return_full_text=True
        text = text[len(prompt) :]
    return text


def parse_pipeline_boxes(outputs: Any) -> Any:
    """Adds the Shikra-style boxes of each answer to `pipeline("image-text-to-text")` outputs.

    Every record (at any nesting: single input, batch, several sequences per input) gets `boxes` (normalised
    `(x1, y1, x2, y2)` tuples, in order) and `box_errors` (malformed boxes, see `parse_boxes`). Only the answer is
    parsed: the last assistant message in chat mode, the text after the prompt for plain prompts, so boxes quoted in
    the question are not returned. Records are updated in place and returned.

    Args:
        outputs (`dict` or `list`): what the pipeline returned.
    """
    if isinstance(outputs, dict):
        result: BoxParseResult = parse_boxes(_answer_text(outputs))
        outputs["boxes"] = result.boxes
        outputs["box_errors"] = result.errors
        return outputs
    if isinstance(outputs, list):
        for item in outputs:
            parse_pipeline_boxes(item)
        return outputs
    raise ValueError(
        f"Expected pipeline outputs (a dict or a list of dicts), got {type(outputs).__name__}; pass what "
        "`pipeline('image-text-to-text')(...)` returned."
    )


__all__ = ["parse_pipeline_boxes"]
