"""Load user data files and turn records into token ids with loss masks.

Accepted formats: JSONL whose lines hold `text`, `prompt`/`completion`,
`messages` (a chat, rendered with the tokenizer's chat template) or alpaca
`instruction`/`input`/`output`; and `.txt` files of blank-line-separated passages.
Every problem is reported as one line naming the file and line, because a training run that
dies an hour in on line 41,302 of a file is the failure this module exists to prevent.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from crma.errors import UserError
from crma.fileio import write_text

IGNORE = -100  # label value the loss skips
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
KNOWN_FIELDS = "text, prompt/completion, messages or instruction/output"


def record_kind(record: dict[str, Any]) -> str:
    """Which format a record is in: 'messages', 'prompt', 'alpaca' or 'text' ('' if none)."""
    if "messages" in record:
        return "messages"
    if "prompt" in record and "completion" in record:
        return "prompt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    return ""


# -- loading ----------------------------------------------------------------------------------
def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a `.jsonl` or `.txt` file (`-`: JSONL on stdin), validated; raises UserError
    naming file:line."""
    path = Path(path)
    lines = _read_lines(path)
    if path.suffix == ".txt":
        return _text_passages(path, lines)
    records = []
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            records.append(_parse_line(path, lineno, line))
    if not records:
        raise UserError(f"{path}:1: no records, only blank lines; add one JSON object per line")
    return records


def _read_lines(path: Path) -> list[str]:
    """Decoded lines; an undecodable line is reported by number rather than by byte offset."""
    try:
        raw = sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
    except FileNotFoundError as exc:
        raise UserError(f"{path}: file not found") from exc
    except IsADirectoryError as exc:
        raise UserError(f"{path}: is a directory; expected a .jsonl or .txt file") from exc
    if not raw.strip():
        raise UserError(f"{path}:1: file is empty; it needs at least one record")
    lines = raw.split(b"\n")
    decoded = []
    for lineno, line in enumerate(lines, 1):
        try:
            decoded.append(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise UserError(
                f"{path}:{lineno}: not UTF-8 (byte {exc.start + 1} of the line); "
                "re-encode the file as UTF-8"
            ) from exc
    if decoded and decoded[0].startswith("\ufeff"):
        decoded[0] = decoded[0][1:]
    return [line.rstrip("\r") for line in decoded]


def _text_passages(path: Path, lines: list[str]) -> list[dict[str, Any]]:
    records, current = [], []
    for line in [*lines, ""]:
        if line.strip():
            current.append(line)
        elif current:
            records.append({"text": "\n".join(current)})
            current = []
    return records


def _parse_line(path: Path, lineno: int, line: str) -> dict[str, Any]:
    where = f"{path}:{lineno}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{where}: invalid JSON ({exc.msg}); each line must be one JSON object"
        ) from exc
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    kind = record_kind(record)
    if not kind:
        found = ", ".join(sorted(record)) or "none"
        raise UserError(f"{where}: no known fields (found: {found}); use {KNOWN_FIELDS}")
    _VALIDATORS[kind](where, record)
    return record


def _require_text(where: str, record: dict[str, Any], field: str, allow_empty: bool = False):
    value = record.get(field)
    if not isinstance(value, str):
        raise UserError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise UserError(f"{where}: empty text in field {field!r}; remove the line or fill it")


def _validate_text(where: str, record: dict[str, Any]) -> None:
    _require_text(where, record, "text")


def _validate_prompt(where: str, record: dict[str, Any]) -> None:
    _require_text(where, record, "prompt", allow_empty=True)
    _require_text(where, record, "completion")


def _validate_alpaca(where: str, record: dict[str, Any]) -> None:
    _require_text(where, record, "instruction")
    _require_text(where, record, "output")
    if "input" in record:
        _require_text(where, record, "input", allow_empty=True)


def _validate_messages(where: str, record: dict[str, Any]) -> None:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise UserError(f"{where}: messages[{i}] needs a string 'role' and 'content'")
        _require_text(f"{where}: messages[{i}]", message, "content")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: 'messages' has no assistant turn, so nothing to learn from")


_VALIDATORS = {
    "text": _validate_text,
    "prompt": _validate_prompt,
    "alpaca": _validate_alpaca,
    "messages": _validate_messages,
}


