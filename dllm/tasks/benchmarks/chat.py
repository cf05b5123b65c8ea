"""Chat rendering of benchmark prompts: the checkpoint's chat template (jinja2, as Hugging Face renders it),
or a plain fallback format with a warning."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence


CHAT_FALLBACK = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{{ '\\n' }}{% endif %}")


def render_chat(template: str | None, messages: Sequence[Mapping[str, str]], *, tokenizer=None,
                add_generation_prompt: bool = True) -> str:
    """Renders `messages` with a Hugging Face chat template (jinja2), as `apply_chat_template` does.

    Falls back to `CHAT_FALLBACK` (with a warning) when jinja2 is not installed
    or `template` is None.
    """
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        warnings.warn("jinja2 is not installed: chat prompts use the simple fallback format "
                      "'<|role|>\\ncontent\\n'; `pip install jinja2` to render the checkpoint's chat template")
        jinja2, template = None, None
    if template is None:
        template = CHAT_FALLBACK
    if jinja2 is None:  # the fallback is simple enough to render by hand
        return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + (
            "<|assistant|>\n" if add_generation_prompt else "")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    specials = {}
    if tokenizer is not None:
        backend = getattr(tokenizer, "backend", None)
        for role in ("bos", "eos", "pad"):
            token_id = getattr(tokenizer, f"{role}_id", None)
            if token_id is not None and backend is not None:
                specials[f"{role}_token"] = backend.id_to_token(token_id) or ""
        if backend is not None and "bos_token" not in specials:
            for text in ("<|startoftext|>", "<s>", "<|begin_of_text|>"):
                if backend.token_to_id(text) is not None:
                    specials["bos_token"] = text
                    break
    specials.setdefault("bos_token", "")
    return env.from_string(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                            **specials)


def chat_template_of(tokenizer) -> str | None:
    return getattr(tokenizer, "chat_template", None) if tokenizer is not None else None

