"""User data formats: every format to exact tokens and loss masks; every bad input to exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from crma.cli import main
from crma.data import load_records, tokenize_records
from crma.data.formats import ALPACA_PROMPT, ALPACA_PROMPT_INPUT

IGNORE = -100


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def ids(tokenizer, text: str, special: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def one(tokenizer, record: dict, max_length: int = 256) -> dict:
    [example] = tokenize_records([record], tokenizer, max_length)
    return example


# -- formats to tokens ------------------------------------------------------------------------
def test_text_learns_every_token(tokenizer):
    text = "The heart pumps blood through the body."
    example = one(tokenizer, {"text": text})
    assert example["input_ids"] == ids(tokenizer, text, special=True)
    assert example["labels"] == example["input_ids"]


def test_prompt_completion_masks_exactly_the_prompt(tokenizer):
    prompt, completion = "Interest rates affect", " bond prices."
    example = one(tokenizer, {"prompt": prompt, "completion": completion})
    p, c = ids(tokenizer, prompt, special=True), ids(tokenizer, completion)
    eos = tokenizer.eos_token_id
    assert example["input_ids"] == p + c + [eos]
    assert example["labels"] == [IGNORE] * len(p) + c + [eos]


@pytest.mark.parametrize("with_input", [False, True])
def test_alpaca_masks_the_rendered_instruction(tokenizer, with_input):
    record = {"instruction": "Add two numbers.", "output": "def add(a, b): return a + b"}
    if with_input:
        record["input"] = "a=1, b=2"
    template = ALPACA_PROMPT_INPUT if with_input else ALPACA_PROMPT
    prompt = template.format(instruction=record["instruction"], input=record.get("input"))
    example = one(tokenizer, record)
    p, out = ids(tokenizer, prompt, special=True), ids(tokenizer, record["output"])
    assert example["input_ids"] == p + out + [tokenizer.eos_token_id]
    assert example["labels"][: len(p)] == [IGNORE] * len(p)
    assert example["labels"][len(p) :] == out + [tokenizer.eos_token_id]


def test_messages_learn_assistant_turns_only(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What does the heart do?"},
        {"role": "assistant", "content": "It pumps blood."},
        {"role": "user", "content": "And the lungs?"},
        {"role": "assistant", "content": "They exchange gases."},
    ]
    example = one(tokenizer, {"messages": messages})
    # The ChatML template of the tiny tokenizer, cut where masking switches on and off.
    pieces = [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat does the heart do?"
         "<|im_end|>\n<|im_start|>assistant\n", False),
        ("It pumps blood.<|im_end|>\n", True),
        ("<|im_start|>user\nAnd the lungs?<|im_end|>\n<|im_start|>assistant\n", False),
        ("They exchange gases.<|im_end|>\n", True),
    ]  # fmt: skip
    expected_ids = [t for text, _ in pieces for t in ids(tokenizer, text)]
    expected_labels = [
        t if learn else IGNORE for text, learn in pieces for t in ids(tokenizer, text)
    ]
    assert example["input_ids"] == expected_ids
    assert example["labels"] == expected_labels
    learned = [t for t in example["labels"] if t != IGNORE]
    assert (
        tokenizer.decode(learned) == "It pumps blood.<|im_end|>\nThey exchange gases.<|im_end|>\n"
    )


def test_truncation_keeps_the_start(tokenizer):
    text = "Energy is conserved in a closed system. " * 20
    example = one(tokenizer, {"text": text}, max_length=16)
    assert example["input_ids"] == ids(tokenizer, text, special=True)[:16]
    assert example["labels"] == example["input_ids"]


def test_truncation_keeps_some_completion_when_the_prompt_is_too_long(tokenizer):
    prompt = "Patients with fever and cough " * 20
    example = one(tokenizer, {"prompt": prompt, "completion": " may have an infection."}, 16)
    completion = ids(tokenizer, " may have an infection.") + [tokenizer.eos_token_id]
    assert len(completion) < 8  # fits in half the window, so all of it is kept
    assert example["input_ids"][-len(completion) :] == completion
    assert example["labels"] == [IGNORE] * (16 - len(completion)) + completion
    long_completion = " may have an infection of the lungs or airways." * 3
    example = one(tokenizer, {"prompt": prompt, "completion": long_completion}, 16)
    assert example["labels"] == [IGNORE] * 8 + ids(tokenizer, long_completion)[:8]


def test_packing_joins_texts_with_eos_into_full_blocks(tokenizer):
    texts = ["The heart pumps blood.", "A licence grants rights.", "def add(a, b): return a + b"]
    eos = tokenizer.eos_token_id
    stream = [t for text in texts for t in ids(tokenizer, text, special=True) + [eos]]
    blocks = tokenize_records([{"text": t} for t in texts], tokenizer, 8, pack=True)
    assert [len(b["input_ids"]) for b in blocks[:-1]] == [8] * (len(blocks) - 1)
    assert [t for b in blocks for t in b["input_ids"]] == stream
    assert all(b["labels"] == b["input_ids"] for b in blocks)


def test_packing_leaves_prompt_completion_records_whole(tokenizer):
    records = [{"text": "The heart pumps blood."}, {"prompt": "Q:", "completion": " A."}]
    examples = tokenize_records(records, tokenizer, 64, pack=True)
    assert examples[0]["labels"][0] == IGNORE  # the prompt/completion record, unpacked
    assert examples[1]["input_ids"][-1] == tokenizer.eos_token_id  # the packed text block


# -- loading ------------------------------------------------------------------------------------
def test_txt_passages_are_split_on_blank_lines(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("First passage,\ntwo lines.\n\n\nSecond passage.\n  \nThird.", encoding="utf-8")
    assert load_records(path) == [
        {"text": "First passage,\ntwo lines."},
        {"text": "Second passage."},
        {"text": "Third."},
    ]


def test_corpus_rows_and_every_format_load(tmp_path):
    rows = [
        {"id": "medical-1", "domain": "medical", "source": "HP:1", "text": "Fever."},
        {"prompt": "", "completion": "x"},
        {"instruction": "Do it.", "output": "Done."},
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
            ]
        },
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    path.write_text(path.read_text() + "\n\n", encoding="utf-8")  # trailing blank lines are fine
    assert load_records(path) == rows


BAD_INPUTS = {
    "invalid JSON": (b'{"text": "ok"}\n{"text": \n', 2, "invalid JSON"),
    "no known fields": (b'{"text": "ok"}\n{"body": "hello"}\n', 2, "no known fields"),
    "empty text": (b'{"text": "ok"}\n{"text": "ok"}\n{"text": "   "}\n', 3, "empty text"),
    "not UTF-8": (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', 2, "not UTF-8"),
    "empty file": (b"", 1, "file is empty"),
    "not an object": (b'["text"]\n', 1, "expected a JSON object"),
    "chat without reply": (b'{"messages": [{"role": "user", "content": "Hi"}]}\n', 1, "assistant"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_naming_file_and_line(tmp_path, capsys, case):
    content, line, problem = BAD_INPUTS[case]
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    code = main(["data", "clean", str(path), "--out", str(tmp_path / "out.jsonl")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{path}:{line}: " in err and problem in err
    assert err.count("\n") == 1  # one line
    assert not (tmp_path / "out.jsonl").exists()


def test_not_utf8_txt_names_the_line(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"fine\n\nstill fine\n\xff\xfe broken\n")
    with pytest.raises(Exception, match=rf"{path}:4: not UTF-8"):
        load_records(path)


@pytest.mark.integration
def test_installed_command_reports_bad_input_with_exit_2(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{oops}\n', encoding="utf-8")
    crma = Path(sys.executable).parent / "crma"
    proc = subprocess.run(
        [str(crma), "data", "clean", str(path), "--out", str(tmp_path / "o.jsonl")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"crma: error: {path}:2: invalid JSON")
