"""Chat templates: a prompt/response pair rendered as one user turn and one assistant turn.

A chat template is the Jinja string that Hugging Face tokenizers keep in `tokenizer_config.json`
(`chat_template`; SmolLM2-Instruct's is ChatML). It is rendered as transformers'
`apply_chat_template` renders it (a sandboxed Jinja environment, `trim_blocks`, `lstrip_blocks`,
`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII), with `jinja2` when it is
installed. Without `jinja2`, only SmolLM2's ChatML template is rendered (by hand); any other
template asks for `pip install jinja2`.

    prompt_text, full_text = render_pair(template, "Hi", "Hello!")
    # prompt_text: "<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n"
    # full_text:   prompt_text + "Hello!<|im_end|>\\n"
"""

import datetime
import json

# SmolLM2-Instruct's template (its GGUF file's `tokenizer.chat_template`): ChatML with a default system turn.
SMOLLM2_CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chat_template_of(preprocessor):
    """The chat template a preprocessor carries (`preprocessor.chat_template` or
    `preprocessor.tokenizer.chat_template`, a Jinja string), or None when it has none."""
    for holder in (preprocessor, getattr(preprocessor, "tokenizer", None)):
        template = getattr(holder, "chat_template", None)
        if template:
            return template
    return None


def render_chat(template, messages, add_generation_prompt=False, bos_token="", eos_token=""):
    """The text `template` makes of `messages` (a list of {"role", "content"} dicts)."""
    try:
        import jinja2  # noqa: F401  (optional: not a dependency of this package)
    except ImportError:
        if template != SMOLLM2_CHATML:
            raise ValueError(
                "This chat template needs jinja2 to be rendered (only SmolLM2's ChatML template is rendered "
                f"without it). Got a template starting {template[:60]!r}. Run `pip install jinja2`, or set "
                "DataConfig chat_template=False to join prompt and response as they are."
            ) from None
        return _render_smollm2(messages, add_generation_prompt)
    return _jinja_template(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token, eos_token=eos_token
    )


def render_pair(template, prompt, response, bos_token="", eos_token=""):
    """(prompt text, full text): the user turn ending with the assistant's header, and the whole
    exchange. The full text starts with the prompt text (else ValueError: the template renders the
    user turn differently once an answer follows, so no token boundary separates the two)."""
    user = {"role": "user", "content": prompt}
    prompt_text = render_chat(template, [user], add_generation_prompt=True, bos_token=bos_token, eos_token=eos_token)
    full_text = render_chat(
        template, [user, {"role": "assistant", "content": response}], bos_token=bos_token, eos_token=eos_token
    )
    if not full_text.startswith(prompt_text):
        raise ValueError(
            "The chat template renders a user turn with add_generation_prompt=True as "
            f"{prompt_text[-80:]!r}, but the same turn followed by the answer as {full_text[:len(prompt_text)][-80:]!r}: "
            "the prompt is not a prefix of the exchange, so the response's tokens cannot be told apart. "
            "Set DataConfig chat_template=False (or pass a template whose generation prompt is the assistant header)."
        )
    return prompt_text, full_text


_JINJA_CACHE = {}


def _jinja_template(template):
    """The compiled template, in the environment transformers' `apply_chat_template` uses."""
    if template not in _JINJA_CACHE:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(f"The chat template refused the messages: {message}")

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda format: datetime.datetime.now().strftime(format)
        try:
            _JINJA_CACHE[template] = env.from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"The chat template is not valid Jinja ({e}). Got {template[:80]!r}.") from None
    return _JINJA_CACHE[template]


def _render_smollm2(messages, add_generation_prompt):
    turns = [] if messages and messages[0]["role"] == "system" else [("system", _SMOLLM2_SYSTEM)]
    turns += [(m["role"], m["content"]) for m in messages]
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
