"""Tokenization: exact prompt masks, BOS/EOS, continuation boundaries, truncation counts, chat."""

from __future__ import annotations

import pytest

from align.data import (
    FALLBACK_CHAT_TEMPLATE,
    ChatExample,
    DataStats,
    KTOExample,
    PairExample,
    PromptExample,
    SFTExample,
    as_sft,
    chat_segments,
    load_examples,
    render_chat,
    tokenize_kto,
    tokenize_pairs,
    tokenize_prompts,
    tokenize_sft,
)
from align.data.formats import ALPACA_PROMPT

IGNORE = -100
STORY = ALPACA_PROMPT.format(instruction="Tell a story.")
RESPONSE = "Once upon a time, a cat sat."
CONVERSATION = [
    {"role": "system", "content": "Be nice."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Story?"},
    {"role": "assistant", "content": "Once upon a time."},
]


def _runs(item):
    """Maximal runs of positions with a loss, as lists of token ids."""
    runs, cur = [], []
    for tok_id, label in zip(item["input_ids"], item["labels"]):
        if label == IGNORE:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert label == tok_id
            cur.append(tok_id)
    return runs + ([cur] if cur else [])


# ---- SFT masks and boundaries ---------------------------------------------------------------


def test_sft_mask_is_exactly_the_prompt_stories(stories_tok):
    """The prompt ids are the ids of the prompt tokenized alone (BOS first), all masked; the
    response follows unmasked and ends with EOS. Decoding the whole sequence gives the exact
    text: a plain separate tokenization of the response would decode as '### Response:\\n Once'
    (SentencePiece starts every call with a word boundary), the continuation encoding does not."""
    [item] = tokenize_sft([SFTExample(STORY, RESPONSE)], stories_tok, 256)
    prompt_ids = stories_tok(STORY)["input_ids"]
    n = len(prompt_ids)
    assert prompt_ids[0] == stories_tok.bos_token_id
    assert item["input_ids"][:n] == prompt_ids
    assert item["labels"][:n] == [IGNORE] * n
    assert item["labels"][n:] == item["input_ids"][n:] and len(item["input_ids"]) > n + 1
    assert item["input_ids"][-1] == stories_tok.eos_token_id
    assert stories_tok.decode(item["input_ids"][n:]) == RESPONSE + "</s>"
    assert stories_tok.decode(item["input_ids"][1:]) == STORY + RESPONSE + "</s>"


def test_sft_mask_is_exactly_the_prompt_neox(neox_tok):
    [item] = tokenize_sft([SFTExample("Q: 2+2?\nA:", " 4")], neox_tok, 64)
    prompt_ids = neox_tok("Q: 2+2?\nA:")["input_ids"]  # byte-level BPE: no BOS
    n = len(prompt_ids)
    assert item["input_ids"][:n] == prompt_ids and item["labels"][:n] == [IGNORE] * n
    assert neox_tok.decode(item["labels"][n:]) == " 4<|endoftext|>"
    assert neox_tok.decode(item["input_ids"]) == "Q: 2+2?\nA: 4<|endoftext|>"


def test_bos_never_doubled_and_eos_optional(stories_tok):
    bos, eos = stories_tok.bos_token_id, stories_tok.eos_token_id
    items = tokenize_sft([SFTExample("<s>Hi", " there"), SFTExample("Hi", " there</s>")], stories_tok, 64)
    for item in items:
        assert item["input_ids"][0] == bos and item["input_ids"][1] != bos
        assert item["input_ids"].count(eos) == 1  # an EOS already there is not added again
    [item] = tokenize_sft([SFTExample("Hi", " there")], stories_tok, 64, add_eos=False)
    assert eos not in item["input_ids"]


def test_empty_prompt_learns_the_whole_text(stories_tok):
    [item] = tokenize_sft([SFTExample("", "Once upon a time.")], stories_tok, 64)
    assert item["labels"][0] == IGNORE and item["input_ids"][0] == stories_tok.bos_token_id
    assert item["labels"][1:] == item["input_ids"][1:]
    assert item["input_ids"] == stories_tok("Once upon a time.")["input_ids"] + [stories_tok.eos_token_id]


# ---- lengths --------------------------------------------------------------------------------


def test_sft_left_truncation_keeps_bos_and_the_prompt_end(stories_tok):
    prompt = " ".join(f"word{i}" for i in range(200))
    full = stories_tok(prompt)["input_ids"]
    stats = DataStats()
    [item] = tokenize_sft([SFTExample(prompt, " The end.")], stories_tok, 64, stats=stats)
    n_resp = sum(label != IGNORE for label in item["labels"])
    assert len(item["input_ids"]) == 64
    kept = 64 - n_resp
    assert item["input_ids"][:kept] == [stories_tok.bos_token_id] + full[len(full) - (kept - 1):]
    assert stories_tok.decode(item["input_ids"][kept:]) == "The end.</s>"
    assert (stats.prompts_truncated, stats.examples_dropped_overlong, stats.examples_tokenized) == (1, 0, 1)

    stats = DataStats()
    [kept_item] = tokenize_sft([SFTExample(prompt, " The end."), SFTExample("Hi", " ok")], stories_tok, 64,
                               overlong="drop", stats=stats)
    hi = stories_tok("Hi")["input_ids"]
    assert kept_item["input_ids"][: len(hi)] == hi
    assert (stats.prompts_truncated, stats.examples_dropped_overlong, stats.examples_tokenized) == (0, 1, 1)


def test_response_limits(stories_tok):
    long_response = " " + " ".join(["cat"] * 100)
    stats = DataStats()
    # a response that cannot fit even after an empty prompt is dropped, whatever `overlong` says
    assert tokenize_sft([SFTExample("Hi", long_response)], stories_tok, 32, stats=stats) == []
    assert stats.examples_dropped_overlong == 1
    # max_response_length cuts responses on the right (their EOS too) and counts them
    stats = DataStats()
    [item] = tokenize_sft([SFTExample("Hi", long_response)], stories_tok, 64, max_response_length=10, stats=stats)
    assert sum(label != IGNORE for label in item["labels"]) == 10
    assert stories_tok.eos_token_id not in item["input_ids"]
    assert stats.responses_truncated == 1
    # max_prompt_length bounds the prompt even when max_length has room
    [item] = tokenize_sft([SFTExample(" ".join(["dog"] * 50), " ok")], stories_tok, 512, max_prompt_length=8)
    assert item["labels"][:8] == [IGNORE] * 8 and item["labels"][8] != IGNORE
    with pytest.raises(ValueError, match="overlong must be one of"):
        tokenize_sft([], stories_tok, 64, overlong="truncate_right")


def test_hh_pairs_fit_and_reassemble(hh_files, stories_tok):
    """On real HH pairs, compare with an independent per-example computation: a prompt is
    truncated exactly when its own ids do not fit beside the longer (capped) response; an
    untouched prompt decodes with each response back to the original dialogue."""
    examples = load_examples(str(hh_files[1]), "hh", on_error="skip", limit=150)
    max_length, max_resp = 256, 64
    stats = DataStats()
    items = tokenize_pairs(examples, stories_tok, max_length, max_response_length=max_resp, stats=stats)
    assert len(items) == len(examples) == stats.examples_tokenized
    eos, truncated, resp_cut = stories_tok.eos_token_id, 0, 0
    for ex, item in zip(examples, items):
        p, c, r = item["prompt_ids"], item["chosen_ids"], item["rejected_ids"]
        full_p = stories_tok(ex.prompt)["input_ids"]
        full_c = [len(stories_tok("\n" + x, add_special_tokens=False)["input_ids"]) for x in (ex.chosen, ex.rejected)]
        lens = [min(n - 2 + 1, max_resp) for n in full_c]  # minus the anchor's two ids, plus EOS
        assert (len(c), len(r)) == tuple(lens)
        resp_cut += sum(n - 2 + 1 > max_resp for n in full_c)
        assert len(p) + max(len(c), len(r)) <= max_length and p[0] == stories_tok.bos_token_id
        if len(full_p) + max(lens) > max_length:
            truncated += 1
            assert p[1:] == full_p[len(full_p) - len(p) + 1:] and len(p) + max(lens) == max_length
        else:
            assert p == full_p
            for resp, ids in ((ex.chosen, c), (ex.rejected, r)):
                if ids[-1] == eos:
                    assert stories_tok.decode(p[1:] + ids) == ex.prompt + resp + "</s>"
    assert truncated == stats.prompts_truncated > 0 and resp_cut == stats.responses_truncated > 0
    assert stats.examples_dropped_overlong == 0


def test_hh_pairs_neox_exact_text(hh_files, neox_tok):
    examples = load_examples(str(hh_files[2]), "hh", limit=40)
    items = tokenize_pairs(examples, neox_tok, 4096)
    for ex, item in zip(examples, items):
        assert item["prompt_ids"] == neox_tok(ex.prompt)["input_ids"]
        assert neox_tok.decode(item["prompt_ids"] + item["chosen_ids"]) == ex.prompt + ex.chosen + "<|endoftext|>"
        assert neox_tok.decode(item["prompt_ids"] + item["rejected_ids"]) == ex.prompt + ex.rejected + "<|endoftext|>"


def test_kto(stories_tok):
    stats = DataStats()
    items = tokenize_kto([KTOExample("Hi", " yes", True), KTOExample("Hi", " no", False)], stories_tok, 64, stats=stats)
    assert [x["label"] for x in items] == [True, False]
    assert items[0]["prompt_ids"] == stories_tok("Hi")["input_ids"]
    assert stories_tok.decode(items[1]["completion_ids"]) == "no</s>"
    assert stats.examples_tokenized == 2


def test_prompts_for_rl(shared_data, stories_tok):
    examples = load_examples(str(shared_data / "gsm8k" / "test.jsonl"), "prompt_answer", limit=20)
    stats = DataStats()
    items = tokenize_prompts(examples, stories_tok, 24, stats=stats)
    expected_cut = 0
    for ex, item in zip(examples, items):
        full = stories_tok(ex.prompt)["input_ids"]
        expected_cut += len(full) > 24
        assert item["prompt_ids"] == (full if len(full) <= 24 else full[:1] + full[-23:])
        assert (item["prompt"], item["ground_truth"], item["metadata"]) == (ex.prompt, ex.ground_truth, ex.metadata)
    assert stats.prompts_truncated == expected_cut > 0
    # message prompts end in the generation prompt; PairExample prompts and strings work too
    [chat, pair, text] = tokenize_prompts(
        [PromptExample(CONVERSATION[:2]), PairExample("Once", " a", " b"), "Hi"], stories_tok, 64)
    assert chat["prompt"].endswith("<|user|>\nHi\n<|assistant|>\n") and chat["ground_truth"] is None
    assert stories_tok.decode(chat["prompt_ids"][1:]) == chat["prompt"]
    assert pair["prompt_ids"] == stories_tok("Once")["input_ids"] and text["prompt"] == "Hi"


# ---- chat ---------------------------------------------------------------------------------


def test_fallback_template_renders_documented_format(stories_tok):
    assert not stories_tok.chat_template
    assert render_chat(CONVERSATION, stories_tok) == (
        "<|system|>\nBe nice.\n<|user|>\nHi\n<|assistant|>\nHello!</s><|user|>\nStory?\n<|assistant|>\nOnce upon a time.</s>"
    )
    assert render_chat(CONVERSATION[:2], stories_tok, add_generation_prompt=True).endswith("<|user|>\nHi\n<|assistant|>\n")


def test_chat_sft_loss_on_every_assistant_turn_fallback(stories_tok):
    [item] = tokenize_sft([ChatExample(CONVERSATION)], stories_tok, 256)
    assert [stories_tok.decode(run) for run in _runs(item)] == ["Hello!</s>", "Once upon a time.</s>"]
    assert item["input_ids"][0] == stories_tok.bos_token_id and item["labels"][0] == IGNORE
    assert stories_tok.decode(item["input_ids"][1:]) == render_chat(CONVERSATION, stories_tok)


def test_chat_sft_with_the_tokenizers_own_template(chatml_tok):
    assert chatml_tok.chat_template and chatml_tok.chat_template != FALLBACK_CHAT_TEMPLATE
    text = render_chat(CONVERSATION, chatml_tok)
    assert text.startswith("<s><|im_start|>system\nBe nice.<|im_end|>\n")
    [item] = tokenize_sft([ChatExample(CONVERSATION)], chatml_tok, 256)
    # the template closes a turn with <|im_end|>\n: that is learned; no EOS is added
    assert [chatml_tok.decode(run) for run in _runs(item)] == ["Hello!<|im_end|>\n", "Once upon a time.<|im_end|>\n"]
    assert item["input_ids"][:2].count(chatml_tok.bos_token_id) == 1  # the template's <s>, not a second
    assert chatml_tok.eos_token_id not in item["input_ids"]
    assert chatml_tok.decode(item["input_ids"]) == text


def test_template_that_rewrites_old_turns_trains_the_last_turn_only(stories_path):
    from align.models.loading import load_tokenizer

    tok = load_tokenizer(stories_path)
    tok.chat_template = (  # drops the content of every assistant turn but the last (like reasoning-stripping templates)
        "{% for m in messages %}<{{ m['role'] }}>{% if m['role'] != 'assistant' or loop.last %}"
        "{{ m['content'] }}{% endif %}|{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    segments = chat_segments(CONVERSATION, tok)
    assert [text for text, train in segments if train] == ["Once upon a time.|"]
    assert "".join(text for text, _ in segments) == render_chat(CONVERSATION, tok)


def test_chat_truncation_keeps_the_final_turn(stories_tok):
    long = [{"role": "system", "content": " ".join(["story"] * 120)}] + CONVERSATION[1:]
    stats = DataStats()
    [item] = tokenize_sft([ChatExample(long)], stories_tok, 48, stats=stats)
    assert len(item["input_ids"]) == 48 and item["input_ids"][0] == stories_tok.bos_token_id
    assert stories_tok.decode(_runs(item)[-1]) == "Once upon a time.</s>"
    assert stats.prompts_truncated == 1
    stats = DataStats()
    assert tokenize_sft([ChatExample(long)], stories_tok, 48, overlong="drop", stats=stats) == []
    assert tokenize_sft([ChatExample(long)], stories_tok, 4, stats=stats) == []  # the final turn cannot fit
    assert stats.examples_dropped_overlong == 2


def test_message_pairs_render_with_the_template(stories_tok):
    a, b = [{"role": "assistant", "content": "Yes."}], [{"role": "assistant", "content": "No."}]
    [item] = tokenize_pairs([PairExample(CONVERSATION[:2], a, b)], stories_tok, 128)
    assert stories_tok.decode(item["prompt_ids"][1:]) == "<|system|>\nBe nice.\n<|user|>\nHi\n<|assistant|>\n"
    assert stories_tok.decode(item["chosen_ids"]) == "Yes.</s>" and stories_tok.decode(item["rejected_ids"]) == "No.</s>"
    assert item["chosen_ids"].count(stories_tok.eos_token_id) == 1  # the template's EOS, not a second


def test_as_sft_targets(stories_tok):
    assert as_sft(PairExample("P", " A", " B")) == SFTExample("P", " A")
    assert as_sft(PromptExample("Q", "3", {"solution": "1+2 #### 3"})) == SFTExample("Q", "1+2 #### 3")
    with pytest.raises(TypeError, match="no SFT target in KTOExample"):
        tokenize_sft([KTOExample("P", "C", True)], stories_tok, 64)
    [item] = tokenize_sft([PairExample("Hi", " A", " B")], stories_tok, 64)
    assert stories_tok.decode([t for t in item["labels"] if t != IGNORE]) == "A</s>"
