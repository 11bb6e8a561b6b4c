"""Hugging Face Hub tooling: remote code, model cards, saving and pushing, and the Hub cache layout.

    save_for_hub(model, "out/", processor, card=ModelCardInfo(...))   # weights + processor + remote code + README.md
    push_to_hub(model, "me/comm-7b", processor, card=...)             # the same files, in one commit
    add_to_hub_cache("out/", "me/comm-7b")                             # lay a checkpoint out as a Hub download

Remote code is written only by `save_for_hub` / `push_to_hub` (and `comm-vlm convert`), never by a plain
`save_pretrained` (`docs/hub.md`). The model-card templates live in `comm_vlm/hub/model_cards/`.
"""

from .cache import add_to_hub_cache
from .cards import METHODS, ModelCardInfo, describe_config, render_model_card, training_from_recipe
from .push import push_to_hub, save_for_hub
from .remote_code import REMOTE_CODE_ALLOWED_IMPORTS, check_remote_code, remote_code_export


__all__ = [
    "METHODS",
    "REMOTE_CODE_ALLOWED_IMPORTS",
    "ModelCardInfo",
    "add_to_hub_cache",
    "check_remote_code",
    "describe_config",
    "push_to_hub",
    "remote_code_export",
    "render_model_card",
    "save_for_hub",
    "training_from_recipe",
]
