"""Remote code: checkpoints written by `save_for_hub` load WITHOUT comm_vlm, from a directory and by repo id from an
offline Hub cache, with `trust_remote_code=True`, and give the package model's logits exactly.

One subprocess (the same interpreter, `-I`, with every path and import hook that could expose comm_vlm removed and a
finder that refuses it) loads every model type; its results are compared here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_hub import FAMILIES, PROMPTS, build_family, generate_and_decode, image

import comm_vlm
from comm_vlm.hub import add_to_hub_cache, save_for_hub


FRESH_INTERPRETER = r"""
import importlib.abc, importlib.util, json, os, sys

jobs_file, out_file, package_dir = sys.argv[1:4]
package_dir = os.path.realpath(package_dir)


def exposes_package(entry):
    real = os.path.realpath(entry or os.getcwd())
    return real == package_dir or real.startswith(package_dir + os.sep) or "__editable__" in entry


# An editable install exposes the package through a path entry (.pth) or a setuptools `__editable__` finder.
sys.path[:] = [p for p in sys.path if not exposes_package(p)]
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]
sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in getattr(h, "__module__", "")]
sys.path_importer_cache.clear()
importlib.invalidate_caches()
findable_after_path_filter = importlib.util.find_spec("comm_vlm") is not None


class RefuseCommVlm(importlib.abc.MetaPathFinder):  # belt and braces, e.g. for a non-editable install
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "comm_vlm":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, RefuseCommVlm())
try:
    import comm_vlm  # noqa: F401
    importable = True
except ModuleNotFoundError:
    importable = False

import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

results = []
for job in json.load(open(jobs_file)):
    reference = load_file(job["reference"])
    picture = Image.open(job["image"])
    picture.load()
    for source in (job["local_dir"], job["repo_id"]):
        model = AutoModelForImageTextToText.from_pretrained(source, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
        inputs = processor(images=picture, text=job["prompt"], return_tensors="pt", **job["call_kwargs"])
        same_inputs = set(inputs) == set(reference) - {"logits"} and all(
            torch.equal(inputs[k], reference[k]) for k in inputs
        )
        with torch.no_grad():
            logits = model(**inputs).logits
        # a user who never heard of the package: pipeline() by repo id
        pipe = pipeline("image-text-to-text", model=source, trust_remote_code=True)
        answer = pipe(images=picture, text=job["prompt"], max_new_tokens=4, generate_kwargs={"do_sample": False},
                      return_full_text=False, **job["call_kwargs"])[0]["generated_text"]
        results.append({
            "model_type": job["model_type"],
            "source": "directory" if source == job["local_dir"] else "hub cache",
            "model_class": f"{type(model).__module__}.{type(model).__name__}",
            "processor_class": f"{type(processor).__module__}.{type(processor).__name__}",
            "same_inputs": same_inputs,
            "max_abs_diff": (logits - reference["logits"]).abs().max().item(),
            "pipeline_answer": answer,
        })
leaked = sorted(m for m in sys.modules if m.split(".")[0] == "comm_vlm")
json.dump({"findable_after_path_filter": findable_after_path_filter, "importable": importable, "leaked": leaked,
           "results": results}, open(out_file, "w"))
"""


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one intra-op thread (several thrash when the CPU is shared); restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def fresh_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("remote_code")
    picture = image(3, size=(36, 44))
    picture.save(tmp / "image.png")
    jobs = []
    for model_type in sorted(FAMILIES):
        model, processor = build_family(model_type)
        call_kwargs = FAMILIES[model_type][2]
        local_dir = tmp / "ckpt" / model_type
        save_for_hub(model, local_dir, processor)
        repo_id = f"comm-vlm-test/remote-{model_type.replace('_', '-')}"
        add_to_hub_cache(local_dir, repo_id, cache_dir=tmp / "hub")
        inputs = processor(images=picture, text=PROMPTS[1], return_tensors="pt", **call_kwargs)
        with torch.no_grad():
            logits = model(**inputs).logits
        answer = generate_and_decode(model, processor, inputs, max_new_tokens=4, do_sample=False)[0]
        reference = {**{k: v.contiguous() for k, v in inputs.items()}, "logits": logits}
        save_file(reference, tmp / f"{model_type}.safetensors")
        jobs.append(
            {
                "model_type": model_type,
                "local_dir": str(local_dir),
                "repo_id": repo_id,
                "prompt": PROMPTS[1],
                "call_kwargs": call_kwargs,
                "image": str(tmp / "image.png"),
                "reference": str(tmp / f"{model_type}.safetensors"),
                "expected_answer": answer,
            }
        )
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    (tmp / "fresh.py").write_text(FRESH_INTERPRETER)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_", "TRANSFORMERS_"))}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp / "hf_home"),
        HF_HUB_CACHE=str(tmp / "hub"),
        HF_MODULES_CACHE=str(tmp / "modules"),
        OMP_NUM_THREADS="1",
    )
    package_dir = Path(comm_vlm.__file__).resolve().parent.parent  # src/ (editable install or PYTHONPATH)
    command = [sys.executable, "-I", str(tmp / "fresh.py"), str(tmp / "jobs.json"), str(tmp / "out.json")]
    done = subprocess.run([*command, str(package_dir)], cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return {**json.loads((tmp / "out.json").read_text()), "tmp": tmp}


def test_package_is_hidden_in_the_fresh_interpreter(fresh_results):
    if Path(comm_vlm.__file__).resolve().parent.parent.name != "site-packages":  # a regular install needs the finder
        assert fresh_results["findable_after_path_filter"] is False
    assert fresh_results["importable"] is False and fresh_results["leaked"] == []


@pytest.mark.parametrize("source", ["directory", "hub cache"])
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_remote_code_loads_and_gives_identical_logits(fresh_results, model_type, source):
    (result,) = [r for r in fresh_results["results"] if r["model_type"] == model_type and r["source"] == source]
    model, processor = build_family(model_type)
    for key, cls in (("model_class", type(model)), ("processor_class", type(processor))):
        assert result[key].startswith("transformers_modules.") and result[key].endswith("." + cls.__name__)
    assert result["same_inputs"] is True
    assert result["max_abs_diff"] == 0.0
    (job,) = [j for j in json.loads((fresh_results["tmp"] / "jobs.json").read_text()) if j["model_type"] == model_type]
    assert result["pipeline_answer"] == job["expected_answer"]
