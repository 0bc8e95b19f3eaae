"""Tokenizers for the data tests: stories260K (SentencePiece-style, adds BOS) and GPT-NeoX
(byte-level BPE, no BOS), the two kinds whose boundary handling differs."""

from __future__ import annotations

import gzip
import json

import pytest

from align.models.loading import load_tokenizer

CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def stories_tok(stories_path):
    return load_tokenizer(stories_path)


@pytest.fixture
def chatml_tok(stories_path):
    """A fresh stories260K tokenizer with a ChatML template (fresh: tests must not leak it)."""
    tok = load_tokenizer(stories_path)
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="session")
def neox_tok(shared_data):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(shared_data / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"),
        eos_token="<|endoftext|>", pad_token="<|endoftext|>",
    )


@pytest.fixture(scope="session")
def hh_files(shared_data):
    return sorted((shared_data / "hh-rlhf").glob("*.jsonl.gz"))


@pytest.fixture
def write_jsonl():
    return _write_jsonl


def _write_jsonl(path, rows, *, gz=False):
    """Rows are dicts (written as JSON) or raw strings (written verbatim: for broken lines)."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    text = "".join(line + "\n" for line in lines)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)
