"""Examples to text: which part is the prompt and which part the model must learn to produce.

Training and evaluation both go through `render_example`, so the prompt a model is evaluated with is, character
for character, the prompt it was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import DiaBloError
from .config import DatasetSource
from .presets import resolve_source

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
TEMPLATES = ("alpaca", "chat", "plain")

# Logical fields of each format: required ones first; `input` is the only optional one.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "instruction": ("instruction", "input", "output"),
    "prompt_completion": ("prompt", "completion"),
    "chat": ("messages",),
    "text": ("text",),
}
OPTIONAL_FIELDS = frozenset({"input"})


@dataclass(frozen=True)
class RenderedExample:
    """One example as text, with the character spans that are supervised."""

    text: str
    supervised: tuple[tuple[int, int], ...]  # [start, end) character spans the loss is computed on
    prompt_end: int  # the generation prompt is text[:prompt_end]
    special_prefix: bool  # prepend the tokenizer's BOS-like tokens (False when a chat template wrote its own)
    append_eos: bool  # end the response with the tokenizer's eos token, so that the model learns to stop


def format_of(source: DatasetSource) -> str:
    """The format in effect: the recipe's, else the preset's, else instruction."""
    return resolve_source(source).format or "instruction"


def template_of(source: DatasetSource) -> str | None:
    """The template in effect for instruction/prompt_completion (None for chat and text, which need none)."""
    source = resolve_source(source)
    fmt = source.format or "instruction"
    if fmt in ("chat", "text"):
        return None
    return source.template or ("alpaca" if fmt == "instruction" else "chat")


def field_columns(source: DatasetSource) -> dict[str, str]:
    """Logical field -> dataset column for the source's format (identity unless `fields:` maps it)."""
    source = resolve_source(source)
    fmt = format_of(source)
    valid = FORMAT_FIELDS[fmt]
    unknown = sorted(set(source.fields) - set(valid))
    if unknown:
        raise DiaBloError(
            f"dataset {source.path!r}: `fields` key(s) {', '.join(unknown)} do not apply to format {fmt!r}; "
            f"its fields are: {', '.join(valid)}"
        )
    return {name: source.fields.get(name, name) for name in valid}


def generation_prompt(example: dict, source: DatasetSource, tokenizer: Any) -> str:
    """The text the model sees up to where its response starts, exactly as in training."""
    rendered = render_example(example, source, tokenizer, for_generation=True)
    return rendered.text[: rendered.prompt_end]


def special_prefix_ids(tokenizer: Any) -> list[int]:
    """The tokens the tokenizer puts in front of any text by itself (a BOS for Llama-style models, often none)."""
    with_special = list(tokenizer("a")["input_ids"])
    without = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for start in range(len(with_special) - len(without) + 1):
        if with_special[start : start + len(without)] == without:
            return with_special[:start]
    return []


def generation_prompt_ids(example: dict, source: DatasetSource, tokenizer: Any) -> list[int]:
    """`generation_prompt` tokenised exactly as in training (BOS added only where training adds it).

    Use this rather than `tokenizer(generation_prompt(...))`: text rendered by a chat template already holds its
    BOS, and tokenising it with special tokens would double it.
    """
    rendered = render_example(example, source, tokenizer, for_generation=True)
    prefix = special_prefix_ids(tokenizer) if rendered.special_prefix else []
    return prefix + list(tokenizer(rendered.text[: rendered.prompt_end], add_special_tokens=False)["input_ids"])


def reference_response(example: dict, source: DatasetSource) -> str:
    """The raw expected response (no template, no eos): what an evaluator compares generations against."""
    source = resolve_source(source)
    columns = field_columns(source)
    fmt = format_of(source)
    if fmt == "instruction":
        return _text(example, columns["output"])
    if fmt == "prompt_completion":
        return _text(example, columns["completion"])
    if fmt == "chat":
        messages = _messages(example, columns["messages"])
        assistant = [m["content"] for m in messages if m["role"] == "assistant"]
        return assistant[-1] if assistant else ""
    return _text(example, columns["text"])


def render_example(
    example: dict, source: DatasetSource, tokenizer: Any, *, for_generation: bool = False
) -> RenderedExample:
    """The example as text with its supervised spans. `for_generation` stops chat at the last assistant turn."""
    source = resolve_source(source)
    columns = field_columns(source)
    fmt = format_of(source)
    if fmt == "text":
        text = _text(example, columns["text"])
        return RenderedExample(text, ((0, len(text)),), 0, special_prefix=True, append_eos=True)
    if fmt == "chat":
        return _render_conversation(_messages(example, columns["messages"]), tokenizer, for_generation)
    if fmt == "instruction":
        user = (_text(example, columns["instruction"]), _text(example, columns["input"]))
        response = _text(example, columns["output"])
        plain_prompt = "\n".join(part for part in user if part) + "\n"  # instruction, input, response: one a line
    else:
        user = (_text(example, columns["prompt"]), "")
        response = _text(example, columns["completion"])
        plain_prompt = user[0]
    return _render_prompt_response(user, plain_prompt, response, template_of(source), tokenizer)