def record_text(record: dict[str, Any]) -> str:
    """All of a record's text in reading order: what cleaning and contamination checks compare."""
    kind = record_kind(record)
    if kind == "messages":
        return "\n".join(m["content"] for m in record["messages"])
    if kind == "prompt":
        return record["prompt"] + record["completion"]
    if kind == "alpaca":
        parts = [record["instruction"], record.get("input", ""), record["output"]]
        return "\n".join(p for p in parts if p)
    return record["text"]


# -- tokenization -----------------------------------------------------------------------------
def tokenize_records(
    records: list[dict[str, Any]], tokenizer, max_length: int, pack: bool = False
) -> list[dict[str, list[int]]]:
    """`input_ids` and `labels` per record; labels are -100 wherever no loss is wanted.

    Plain text is learned in full; prompts, instructions and non-assistant chat turns are
    masked. Sequences are cut to `max_length`. With `pack`, text records are joined with the
    EOS token and cut into full `max_length` blocks, so no compute is spent on padding.
    """
    if max_length < 2:
        raise UserError(f"max_length must be at least 2, got {max_length}")
    examples, packed_text = [], []
    for record in records:
        segments = _segments(record, tokenizer)
        if pack and record_kind(record) == "text":
            packed_text += segments[0][0] + _eos(tokenizer)
        else:
            examples.append(_fit(segments, max_length))
    return examples + _blocks(packed_text, max_length)


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _ids(tokenizer, text: str, special: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _segments(record: dict[str, Any], tokenizer) -> list[tuple[list[int], bool]]:
    """(token ids, learn these?) pieces of one record, in order."""
    kind = record_kind(record)
    if kind == "text":
        return [(_ids(tokenizer, record["text"], special=True), True)]
    if kind == "prompt":
        return _prompt_completion(tokenizer, record["prompt"], record["completion"])
    if kind == "alpaca":
        template = ALPACA_PROMPT_INPUT if record.get("input") else ALPACA_PROMPT
        prompt = template.format(instruction=record["instruction"], input=record.get("input"))
        return _prompt_completion(tokenizer, prompt, record["output"])
    return _chat_segments(tokenizer, record["messages"])


def _prompt_completion(tokenizer, prompt: str, completion: str) -> list[tuple[list[int], bool]]:
    # Tokenized apart so the mask boundary is exact; the EOS teaches the model to stop.
    return [
        (_ids(tokenizer, prompt, special=True), False),
        (_ids(tokenizer, completion) + _eos(tokenizer), True),
    ]


def _chat_segments(tokenizer, messages: list[dict[str, str]]) -> list[tuple[list[int], bool]]:
    """Split the rendered chat into spans: each assistant reply (with its end-of-turn marker)
    is learned, everything the template adds around it is not."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template, so 'messages' data cannot be used")
    render = tokenizer.apply_chat_template
    full = render(messages, tokenize=False)
    cuts = [0]
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start = (
                len(render(messages[:i], tokenize=False, add_generation_prompt=True)) if i else 0
            )
            end = len(render(messages[: i + 1], tokenize=False))
            cuts += [start, end]
    cuts.append(len(full))
    if cuts != sorted(cuts):
        raise UserError(
            "the tokenizer's chat template does not render a conversation as a prefix of "
            "its continuation, so assistant turns cannot be masked; use prompt/completion data"
        )
    return [
        (_ids(tokenizer, full[a:b]), i % 2 == 1)
        for i, (a, b) in enumerate(zip(cuts, cuts[1:]))
        if b > a
    ]


def _fit(segments: list[tuple[list[int], bool]], max_length: int) -> dict[str, list[int]]:
    """Join segments and cut to `max_length`, keeping the start, unless that would cut every
    learned token: then the window slides right, to start at most half a window before the
    first learned token (less if the sequence ends sooner), so the window stays full."""
    ids = [t for seg, _ in segments for t in seg]
    labels = [t if learn else IGNORE for seg, learn in segments for t in seg]
    first = next((i for i, label in enumerate(labels) if label != IGNORE), 0)
    start = min(first - max_length // 2, len(ids) - max_length) if first >= max_length else 0
    return {
        "input_ids": ids[start : start + max_length],
        "labels": labels[start : start + max_length],
    }


def _blocks(ids: list[int], max_length: int) -> list[dict[str, list[int]]]:
    return [
        {"input_ids": ids[i : i + max_length], "labels": ids[i : i + max_length]}
        for i in range(0, len(ids), max_length)
    ]


def write_records(path: str | Path, records: list[dict[str, Any]]) -> None:
    """JSONL, one record a line, written atomically; non-ASCII kept readable."""
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
