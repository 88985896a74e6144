"""Chat messages → prompt token ids: the checkpoint's own chat template, or a plain one.

Imported instruct models carry their Jinja chat template (`SpecialTokens.chat_template`, from HF's
tokenizer_config.json or chat_template.jinja, or a GGUF's metadata); it is rendered as transformers
renders it (sandboxed, `trim_blocks`, `lstrip_blocks`, `add_generation_prompt=True`) and encoded
without adding special tokens (the template writes its own BOS). A model without one (every model
trained here) gets `PLAIN_TEMPLATE`: one `role: content` line per message, then `assistant:`, after
BOS, as its prompts always start.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from latentattn.tokens import SpecialTokens, encode_prompt

PLAIN_TEMPLATE = "{role}: {content}\n"
"""Each message's line in the plain template; the prompt ends with `assistant:`."""


def plain_prompt(messages: Sequence[dict[str, str]]) -> str:
    return "".join(PLAIN_TEMPLATE.format(**message) for message in messages) + "assistant:"


def _raise(message: str) -> None:
    raise ValueError(f"the chat template refused the messages: {message}")


def render_template(
    template: str, messages: Sequence[dict[str, Any]], tokens: SpecialTokens, tokenizer: Tokenizer
) -> str:
    """The text `template` makes of `messages` (ready for the assistant's reply)."""
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = _raise
    special = {
        "bos_token": tokenizer.id_to_token(tokens.bos_id) if tokens.bos_id is not None else "",
        "eos_token": tokenizer.id_to_token(tokens.eos_ids[0]) if tokens.eos_ids else "",
    }
    try:
        return environment.from_string(template).render(
            messages=list(messages), add_generation_prompt=True, **special
        )
    except jinja2.TemplateError as error:
        raise ValueError(f"the checkpoint's chat template failed: {error}") from None


def chat_prompt(messages: Sequence[dict[str, str]], tokens: SpecialTokens, tokenizer: Tokenizer) -> list[int]:
    """Prompt ids for `messages` (`{"role", "content"}` dicts) through the checkpoint's template."""
    if tokens.chat_template is None:
        return encode_prompt(tokenizer, tokens, plain_prompt(messages))
    text = render_template(tokens.chat_template, messages, tokens, tokenizer)
    return tokenizer.encode(text, add_special_tokens=False).ids
