"""Prompt formatting and text generation shared by the CLI, the server and the Space."""

from __future__ import annotations

from typing import Any


def format_prompt(tokenizer: Any, prompt: str, *, raw: bool = False, system: str | None = None) -> str:
    """Apply the tokenizer's chat template to one user turn (or return ``prompt`` as is with ``raw``)."""
    if raw or not getattr(tokenizer, "chat_template", None):
        return prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def generate_reply(
    model: Any,
    tokenizer: Any,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    sample: bool = False,
    raw: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
) -> str:
    """Generate an answer to ``prompt`` (greedy unless ``sample``) and return only the new text."""
    import torch

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    text = format_prompt(tokenizer, prompt, raw=raw)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=raw)
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": sample,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with torch.inference_mode():
        output = model.generate(**inputs, **kwargs)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
