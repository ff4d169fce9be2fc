"""Prompt formatting and text generation shared by the CLI, the server and the Space."""

from __future__ import annotations

from typing import Any

from .errors import InvalidInputError
from .modeling import GREEDY_GENERATE


def format_prompt(tokenizer: Any, prompt: str, *, raw: bool = False, system: str | None = None) -> str:
    """Apply the tokenizer's chat template to one user turn (or return ``prompt`` as is with ``raw``)."""
    if raw or not getattr(tokenizer, "chat_template", None):
        return prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


PLACEHOLDER = "{prompt}"


def prompt_template(tokenizer: Any, *, raw: bool = False, system: str | None = None) -> str:
    """The exact text around one user prompt, as a template with a ``{prompt}`` placeholder.

    Adapters record it at training time so that chatting with them later uses the same format.
    """
    if raw or not getattr(tokenizer, "chat_template", None):
        return PLACEHOLDER
    sentinel = "\x00HUB_PEFT_PROMPT\x00"
    template = format_prompt(tokenizer, sentinel, system=system)
    if template.count(sentinel) != 1:
        raise InvalidInputError("The tokenizer's chat template does not render the user prompt verbatim.")
    return template.replace(PLACEHOLDER, "{{prompt}}").replace(sentinel, PLACEHOLDER)


def trained_prompt_template(model: Any) -> str | None:
    """The prompt template an adapter on ``model`` was trained with, when it recorded one."""
    config = getattr(model, "reft_config", None)
    return getattr(config, "prompt_template", None) or getattr(model, "hub_peft_prompt_template", None)


def apply_template(template: str, prompt: str) -> str:
    """Fill a :func:`prompt_template` (``{{prompt}}`` in a template stands for a literal ``{prompt}``)."""
    parts = template.split("{{prompt}}")
    return "{prompt}".join(part.replace(PLACEHOLDER, prompt) for part in parts)


def encode_prompt(tokenizer: Any, prompt: str, template: str) -> list[int]:
    """Token ids of ``prompt`` in ``template``. Special tokens come from the template itself, except a
    bare ``{prompt}`` template, where the tokenizer adds its usual ones (e.g. BOS)."""
    text = apply_template(template, prompt)
    return tokenizer(text, add_special_tokens=template == PLACEHOLDER)["input_ids"]


def generate_reply(model: Any, tokenizer: Any, prompt: str, **options: Any) -> str:
    """Generate an answer to ``prompt`` and return only the new text (``options``: those of
    :func:`generate_replies`; greedy unless ``sample=True``)."""
    return generate_replies(model, tokenizer, [prompt], **options)[0]


def generate_replies(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    sample: bool = False,
    raw: bool = False,
    template: str | None = None,
    temperature: float = 0.7,
    top_p: float = 0.9,
    batch_size: int = 8,
) -> list[str]:
    """Answers to ``prompts`` (greedy unless ``sample``), only the new text, ``batch_size`` prompts at a
    time (left-padded batches).

    Each prompt is formatted with ``template`` (a :func:`prompt_template`) if given, else the one the
    model's adapter was trained with (recorded in its config), else the tokenizer's chat template.
    """
    import torch

    if max_new_tokens < 1:
        raise InvalidInputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if template is None and not raw:
        template = trained_prompt_template(model)
    if template is None:
        template = prompt_template(tokenizer, raw=raw)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": pad}
    kwargs.update({"do_sample": True, "temperature": temperature, "top_p": top_p} if sample else GREEDY_GENERATE)
    replies = []
    for start in range(0, len(prompts), batch_size):
        encoded = [encode_prompt(tokenizer, p, template) for p in prompts[start : start + batch_size]]
        width = max(map(len, encoded))
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
        with torch.inference_mode():
            output = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        replies += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in output]
    return replies


def require_chat_adapters(specs: list[str], where: str = "hub-peft chat") -> None:
    """Refuse adapters that are not causal LM adapters (a classifier's, a seq2seq model's...): chat generates
    with a causal LM. ``specs`` are what ``load_adapters`` takes (folders or ``namespace/name[@rev][:sub]``)."""
    from .adapters import parse_adapter_spec, resolve_adapter
    from .tasks import require_causal_adapter

    for spec in specs:
        source, revision, subfolder = parse_adapter_spec(str(spec))
        folder = resolve_adapter(source, revision=revision, subfolder=subfolder).folder
        require_causal_adapter(folder, spec, where)
