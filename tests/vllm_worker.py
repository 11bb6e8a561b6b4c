"""vLLM on a tiny checkpoint of this package, against `generate` (run by `tests/test_vllm.py` in a subprocess).

    python tests/vllm_worker.py CHECKPOINT OUT.json [--scale S] [--server]

Writes `{"generate": [...], "vllm": [...]}` (greedy token ids, or texts with `--server`), or `{"error": "..."}` when
vLLM refuses the model. vLLM's internal messaging and the server bind to 127.0.0.1 only; the server is stopped here.
"""

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request


LOOPBACK = {"VLLM_HOST_IP": "127.0.0.1", "VLLM_LOOPBACK_IP": "127.0.0.1"}
os.environ.update(LOOPBACK, VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1")
QUESTION = "What is it?"
PROMPT = f"USER: <image>\n{QUESTION} ASSISTANT:"
NEW_TOKENS = 8
ENGINE = {"model_impl": "transformers", "trust_remote_code": True, "max_model_len": 256, "dtype": "float32"}


def _image():
    from PIL import Image

    return Image.new("RGB", (64, 64), "red")


def reference(path: str, scale: int | None, chat: bool = False) -> tuple[list[int], str]:
    """Greedy ids and text from `generate`: on `PROMPT`, or (`chat`) on the chat template's rendering of the question
    the server is asked."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import comm_vlm  # noqa: F401  (registers the families)

    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    kwargs = {"matryoshka_scale": scale} if scale else {}
    prompt = PROMPT
    if chat:
        content = [{"type": "image"}, {"type": "text", "text": QUESTION}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=_image(), text=prompt, return_tensors="pt", **kwargs)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    ids = output[0, inputs["input_ids"].shape[1] :].tolist()
    return ids, processor.decode(ids, skip_special_tokens=True)


def offline(path: str, scale: int | None) -> list[int]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=path, enforce_eager=True, gpu_memory_utilization=0.15, limit_mm_per_prompt={"image": 1}, **ENGINE)
    request = {"prompt": PROMPT, "multi_modal_data": {"image": _image()}}
    if scale:
        request["mm_processor_kwargs"] = {"matryoshka_scale": scale}
    outputs = llm.generate(request, SamplingParams(temperature=0, max_tokens=NEW_TOKENS))
    return list(outputs[0].outputs[0].token_ids)


def served(path: str, scale: int | None) -> str:
    """One OpenAI-compatible completion from `vllm serve` on 127.0.0.1 (the prompt as the processor writes it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path, "--host", "127.0.0.1"]
    args += ["--port", str(port), "--model-impl", "transformers", "--trust-remote-code", "--max-model-len", "256"]
    args += ["--dtype", "float32", "--enforce-eager", "--gpu-memory-utilization", "0.15", "--trust-request-mm-kwargs"]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError(f"vllm serve exited: {server.stderr.read()[-2000:]}") from None
                time.sleep(1)
        buffer = io.BytesIO()
        _image().save(buffer, format="PNG")
        image_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_url}},
                    {"type": "text", "text": QUESTION},
                ],
            }
        ]
        body = {"model": path, "messages": messages, "max_tokens": NEW_TOKENS, "temperature": 0}
        if scale:
            body["mm_processor_kwargs"] = {"matryoshka_scale": scale}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                return json.loads(response.read())["choices"][0]["message"]["content"]
        except urllib.error.HTTPError as err:
            raise RuntimeError(f"HTTP {err.code}: {err.read().decode()[:2000]}") from None
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("output")
    parser.add_argument("--scale", type=int)
    parser.add_argument("--server", action="store_true")
    args = parser.parse_args()
    ids, text = reference(args.checkpoint, args.scale, chat=args.server)
    try:
        result = (
            {"generate": text, "vllm": served(args.checkpoint, args.scale)}
            if args.server
            else {"generate": ids, "vllm": offline(args.checkpoint, args.scale)}
        )
    except Exception as err:  # vLLM's refusal (e.g. the adaptive combiner) is the result
        result = {"error": f"{type(err).__name__}: {err}"}
    with open(args.output, "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main()
