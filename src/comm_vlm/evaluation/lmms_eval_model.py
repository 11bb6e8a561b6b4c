"""The `comm_vlm` model of lmms-eval: COMM, Matryoshka-LLaVA (M3) and adaptive-combiner checkpoints in its harness.

    python -m lmms_eval --model comm_vlm --model_args pretrained=DIR,matryoshka_scale=9 --tasks pope --batch_size 8

lmms-eval finds the model through the `lmms_eval.models` entry point of this package (`pyproject.toml`), which calls
[`lmms_eval_manifest`]; lmms-eval is an optional dependency (its install command is in `docs/evaluation.md`) and this
is the only module of the package that imports it.

Model arguments (`--model_args key=value,...`):

* `pretrained`: a checkpoint directory or Hub id of any family of this package (any image-text-to-text model of
  transformers loads too).
* `matryoshka_scale`: M3's visual tokens per image (one of the model's scales); default the processor's.
* `image_first` (default `true`): the user turn is the images, then the question (`<image>\\n` + question with the
  Vicuna template, the layout LLaVA-1.5, COMM and M3 are trained with); `false` puts the images after the question.
  A context that already contains the image token is left as it is.
* `chat_template`: a Jinja template, or the path of a file holding one; default the processor's.
* `system_prompt`: a system message (replaces the template's default one).
* `device` (default `cuda` when available, else `cpu`), `dtype` (`auto`, `float32`, `bfloat16`, `float16`),
  `batch_size` (prompts per `generate` call, left-padded), `max_new_tokens` (when a task names none; default 128),
  `attn_implementation`, `revision`, `trust_remote_code`.

`generate_until` groups the requests by their generation arguments, sorts them by prompt length and generates each
batch with left padding: greedy unless the task asks for sampling (`do_sample: true` or `temperature > 0`); the
answer is cut at the first of the task's `until` strings and stripped of surrounding whitespace. `loglikelihood`
scores the continuation after the same prompt (one request at a time). Multi-round generation and video inputs are
not supported; one process only (no data parallelism).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from lmms_eval import utils as lmms_utils
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.utils import logging

from ..models.image_utils import load_image


logger = logging.get_logger(__name__)

MODEL_NAME = "comm_vlm"
# Generation arguments of a task passed on to `generate` when sampling; greedy decoding ignores them.
_SAMPLING_KWARGS = ("top_p", "top_k")
_BEAM_KWARGS = ("num_beams", "length_penalty", "repetition_penalty", "no_repeat_ngram_size")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def lmms_eval_manifest() -> Any:
    """The `lmms_eval.models` entry point: registers this module's [`CommVLM`] under the name `comm_vlm`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.CommVLM")


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{name} must be true or false, got {value!r}.")


def _as_int(value: Any, name: str, minimum: int = 1) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.") from None
    if number < minimum or float(value) != number:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return number


