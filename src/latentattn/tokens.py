"""The special tokens a checkpoint's model expects: what starts a prompt (BOS), which tokens end a
completion (EOS), and the chat template.

A trained model uses the document separator `latentattn.data.EOS` for both: every prompt starts with
it, as training documents do, and a completion ends with it. An imported model keeps its source's,
stored under "tokens" in the checkpoint's config.json.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer

from latentattn.data import EOS


@dataclass(frozen=True)
class SpecialTokens:
    """`bos_id` is prepended to every prompt when `add_bos`; generation stops at any of `eos_ids`."""

    bos_id: int | None
    eos_ids: tuple[int, ...]
    add_bos: bool = True
    chat_template: str | None = None

    def __post_init__(self) -> None:
        if self.add_bos and self.bos_id is None:
            raise ValueError("SpecialTokens.add_bos needs a bos_id")

    def to_dict(self) -> dict[str, Any]:
        return {
            "bos_token_id": self.bos_id,
            "eos_token_ids": list(self.eos_ids),
            "add_bos_token": self.add_bos,
            "chat_template": self.chat_template,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], vocab_size: int) -> SpecialTokens:
        """Inverse of `to_dict`; ids outside `[0, vocab_size)` or malformed fields raise ValueError."""
        try:
            tokens = cls(
                bos_id=data["bos_token_id"],
                eos_ids=tuple(data["eos_token_ids"]),
                add_bos=bool(data["add_bos_token"]),
                chat_template=data.get("chat_template"),
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"malformed special tokens ({type(error).__name__}: {error})") from None
        ids = [*tokens.eos_ids, *([] if tokens.bos_id is None else [tokens.bos_id])]
        bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"special token ids {bad} lie outside the vocabulary of {vocab_size}")
        return tokens


def separator_tokens(tokenizer: Tokenizer) -> SpecialTokens:
    """A trained model's: the document separator `EOS` starts every prompt and ends a completion."""
    separator = tokenizer.token_to_id(EOS)
    if separator is None:
        raise ValueError(f"the tokenizer has no {EOS} token (the document separator)")
    return SpecialTokens(bos_id=separator, eos_ids=(separator,))


def encode_prompt(tokenizer: Tokenizer, tokens: SpecialTokens, text: str) -> list[int]:
    """The ids a prompt is fed as: BOS (when `tokens.add_bos`), then `text` without the tokenizer's own
    special tokens."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    return [tokens.bos_id, *ids] if tokens.add_bos else ids
