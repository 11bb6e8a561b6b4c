"""Run under `accelerate launch`: one tiny COMM stage on every rank, then each rank writes its weights' checksum."""

import hashlib
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import TrainerCallback

from comm_vlm.testing import register_tiny_model_source
from comm_vlm.training import load_recipe, parse_overrides, run_recipe


register_tiny_model_source()


class ChecksumAtEnd(TrainerCallback):
    """Each rank hashes its own copy of the weights when training ends."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def on_train_end(self, args, state, control, model=None, **kwargs):
        digest = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
        rank = PartialState().process_index
        Path(self.output_dir, f"rank{rank}.sha256").write_text(digest.hexdigest())


def main(output_dir: str, *overrides: str) -> None:
    recipe = load_recipe(str(Path(__file__).parent / "recipes" / "tiny_comm.yaml"), parse_overrides(list(overrides)))
    recipe["stages"] = recipe["stages"][:1]
    run_recipe(recipe, output_dir, callbacks=[ChecksumAtEnd(output_dir)])


if __name__ == "__main__":
    main(*sys.argv[1:])
