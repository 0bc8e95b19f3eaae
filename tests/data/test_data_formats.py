"""Every format: what a good row becomes, and how a bad row is named or skipped and counted."""

from __future__ import annotations

import gzip
import json

import pytest

from align.data import (
    ChatExample,
    DataError,
    DataStats,
    KTOExample,
    PairExample,
    PromptExample,
    SFTExample,
    load_examples,
)
from align.data.formats import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT


def _load(tmp_path, write_jsonl, fmt, rows, **kw):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    return path, load_examples(path, fmt, **kw)


# ---- alpaca -------------------------------------------------------------------------------


def test_alpaca_with_and_without_input(tmp_path, write_jsonl):
    _, got = _load(tmp_path, write_jsonl, "alpaca", [
        {"instruction": "Add.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "Hi"},
        {"instruction": "Say bye.", "output": "Bye"},
    ])
    assert got[0] == SFTExample(ALPACA_PROMPT_WITH_INPUT.format(instruction="Add.", input="2 and 3"), "5")
    assert got[0].prompt.endswith("### Input:\n2 and 3\n\n### Response:\n")
    assert got[1] == SFTExample(ALPACA_PROMPT.format(instruction="Say hi."), "Hi")
    assert got[2].response == "Bye" and "### Input" not in got[2].prompt


def test_alpaca_missing_and_wrong_typed_fields(tmp_path, write_jsonl):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "a"}]
    with pytest.raises(DataError, match=r"d\.jsonl, line 2, field 'output': missing$"):
        _load(tmp_path, write_jsonl, "alpaca", rows)
    with pytest.raises(DataError, match=r"line 1, field 'instruction': expected a string, got int"):
        _load(tmp_path, write_jsonl, "alpaca", [{"instruction": 3, "output": "b"}])


# ---- chat / sharegpt ----------------------------------------------------------------------

