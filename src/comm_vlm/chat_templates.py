"""Chat templates of the published checkpoints the families start from (LLaVA-1.5, COMM and M3 use Vicuna-v1's).

Every template marks the assistant's turns with `{% generation %}`, so `return_assistant_tokens_mask=True` (TRL's
`assistant_only_loss`) trains on the answers only.
"""

from __future__ import annotations

import json


# The system prompt of the Vicuna-v1 conversation (LLaVA-1.5's, shortened as in Vicuna's own template).
VICUNA_SYSTEM_PROMPT = "A chat between a curious human and an artificial intelligence assistant."


def vicuna_chat_template(system_prompt: str = VICUNA_SYSTEM_PROMPT) -> str:
    """The Vicuna-v1 style conversation ("USER: ... ASSISTANT: ...</s>") of LLaVA-1.5, COMM (Vicuna-7B) and M3.

    Content may be a string or a list of {"type": "image"} / {"type": "text", "text": ...} parts. A leading system
    message replaces `system_prompt`; an empty system prompt renders none (the prompt starts at "USER:").
    """
    return (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set messages = messages[1:] %}{% else %}"
        # JSON string syntax is Jinja string syntax: any quote or apostrophe in the prompt is escaped.
        f"{{% set system = {json.dumps(system_prompt)} %}}{{% endif %}}"
        "{% if system is not string %}{% set system = system[0]['text'] %}{% endif %}"
        "{{ bos_token }}{% if system %}{{ system }} {% endif %}"
        "{% for message in messages %}"
        "{% if message['content'] is string %}{% set text = message['content'] %}"
        "{% else %}{% set text = namespace(v='') %}"
        "{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}{% set text.v = text.v + '<image>\n' %}"
        "{% elif part['type'] == 'text' %}{% set text.v = text.v + part['text'] %}{% endif %}"
        "{% endfor %}{% set text = text.v %}{% endif %}"
        "{% if message['role'] == 'user' %}USER: {{ text }} "
        # The space after "ASSISTANT:" is inside the generation block: the model generates it (the prompt ends at
        # ":"), so it must be supervised. Words carry it in their first token (" purple"), but digits split off a
        # bare " " token (" 2" -> " ", "2") that the loss would otherwise never train, and a count answer could
        # never start.
        "{% else %}ASSISTANT:{% generation %} {{ text }}{{ eos_token }}{% endgeneration %}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )


CHAT_TEMPLATE = vicuna_chat_template()
