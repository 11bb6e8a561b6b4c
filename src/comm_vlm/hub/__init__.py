"""Hugging Face Hub tooling: remote code, model cards, saving and pushing, and the Hub cache layout.

    save_for_hub(model, "out/", processor, card=ModelCardInfo(...))   # weights + processor + remote code + README.md
    push_to_hub(model, "me/comm-7b", processor, card=...)             # the same files, in one commit
    add_to_hub_cache("out/", "me/comm-7b")                             # lay a checkpoint out as a Hub download

Remote code is written only by `save_for_hub` / `push_to_hub` (and `comm-vlm convert`, and a training stage's
`final/`), never by a plain `save_pretrained` (`docs/hub.md`). The model-card templates live in
`comm_vlm/hub/model_cards/`. A directory with a `training_provenance.json` (`read_provenance`) gets a card describing
the run recorded there.
"""

from .cache import add_to_hub_cache
from .cards import (
    METHODS,
    PROVENANCE_FILE,
    ModelCardInfo,
    card_info_from_provenance,
    describe_config,
    load_instructions,
    read_provenance,
    render_model_card,
    training_from_provenance,
    training_from_recipe,
)
from .push import push_to_hub, save_for_hub, save_for_hub_into
from .remote_code import REMOTE_CODE_ALLOWED_IMPORTS, check_remote_code, remote_code_export


__all__ = [
    "METHODS",
    "PROVENANCE_FILE",
    "REMOTE_CODE_ALLOWED_IMPORTS",
    "ModelCardInfo",
    "add_to_hub_cache",
    "card_info_from_provenance",
    "check_remote_code",
    "describe_config",
    "load_instructions",
    "push_to_hub",
    "read_provenance",
    "remote_code_export",
    "render_model_card",
    "save_for_hub",
    "save_for_hub_into",
    "training_from_provenance",
    "training_from_recipe",
]