CONV = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def test_chat_messages_and_sharegpt_conversations(tmp_path, write_jsonl):
    sharegpt = [{"from": "system", "value": "S"}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    expected = ChatExample([{"role": "system", "content": "S"}] + CONV)
    _, got = _load(tmp_path, write_jsonl, "sharegpt", [{"conversations": sharegpt}, {"messages": CONV}])
    assert got == [expected, ChatExample(CONV)]
    _, got = _load(tmp_path, write_jsonl, "chat", [{"messages": CONV}, {"conversations": sharegpt}])
    assert got == [ChatExample(CONV), expected]


@pytest.mark.parametrize("row, message", [
    ({"messages": CONV[:1]}, r"field 'messages': no assistant turn"),
    ({"messages": []}, r"field 'messages': expected a non-empty list of messages, got an empty list"),
    ({"messages": "hi"}, r"field 'messages': expected a non-empty list of messages, got str"),
    ({"messages": [CONV[0], {"role": "assistant"}]}, r"field 'messages\[1\].content': missing"),
    ({"messages": [CONV[0], {"role": "assistant", "content": 5}]}, r"field 'messages\[1\].content': expected a string, got int"),
    ({"messages": [{"content": "x"}]}, r"field 'messages\[0\].role': missing"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, r"field 'conversations\[0\].from': unknown speaker 'robot'"),
    ({"other": 1}, r"field 'messages': missing"),
])
def test_chat_bad_rows_name_the_field(tmp_path, write_jsonl, row, message):
    with pytest.raises(DataError, match=r"d\.jsonl, line 2, " + message):
        _load(tmp_path, write_jsonl, "chat", [{"messages": CONV}, row])


# ---- pairwise / hh ------------------------------------------------------------------------


def test_pairwise_strings_and_messages(tmp_path, write_jsonl):
    a = [{"role": "assistant", "content": "A"}]
    b = [{"role": "assistant", "content": "B"}]
    _, got = _load(tmp_path, write_jsonl, "pairwise", [
        {"prompt": "P", "chosen": "A", "rejected": "B"},
        {"prompt": "P", "chosen": a, "rejected": "B"},  # mixed: all become messages
        {"chosen": CONV[:1] + a, "rejected": CONV[:1] + b},  # implicit prompt: the shared turns
    ])
    assert got[0] == PairExample("P", "A", "B")
    assert got[1] == PairExample([{"role": "user", "content": "P"}], a, b)
    assert got[2] == PairExample(CONV[:1], a, b)


def test_pairwise_bad_rows(tmp_path, write_jsonl):
    with pytest.raises(DataError, match=r"line 1, field 'prompt': missing; for whole HH-RLHF dialogues use format 'hh'"):
        _load(tmp_path, write_jsonl, "pairwise", [{"chosen": "A", "rejected": "B"}])
    with pytest.raises(DataError, match=r"line 1, field 'rejected': no 'prompt' field, and the conversation does not share"):
        _load(tmp_path, write_jsonl, "pairwise", [{"chosen": CONV, "rejected": [CONV[1], CONV[1]]}])
    with pytest.raises(DataError, match=r"line 1, field 'chosen': expected a string or a list of messages, got dict"):
        _load(tmp_path, write_jsonl, "pairwise", [{"prompt": "P", "chosen": {"x": 1}, "rejected": "B"}])


def test_hh_split_synthetic(tmp_path, write_jsonl):
    dialogue = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Joke?\n\nAssistant:"
    _, got = _load(tmp_path, write_jsonl, "hh", [{"chosen": dialogue + " Knock knock.", "rejected": dialogue + " No."}])
    assert got == [PairExample(dialogue, " Knock knock.", " No.")]


@pytest.mark.parametrize("row, message", [
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: X\n\nAssistant: c"},
     "field 'rejected': does not share the dialogue with 'chosen' up to the last Assistant turn"),
    ({"chosen": "\n\nHuman: a", "rejected": "\n\nHuman: a\n\nAssistant: c"}, r"field 'chosen': no '\\n\\nAssistant:' turn"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b"}, "field 'rejected': missing"),
])
def test_hh_bad_rows(tmp_path, write_jsonl, row, message):
    with pytest.raises(DataError, match=r"d\.jsonl, line 1, " + message):
        _load(tmp_path, write_jsonl, "hh", [row])


def _independent_hh_split(text):
    """Split on every marker and rejoin all but the last piece (no rfind, unlike the parser)."""
    marker = "\n\nAssistant:"
    parts = text.split(marker)
    return marker.join(parts[:-1]) + marker, parts[-1]


def test_hh_on_all_shipped_rows(hh_files):
    """Every kept pair reassembles into both original dialogues; every skipped row is a real
    mismatch found by an independent split, and every mismatch is skipped."""
    for path in hh_files:
        stats = DataStats()
        pairs = load_examples(str(path), "hh", on_error="skip", stats=stats)
        raw = [json.loads(line) for line in gzip.open(path, "rt", encoding="utf-8")]
        good = []
        for r in raw:
            (pc, rc), (pr, rr) = _independent_hh_split(r["chosen"]), _independent_hh_split(r["rejected"])
            if pc == pr:
                good.append((r, PairExample(pc, rc, rr)))
        assert len(pairs) == len(good) == stats.examples_loaded
        assert stats.rows_skipped == ({"hh_prefix_mismatch": len(raw) - len(good)} if len(good) < len(raw) else {})
        for ex, (r, expected) in zip(pairs, good):
            assert ex == expected
            assert ex.prompt + ex.chosen == r["chosen"] and ex.prompt + ex.rejected == r["rejected"]
            assert ex.prompt.endswith("\n\nAssistant:")


def test_hh_known_bad_line_is_named(shared_data):
    with pytest.raises(DataError, match=r"harmless-base_test\.jsonl\.gz, line 1255, field 'rejected'"):
        load_examples(str(shared_data / "hh-rlhf" / "harmless-base_test.jsonl.gz"), "hh")


# ---- kto / prompt_answer / prompt -----------------------------------------------------------


def test_kto_labels(tmp_path, write_jsonl):
    _, got = _load(tmp_path, write_jsonl, "kto", [
        {"prompt": "P", "completion": "C", "label": True},
        {"prompt": "P", "completion": "D", "label": 0},
        {"prompt": CONV[:1], "completion": "E", "label": 1},
    ])
    assert got[0] == KTOExample("P", "C", True) and got[1] == KTOExample("P", "D", False)
    assert got[1].label is False
    assert got[2] == KTOExample(CONV[:1], [{"role": "assistant", "content": "E"}], True)
    with pytest.raises(DataError, match=r"line 1, field 'label': expected a bool \(or 0/1\), got 'yes'"):
        _load(tmp_path, write_jsonl, "kto", [{"prompt": "P", "completion": "C", "label": "yes"}])
    with pytest.raises(DataError, match=r"line 1, field 'label': expected a bool \(or 0/1\), got 2"):
        _load(tmp_path, write_jsonl, "kto", [{"prompt": "P", "completion": "C", "label": 2}])


def test_prompt_answer_gsm8k_style(tmp_path, write_jsonl):
    _, got = _load(tmp_path, write_jsonl, "prompt_answer", [
        {"question": "1+1?", "answer": "1+1 = 2\n#### 2 "},
        {"question": "Big?", "answer": "Step #### not this\n####1,000"},  # the last delimiter wins
        {"question": "n?", "answer": 7},  # no delimiter: the whole answer
    ])
    assert got[0] == PromptExample("1+1?", "2", {"solution": "1+1 = 2\n#### 2 "})
    assert got[1].ground_truth == "1,000"
    assert got[2].ground_truth == "7"
    with pytest.raises(DataError, match=r"line 1, field 'answer': empty final answer"):
        _load(tmp_path, write_jsonl, "prompt_answer", [{"question": "q", "answer": "work ####  "}])


def test_real_gsm8k(shared_data):
    raw = [json.loads(line) for line in open(shared_data / "gsm8k" / "test.jsonl", encoding="utf-8")]
    got = load_examples(str(shared_data / "gsm8k" / "test.jsonl"), "prompt_answer")
    assert len(got) == len(raw) == 1319
    for ex, r in zip(got, raw):
        assert ex.prompt == r["question"] and ex.metadata["solution"] == r["answer"]
        assert r["answer"].endswith("#### " + ex.ground_truth)
        float(ex.ground_truth.replace(",", ""))  # every GSM8K final answer is a number


def test_columns_mapping_and_unknown_names(tmp_path, write_jsonl):
    path, got = _load(tmp_path, write_jsonl, "prompt_answer", [{"problem": "p", "solution": "s #### 3"}],
                      columns={"prompt": "problem", "answer": "solution"})
    assert got == [PromptExample("p", "3", {"solution": "s #### 3"})]
    _, got = _load(tmp_path, write_jsonl, "prompt", [{"text": "Once"}], columns={"prompt": "text"})
    assert got == [PromptExample("Once")]
    with pytest.raises(DataError, match=r"line 1, field 'q': missing"):  # the error names the real key
        load_examples(path, "prompt_answer", columns={"prompt": "q", "answer": "solution"})
    with pytest.raises(ValueError, match=r"format 'prompt_answer' has no column\(s\) \['question'\]; its columns: \['answer', 'prompt'\]"):
        load_examples(path, "prompt_answer", columns={"question": "problem"})
    with pytest.raises(ValueError, match=r"unknown data format 'dpo'; valid: \['alpaca', 'chat', 'hh', 'kto'"):
        load_examples(path, "dpo")


# ---- skipping, counting, limits -----------------------------------------------------------


def test_skip_and_count_by_reason(tmp_path, write_jsonl):
    rows = [
        {"prompt": "P", "chosen": "A", "rejected": "B"},
        {"prompt": "P", "chosen": "A"},
        "{oops",
        {"prompt": "P", "chosen": 3, "rejected": "B"},
        {"prompt": "P", "chosen": "C", "rejected": "D"},
        {"prompt": "P", "rejected": "B"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"line 2, field 'rejected': missing"):
        load_examples(path, "pairwise")
    stats = DataStats()
    got = load_examples(path, "pairwise", on_error="skip", stats=stats)
    assert got == [PairExample("P", "A", "B"), PairExample("P", "C", "D")]
    assert stats.rows_skipped == {"missing_field": 2, "invalid_json": 1, "wrong_type": 1}
    d = stats.as_dict()
    assert (d["rows_read"], d["rows_skipped"], d["examples_loaded"]) == (6, 4, 2)
    assert d["rows_skipped/missing_field"] == 2
    line = stats.summary()
    assert "\n" not in line and "6 rows read, 4 skipped (invalid_json=1, missing_field=2, wrong_type=1), 2 loaded" in line
    with pytest.raises(ValueError, match="on_error must be one of"):
        load_examples(path, "pairwise", on_error="ignore")


def test_limit_and_several_sources(tmp_path, write_jsonl):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": str(i)} for i in range(5)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "b"}])
    stats = DataStats()
    assert [e.prompt for e in load_examples(a, "prompt", limit=2, stats=stats)] == ["0", "1"]
    assert stats.rows_read == 2
    assert [e.prompt for e in load_examples([a, b], "prompt")][-2:] == ["4", "b"]