class CommVLM(lmms):
    """lmms-eval's view of a COMM-family checkpoint (see the module docstring for the arguments).

    Args:
        pretrained (`str`): checkpoint directory or Hub id.
        matryoshka_scale (`int`, *optional*): M3's visual tokens per image.
        device (`str`, *optional*): torch device; default `cuda` when available, else `cpu`.
        dtype (`str` or `torch.dtype`): `auto` (the checkpoint's), `float32`, `bfloat16` or `float16`.
        batch_size (`int`): prompts per `generate` call.
        image_first (`bool`): images before the question in the user turn.
        chat_template (`str`, *optional*): Jinja template or the path of a file with one; default the processor's.
        system_prompt (`str`, *optional*): a system message for every prompt.
        max_new_tokens (`int`): generation length when a task gives none.
        attn_implementation (`str`, *optional*), revision (`str`, *optional*), trust_remote_code (`bool`): passed
            to `from_pretrained`.
        max_batch_size (`int`, *optional*): accepted for lmms-eval's `--max_batch_size`; unused (no automatic batch
            size).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        matryoshka_scale: int | None = None,
        device: str | None = None,
        dtype: str | torch.dtype = "auto",
        batch_size: int | str = 1,
        image_first: bool | str = True,
        chat_template: str | None = None,
        system_prompt: str | None = None,
        max_new_tokens: int | str = 128,
        attn_implementation: str | None = None,
        revision: str | None = None,
        trust_remote_code: bool | str = False,
        max_batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(
                f"Unknown model_args for {MODEL_NAME}: {sorted(kwargs)}. Known: pretrained, matryoshka_scale, device, "
                "dtype, batch_size, image_first, chat_template, system_prompt, max_new_tokens, attn_implementation, "
                "revision, trust_remote_code."
            )
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).removeprefix("torch.")
        if dtype != "auto" and dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}.")
        self.batch_size_per_gpu = _as_int(batch_size, "batch_size")
        self.max_new_tokens = _as_int(max_new_tokens, "max_new_tokens")
        self.image_first = _as_bool(image_first, "image_first")
        self.system_prompt = system_prompt or None
        if chat_template and os.path.isfile(chat_template):
            with open(chat_template, encoding="utf-8") as f:
                chat_template = f.read()
        self.chat_template = chat_template or None
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

        import comm_vlm  # noqa: F401  (registers the families with the Auto classes)

        load_kwargs = {"revision": revision, "trust_remote_code": _as_bool(trust_remote_code, "trust_remote_code")}
        self._model = AutoModelForImageTextToText.from_pretrained(
            pretrained,
            dtype=dtype if dtype == "auto" else _DTYPES[dtype],
            attn_implementation=attn_implementation,
            **load_kwargs,
        )
        self._model.to(self._device).eval()
        self.processor = AutoProcessor.from_pretrained(pretrained, **load_kwargs)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        if self.chat_template is None and getattr(self.processor, "chat_template", None) is None:
            raise ValueError(
                f"{pretrained!r} has no chat template; pass chat_template= (the template, or a file with it) so the "
                "prompt has the layout the model was trained with."
            )
        self.processor_kwargs: dict[str, Any] = {}
        if matryoshka_scale is not None:
            if not hasattr(self.processor, "matryoshka_scales"):
                raise ValueError(
                    f"matryoshka_scale applies to Matryoshka-LLaVA (M3) checkpoints; {pretrained!r} is a "
                    f"{self._model.config.model_type!r} model."
                )
            scale = _as_int(matryoshka_scale, "matryoshka_scale")
            if scale not in self.processor.matryoshka_scales:
                raise ValueError(
                    f"matryoshka_scale={scale} is not a scale of this model; use one of "
                    f"{self.processor.matryoshka_scales}."
                )
            self.processor_kwargs["matryoshka_scale"] = scale
        self.pretrained = pretrained
        self._rank, self._world_size = 0, 1

    # ------------------------------------------------------------------------------------------------------------
    # lmms-eval's properties
    # ------------------------------------------------------------------------------------------------------------

    @property
    def model(self) -> torch.nn.Module:
        """The transformers model."""
        return self._model

    @property
    def batch_size(self) -> int:
        """Prompts per `generate` call."""
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        """The model's device."""
        return self._device

    @property
    def eot_token_id(self) -> int | None:
        """The end-of-sequence token id."""
        return self.tokenizer.eos_token_id

    # ------------------------------------------------------------------------------------------------------------
    # Prompts
    # ------------------------------------------------------------------------------------------------------------

    def build_prompt(self, context: str, num_images: int) -> str:
        """The chat-formatted prompt (ending with the assistant's turn) for a task's `context` and its images.

        Args:
            context (`str`): the task's text (question and its instructions).
            num_images (`int`): images of the request; one image part each, before or after the text per
                `image_first`, unless the context already holds the image token.
        """
        image_token = getattr(self.processor, "image_token", None) or "<image>"
        text = [{"type": "text", "text": context}]
        images = [] if image_token in context else [{"type": "image"}] * num_images
        messages = [{"role": "user", "content": images + text if self.image_first else text + images}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        kwargs = {"chat_template": self.chat_template} if self.chat_template else {}
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)

    def _visuals(self, doc_to_visual: Any, task: str, split: str, doc_id: int) -> list:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        images = []
        for visual in visuals:
            if isinstance(visual, str) and visual.lower().endswith((".mp4", ".avi", ".mov", ".mkv", ".webm")):
                raise NotImplementedError(f"{MODEL_NAME} takes images only; got the video {visual!r}.")
            if isinstance(visual, dict):
                raise NotImplementedError(f"{MODEL_NAME} takes images only; got a {sorted(visual)} input.")
            images.append(load_image(visual))
        return images

    def _inputs(self, images: Sequence, prompts: Sequence[str]) -> Any:
        inputs = self.processor(
            images=list(images) or None, text=list(prompts), padding=True, return_tensors="pt", **self.processor_kwargs
        )
        return inputs.to(self._device).to(self._model.dtype)

    # ------------------------------------------------------------------------------------------------------------
    # Requests
    # ------------------------------------------------------------------------------------------------------------

    def _generation(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        """`generate` arguments and stop strings from a task's generation arguments."""
        gen_kwargs = dict(gen_kwargs)
        until = gen_kwargs.pop("until", None) or []
        if isinstance(until, str):
            until = [until]
        elif not isinstance(until, (list, tuple)):
            raise ValueError(f"gen_kwargs['until'] must be a string or a list of strings, got {type(until)}.")
        temperature = float(gen_kwargs.pop("temperature", 0) or 0)
        do_sample = bool(gen_kwargs.pop("do_sample", False)) or temperature > 0
        generation: dict[str, Any] = {
            "max_new_tokens": _as_int(gen_kwargs.pop("max_new_tokens", self.max_new_tokens), "max_new_tokens"),
            "do_sample": do_sample,
            "num_beams": 1,
        }
        for key in _BEAM_KWARGS:
            if gen_kwargs.get(key) is not None:
                generation[key] = gen_kwargs.pop(key)
        if do_sample:
            generation["temperature"] = temperature if temperature > 0 else 1.0
            generation.update({k: gen_kwargs.pop(k) for k in _SAMPLING_KWARGS if gen_kwargs.get(k) is not None})
        ignored = sorted(k for k in gen_kwargs if k not in _SAMPLING_KWARGS)
        if ignored:
            logger.info(f"{MODEL_NAME}: ignoring generation arguments {ignored}.")
        if getattr(self.tokenizer, "pad_token_id", None) is not None:
            generation["pad_token_id"] = self.tokenizer.pad_token_id
        eos = self.tokenizer.eos_token
        stops = [s for s in until if s and s != eos]
        if stops:
            generation.update(stop_strings=stops, tokenizer=self.tokenizer)
        return generation, [s for s in until if s]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers to `(context, gen_kwargs, doc_to_visual, doc_id, task, split)` requests, in the requests' order.

        Args:
            requests (`list[Instance]`): lmms-eval's requests.
        """
        if not requests:
            return []

        def sort_key(args: tuple) -> tuple[int, str]:
            return -len(self.tokenizer.encode(args[0])), args[0]

        collator = lmms_utils.Collator([request.args for request in requests], sort_key, grouping=True)
        answers: list[str] = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="Model Responding")
        padding_side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
                contexts, all_gen_kwargs, doc_to_visuals, doc_ids, tasks, splits = zip(*chunk)
                images, prompts = [], []
                for context, doc_to_visual, doc_id, task, split in zip(
                    contexts, doc_to_visuals, doc_ids, tasks, splits
                ):
                    visuals = self._visuals(doc_to_visual, task, split, doc_id)
                    images += visuals
                    prompts.append(self.build_prompt(context, len(visuals)))
                generation, until = self._generation(all_gen_kwargs[0])
                inputs = self._inputs(images, prompts)
                with torch.inference_mode():
                    output = self._model.generate(**inputs, **generation)
                new_tokens = output[:, inputs["input_ids"].shape[1] :]
                texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                for context, text in zip(contexts, texts):
                    for stop in until:
                        text = text.split(stop, 1)[0]
                    answers.append(text.strip())
                    self.cache_hook.add_partial("generate_until", (context, all_gen_kwargs[0]), answers[-1])
                progress.update(len(chunk))
        finally:
            self.tokenizer.padding_side = padding_side
            progress.close()
        return collator.get_original(answers)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Log-probability of each request's continuation after its prompt, and whether greedy decoding yields it.

        The continuation follows the chat-formatted prompt (the assistant's turn), as an answer would.

        Args:
            requests (`list[Instance]`): `(context, continuation, doc_to_visual, doc_id, task, split)` requests; the
                continuation may be a string or a function of the document.
        """
        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc="Model Responding"):
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            if not isinstance(continuation, str):
                continuation = continuation(self.task_dict[task][split][doc_id])
            images = self._visuals(doc_to_visual, task, split, doc_id)
            prompt = self.build_prompt(context, len(images))
            context_ids = self._inputs(images, [prompt])["input_ids"]
            inputs = self._inputs(images, [prompt + continuation])
            input_ids = inputs["input_ids"]
            start = context_ids.shape[1]
            if input_ids.shape[1] <= start or not torch.equal(input_ids[:, :start], context_ids):
                raise ValueError(
                    f"The continuation {continuation!r} does not tokenize as whole tokens after the prompt (it merges "
                    "with the prompt's last token, or is empty); loglikelihood needs separable tokens."
                )
            with torch.inference_mode():
                logits = self._model(**inputs).logits[0, start - 1 : -1].float()
            targets = input_ids[0, start:]
            logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).sum()
            results.append((float(logprobs), bool((logits.argmax(-1) == targets).all())))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), results[-1])
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        """Not supported: raises `NotImplementedError`."""
        raise NotImplementedError(f"{MODEL_NAME} does not implement multi-round generation; use single-turn tasks.")


__all__ = ["MODEL_NAME", "CommVLM", "lmms_eval_manifest"]