def _render_prompt_response(
    user: tuple[str, str], plain_prompt: str, response: str, template: str | None, tokenizer: Any
) -> RenderedExample:
    """alpaca: the Stanford Alpaca prompt; plain: `plain_prompt` then the response; chat: the chat template."""
    instruction, extra = user
    if template == "alpaca":
        pattern = ALPACA_WITH_INPUT if extra else ALPACA_NO_INPUT
        prompt = pattern.format(instruction=instruction, input=extra)
    elif template == "plain":
        prompt = plain_prompt
    else:  # chat: the prompt is one user message; the response is all the template adds for the assistant
        content = f"{instruction}\n\n{extra}" if extra else instruction
        conversation = [{"role": "user", "content": content}]
        prompt = render_chat(tokenizer, conversation, generation_prompt=True)
        full = render_chat(tokenizer, [*conversation, {"role": "assistant", "content": response}])
        if not full.startswith(prompt):
            raise DiaBloError(
                f"the chat template of {_name(tokenizer)} does not render a reply as a continuation of its "
                f"generation prompt, so the response cannot be located; use template: alpaca or plain"
            )
        return RenderedExample(full, ((len(prompt), len(full)),), len(prompt), special_prefix=False, append_eos=False)
    text = prompt + response
    return RenderedExample(text, ((len(prompt), len(text)),), len(prompt), special_prefix=True, append_eos=True)


def _render_conversation(messages: list[dict], tokenizer: Any, for_generation: bool) -> RenderedExample:
    """Chat format: every assistant turn is supervised, including what the template adds around it."""
    if for_generation:
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
        prompt = render_chat(tokenizer, messages[:last], generation_prompt=True)
        return RenderedExample(prompt, (), len(prompt), special_prefix=False, append_eos=False)
    full = render_chat(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], generation_prompt=True) if i else ""
        through = render_chat(tokenizer, messages[: i + 1])
        if through.startswith(before) and full.startswith(through) and len(before) >= cursor:
            span = (len(before), len(through))
        elif message["content"]:  # the template re-renders earlier turns (e.g. drops reasoning): find the reply
            span = _locate_reply(full, through, message["content"], cursor, tokenizer)
        else:  # an empty reply that cannot be located teaches nothing
            continue
        spans.append(span)
        cursor = span[1]
    prompt_end = spans[0][0] if spans else len(full)
    return RenderedExample(full, tuple(spans), prompt_end, special_prefix=False, append_eos=False)


def _locate_reply(full: str, through: str, content: str, cursor: int, tokenizer: Any) -> tuple[int, int]:
    start = full.find(content, cursor)
    if start < 0:
        raise DiaBloError(
            f"the chat template of {_name(tokenizer)} renders an assistant turn in a way that cannot be located "
            f"in the whole conversation; use format: prompt_completion with template: alpaca or plain"
        )
    end = start + len(content)
    closing = through[through.rfind(content) + len(content) :]  # what the template writes after a reply
    if closing and full.startswith(closing, end):
        end += len(closing)
    return start, end


def render_chat(tokenizer: Any, messages: list[dict], *, generation_prompt: bool = False) -> str:
    """The tokenizer's chat template applied to `messages`, as text."""
    if not getattr(tokenizer, "chat_template", None):
        raise DiaBloError(
            f"tokenizer {_name(tokenizer)} has no chat template, so `format: chat` and `template: chat` cannot be "
            f"used with it; valid templates: {', '.join(TEMPLATES)} (alpaca and plain work with any tokenizer)"
        )
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # a template's own raise_exception, or a malformed conversation
        raise DiaBloError(f"the chat template of {_name(tokenizer)} failed on a conversation: {err}") from None


def _text(example: dict, column: str) -> str:
    value = example.get(column)
    return "" if value is None else str(value)


def _messages(example: dict, column: str) -> list[dict]:
    messages = example.get(column) or []
    for message in messages:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DiaBloError(
                f"column {column!r} must hold lists of {{role, content}} messages; found {str(message)[:80]!r}"
            )
    return [{"role": m["role"], "content": "" if m["content"] is None else str(m["content"])} for m in messages]


def _name(tokenizer: Any) -> str:
    return repr(getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__)
