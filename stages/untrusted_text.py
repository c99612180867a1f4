"""Prompt text is untrusted (it carries web captions): it is tokenized as text, never as control tokens.

A caption holding ``</s>``, ``<|im_start|>`` or ``<image>`` must not end the prompt, open a new chat turn
or ask for an image. Where we tokenize (transformers, vLLM text prompts) the user's text is encoded with
``split_special_tokens=True`` between the chat template's own markup, which is encoded as markup. Where
someone else tokenizes (a VLM processor counting ``<image>`` tokens, a remote OpenAI-style server) the
text is *defused*: a space after the first character of anything spelled like a control token, so no
tokenizer can match it, and the reader still sees the same characters.
"""

from __future__ import annotations

import re
from typing import Any

# Control-token spellings of the common model families, for tokenizers we cannot ask (a remote server).
CONTROL_TOKEN = re.compile(
    r"<\|[^<>|\s]{1,64}\|>"  # <|im_start|>, <|endoftext|>, <|eot_id|> (ChatML, GPT, Llama 3)
    r"|</?(?:s|unk|pad|bos|eos|mask|image|video|start_of_turn|end_of_turn|think)>"  # Llama 2, Gemma, VLMs
    r"|\[/?INST\]|<</?SYS>>"  # Llama 2 / Mistral chat markup
    r"|<\uff5c[^<>\s]{1,64}\uff5c>"  # DeepSeek's full-width bars
)
# Stands in for the user's text while the chat template renders around it (a template never emits it).
PLACEHOLDER = "\x00pairsift-user-text\x00"


def _break(token: str) -> str:
    return token[0] + " " + token[1:]


def special_strings(tokenizer: Any) -> list[str]:
    """Every special token's text that the tokenizer would match inside a string, longest first."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    names = {t.content for t in added.values() if getattr(t, "special", False)}
    names.update(getattr(tokenizer, "all_special_tokens", []) or [])
    return sorted((n for n in names if len(n) > 1), key=len, reverse=True)


def defuse(text: str, specials: list[str] = ()) -> str:
    """``text`` with every control-token spelling broken by a space (the tokenizer's own, then the
    common families'), so whatever tokenizes it later sees ordinary characters."""
    if specials:
        text = re.sub("|".join(re.escape(s) for s in specials), lambda m: _break(m.group()), text)
    return CONTROL_TOKEN.sub(lambda m: _break(m.group()), text)


def text_ids(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    """Token ids of untrusted text: special-token spellings inside it are split into ordinary tokens."""
    return tokenizer(text, add_special_tokens=add_special_tokens, split_special_tokens=True)["input_ids"]


def prompt_ids(tokenizer: Any, text: str, chat: bool) -> list[int]:
    """The prompt's token ids: plain text (with the tokenizer's BOS), or the text in one user turn of the
    chat template, the template's markup encoded as markup and the text as text."""
    if not chat:
        return text_ids(tokenizer, text, add_special_tokens=True)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": PLACEHOLDER}], add_generation_prompt=True, tokenize=False
    )
    if rendered.count(PLACEHOLDER) != 1:  # a template that rewrites the content: defuse instead
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": defuse(text, special_strings(tokenizer))}],
            add_generation_prompt=True, tokenize=False,
        )
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    before, after = rendered.split(PLACEHOLDER)
    # as apply_chat_template(tokenize=True) does: the template itself writes any BOS it wants
    return [*tokenizer(before, add_special_tokens=False)["input_ids"],
            *text_ids(tokenizer, text, add_special_tokens=False),
            *tokenizer(after, add_special_tokens=False)["input_ids"]]
