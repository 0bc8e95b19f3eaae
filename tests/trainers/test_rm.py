"""Reward-model training end to end on the shipped stories260K and HH-RLHF pairs: outputs that
load as PPO's reward role and as a sequence classifier, gradient accumulation, exact resume,
margins, config validation, and learning on real pairs."""

import gzip
import json

import pytest
import torch
from _resume import check_sigkill_resume

from align.config import ConfigError, compose
from align.trainers import run
from align.trainers.metrics import read_metrics

SMALL = [
    "algo=rm", "data.limit=96", "data.val_size=16", "data.max_length=96", "data.max_prompt_length=64",
    "data.max_response_length=32", "trainer.batch_size=4", "trainer.eval_batches=4", "trainer.progress=false",
    "trainer.num_threads=1", "trainer.warmup_steps=0", "trainer.lr=5e-3",
]


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _run(out, *overrides):
    cfg, raw = compose([*SMALL, f"output_dir={out}", *overrides])
    return cfg, run(cfg, raw)


def _val_batch(cfg, tokenizer, n=8):
    """The first n held-out pairs as one (2n, T) batch, exactly as the trainer builds it."""
    from align.trainers.rm import collate, load_pair_data

    data = load_pair_data(cfg.data, None, tokenizer)
    return collate(data.val[:n], tokenizer.pad_token_id, torch.device("cpu"))


LORA_RUN = ["trainer.max_steps=4", "trainer.eval_every=2", "trainer.save_every=2"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """One short LoRA run shared by the output tests."""
    before = torch.get_num_threads()
    out = tmp_path_factory.mktemp("rm_lora")
    cfg, summary = _run(out, *LORA_RUN)
    torch.set_num_threads(before)
    return cfg, summary, out


def test_run_writes_metrics_checkpoint_role_and_classifier(lora_run):
    cfg, summary, out = lora_run
    rows = read_metrics(out)
    assert rows[0]["step"] == 0 and rows[0]["val/accuracy"] == pytest.approx(summary["val_before"]["accuracy"])
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "val/accuracy" in r] == [0, 2, 4]
    assert [r["step"] for r in rows if "time_to_first_step" in r] == [1] and rows[1]["time_to_first_step"] > 0
    for key in ("loss", "accuracy", "scores/chosen", "scores/rejected", "scores/margin", "grad_norm"):
        assert all(key in r for r in rows if r["step"] > 0), key
    for key in ("accuracy", "scores/chosen", "scores/rejected", "scores/margin", "loss", "scores/std"):
        assert f"val/{key}" in rows[-1]
    # margin = chosen mean - rejected mean, on the same held-out pairs
    last = rows[-1]
    assert last["val/scores/margin"] == pytest.approx(last["val/scores/chosen"] - last["val/scores/rejected"], abs=1e-5)
    # the checkpoint holds exactly the reward adapter and the score head
    from safetensors.torch import load_file

    saved = load_file(str(out / "checkpoints" / "step_4" / "trainable.safetensors"))
    assert "score_head.weight" in saved
    assert all("lora_" in k and ".reward." in k for k in saved if k != "score_head.weight")
    assert (out / "reward" / "adapter_config.json").exists() and (out / "reward" / "score_head.safetensors").exists()
    assert (out / "reward_model" / "config.json").exists()
    assert summary["data"]["rows_read"] == 96


def test_reward_role_loads_into_a_fresh_model_and_into_ppo_workers(lora_run):
    """The saved role gives the trained model's scores in a fresh MultiHeadModel, and in the
    model PPO's workers build with reward.model_path (actor and critic next to it)."""
    cfg, summary, out = lora_run
    from align.models import MultiHeadModel, RoleConfig
    from align.models.loading import load_causal_lm
    from align.trainers.rm import build_reward_model
    from align.workers.worker import WorkerSpec, build_role_model

    trained, tokenizer = build_reward_model(cfg.model)
    trained.load_role("reward", str(out / "reward"))
    trained.eval()
    batch = _val_batch(cfg, tokenizer)
    with torch.no_grad():
        expected = trained.scores(batch.input_ids, batch.attention_mask)
        fresh_base = build_reward_model(cfg.model)[0].scores(batch.input_ids, batch.attention_mask)
    assert not torch.allclose(expected, fresh_base, atol=1e-4)  # training changed the scores

    fresh = MultiHeadModel(load_causal_lm(cfg.model.name_or_path), {"reward": RoleConfig(r=cfg.model.lora.r)})
    fresh.load_role("reward", str(out / "reward"))
    fresh.eval()
    ppo_model, _ = build_role_model(WorkerSpec(model=cfg.model, trainer=cfg.trainer, roles=("actor", "critic"),
                                               reward_model_path=str(out / "reward")))
    ppo_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.scores(batch.input_ids, batch.attention_mask), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(ppo_model.scores(batch.input_ids, batch.attention_mask), expected, atol=1e-5, rtol=0)


def test_exported_classifier_reproduces_the_scores(lora_run):
    cfg, summary, out = lora_run
    from transformers import AutoModelForSequenceClassification

    from align.trainers.rm import build_reward_model

    trained, tokenizer = build_reward_model(cfg.model)
    trained.load_role("reward", str(out / "reward"))
    trained.eval()
    batch = _val_batch(cfg, tokenizer)
    clf = AutoModelForSequenceClassification.from_pretrained(out / "reward_model").eval()
    assert clf.config.num_labels == 1 and clf.config.pad_token_id == tokenizer.pad_token_id
    with torch.no_grad():
        ours = trained.scores(batch.input_ids, batch.attention_mask)
        theirs = clf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.squeeze(-1)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_full_finetuning_trains_every_weight_and_its_outputs_load(tmp_path, one_thread):
    cfg, summary = _run(tmp_path, "model.finetune=full", "trainer.max_steps=2", "trainer.eval_every=2",
                        "trainer.save_every=2", "trainer.lr=1e-3")
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from align.models import SeparateModels
    from align.models.loading import load_causal_lm

    saved = load_file(str(tmp_path / "checkpoints" / "step_2" / "trainable.safetensors"))
    assert "score_head.weight" in saved and any(k.endswith("embed_tokens.weight") for k in saved)
    # PPO with model.finetune=full loads the role folder into its own reward copy
    base = load_causal_lm(cfg.model.name_or_path)
    reloaded = SeparateModels.from_base(base, ("reward",))
    reloaded.load_role("reward", str(tmp_path / "reward"))
    reloaded.eval()
    from align.models.loading import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.name_or_path)
    batch = _val_batch(cfg, tokenizer)
    clf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "reward_model").eval()
    with torch.no_grad():
        ours = reloaded.scores(batch.input_ids, batch.attention_mask)
        theirs = clf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.squeeze(-1)
        untrained = SeparateModels.from_base(load_causal_lm(cfg.model.name_or_path), ("reward",))
        untrained.score_head.load_state_dict(reloaded.score_head.state_dict())
        before = untrained.scores(batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert not torch.allclose(ours, before, atol=1e-4)  # the backbone itself was trained


def test_grad_accumulation_2x4_equals_1x8(tmp_path, one_thread):
    """The step loss is the mean over all of the step's pairs, so 2 micro-batches of 4 pairs
    give the update of one batch of 8 (the same 8 pairs: the epoch order does not depend on the
    batch size)."""
    from safetensors.torch import load_file

    weights, losses = {}, {}
    for bs, ga in [(8, 1), (4, 2)]:
        out = tmp_path / f"bs{bs}"
        _run(out, "trainer.max_steps=1", f"trainer.batch_size={bs}", f"trainer.grad_accum={ga}",
             "trainer.max_grad_norm=0", "trainer.lr_scheduler=constant", "trainer.eval_batches=1", "algo.export=false")
        weights[bs] = load_file(str(out / "checkpoints" / "step_1" / "trainable.safetensors"))
        losses[bs] = [r for r in read_metrics(out) if r["step"] == 1][0]
    assert losses[4]["loss"] == pytest.approx(losses[8]["loss"], rel=1e-5)
    assert losses[4]["accuracy"] == pytest.approx(losses[8]["accuracy"])
    assert weights[4].keys() == weights[8].keys()
    for name in weights[8]:
        torch.testing.assert_close(weights[4][name], weights[8][name], atol=2e-6, rtol=1e-5)


@pytest.mark.slow
def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path):
    """`python -m align algo=rm` SIGKILLed right after its step-2 checkpoint and rerun with the
    same command redoes steps 3-7 exactly as an uninterrupted run (every metric but wall times,
    the final adapter and head), with LoRA dropout on: the RNG, data position and optimizer all
    come back (tests/_resume.py)."""
    rows = check_sigkill_resume([*SMALL, "model.lora.dropout=0.1", "trainer.eval_every=3"], tmp_path, max_steps=7,
                                save_every=2)
    assert all(rows[step]["grad_norm"] > 0 for step in range(5, 8))  # the resumed steps learned


# ------------------------------------------------------------------------------------ learning


@pytest.fixture(scope="module")
def tiny_neox(shared_data, tmp_path_factory):
    """A random tiny Llama (2 layers, hidden 64) reading English through the shipped GPT-NeoX
    tokenizer; its pad <|padding|> never ends a real sequence (EOS does)."""
    from transformers import PreTrainedTokenizerFast

    from align.models.loading import build_tiny_llama

    out = tmp_path_factory.mktemp("tiny_neox")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(shared_data / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"),
                                  bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|padding|>")
    model = build_tiny_llama(seed=0, vocab_size=len(tok), hidden_size=64, num_layers=2, num_heads=4,
                             max_position_embeddings=2048, tie_word_embeddings=True)
    model.config.bos_token_id = model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_reward_model_learns_real_preferences(tmp_path, tiny_neox, shared_data, one_thread):
    """On the shipped HH-RLHF helpful-base pairs (2,089 for training, one pass over 640 of them), held-out pairwise
    accuracy on 256 other pairs rises from chance to clearly above it, and the held-out loss
    falls. (On the three HH subsets mixed, the same model stays near chance: see
    scripts/bench_rm.py.)"""
    helpful = shared_data / "hh-rlhf" / "helpful-base_test.jsonl.gz"
    cfg, summary = _run(
        tmp_path, f"model.name_or_path={tiny_neox}", "model.finetune=full", f"data.source={helpful}",
        "data.limit=null", "data.val_size=256", "data.max_length=256", "data.max_prompt_length=192",
        "data.max_response_length=64", "trainer.batch_size=8", "trainer.eval_batches=32", "trainer.lr=1e-3",
        "trainer.warmup_steps=10", "trainer.max_steps=80", "trainer.eval_every=80", "trainer.save_every=80",
        "algo.export=false",
    )
    before, after = summary["val_before"], summary["val_after"]
    assert summary["val_pairs"] == 256 and summary["train_pairs"] == 2089
    assert after["accuracy"] >= 0.56 and after["accuracy"] >= before["accuracy"] + 0.05, (before, after)
    assert after["loss"] < before["loss"], (before, after)
    assert after["scores/margin"] > 0


# ------------------------------------------------------------------------------------- margins


def _margin_file(path, n=24, with_bad_row=False):
    rows = [{"prompt": f"Question {i}?", "chosen": f" good answer {i}", "rejected": f" bad {i}", "score_gap": i / 4}
            for i in range(n)]
    if with_bad_row:
        rows[5] = {k: v for k, v in rows[5].items() if k != "score_gap"}
    with gzip.open(path, "wt") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return rows


def test_margin_column_follows_each_pair_through_the_split(tmp_path, stories_path):
    from align.config import DataConfig
    from align.models.loading import load_tokenizer
    from align.trainers.rm import load_pair_data

    rows = _margin_file(tmp_path / "pairs.jsonl.gz")
    tok = load_tokenizer(stories_path)
    cfg = DataConfig(source=str(tmp_path / "pairs.jsonl.gz"), format="pairwise", val_size=6, max_length=64,
                     max_prompt_length=32)
    data = load_pair_data(cfg, "score_gap", tok)
    assert len(data.train) == 18 and len(data.val) == 6
    by_prompt = {tuple(tok(r["prompt"])["input_ids"]): r["score_gap"] for r in rows}
    for item in data.train + data.val:
        assert item["margin"] == by_prompt[tuple(item["prompt_ids"])]
    # the same pairs land on each side as without margins (the split ignores the margin column)
    plain = load_pair_data(cfg, None, tok)
    assert [x["prompt_ids"] for x in plain.val] == [x["prompt_ids"] for x in data.val]
    assert "margin" not in plain.val[0]
    assert all(x["margin"] == 0.5 for x in load_pair_data(cfg, 0.5, tok).train)


def test_a_missing_margin_names_file_line_and_field_or_is_skipped(tmp_path, stories_path):
    from dataclasses import replace

    from align.config import DataConfig
    from align.data import DataError
    from align.models.loading import load_tokenizer
    from align.trainers.rm import load_pair_data

    _margin_file(tmp_path / "pairs.jsonl.gz", with_bad_row=True)
    tok = load_tokenizer(stories_path)
    cfg = DataConfig(source=str(tmp_path / "pairs.jsonl.gz"), format="pairwise", val_size=4, max_length=64,
                     max_prompt_length=32)
    with pytest.raises(DataError, match=r"pairs.jsonl.gz, line 6, field 'score_gap': expected a finite number"):
        load_pair_data(cfg, "score_gap", tok)
    data = load_pair_data(replace(cfg, on_error="skip"), "score_gap", tok)
    assert data.stats["rows_skipped"] == 1 and len(data.train) + len(data.val) == 23


def test_the_margin_enters_the_loss(tmp_path):
    """-log sigmoid(s_w - s_l - m): with the trained scores fixed, the step's loss under per-pair
    margins equals the core loss with those margins (derived by hand for one pair below)."""
    from align.trainers.rm import RMBatch, step_loss

    class Fixed(torch.nn.Module):
        def __init__(self, scores):
            super().__init__()
            self.s = torch.nn.Parameter(scores)

        def scores(self, input_ids, attention_mask):
            return self.s

    # one pair, s_w = 1, s_l = 0, m = 1: loss = -log sigmoid(0) = log 2
    model = Fixed(torch.tensor([1.0, 0.0]))
    batch = RMBatch(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long), torch.tensor([1.0]))
    loss, stats = step_loss(model, [batch])
    assert loss == pytest.approx(torch.log(torch.tensor(2.0)).item(), rel=1e-6)
    assert stats["scores/margin"] == pytest.approx(1.0) and stats["accuracy"] == 1.0
    # d loss / d s_w = -sigmoid(-(s_w - s_l - m)) = -0.5
    assert model.s.grad.tolist() == pytest.approx([-0.5, 0.5])


# -------------------------------------------------------------------------------------- config


def test_config_defaults_and_validation():
    cfg, _ = compose(["algo=rm"])
    assert cfg.algo.name == "rm" and cfg.algo.margin is None and cfg.algo.export
    assert cfg.model.finetune == "lora" and cfg.data.format == "hh" and cfg.data.on_error == "skip"
    assert compose(["algo=rm", "algo.margin=0.5"])[0].algo.margin == 0.5
    assert compose(["algo=rm", "algo.margin=score_gap"])[0].algo.margin == "score_gap"
    assert compose(["algo=rm", "model.finetune=full"])[0].model.finetune == "full"
    for bad, match in [("algo.margin=true", "algo.margin"), ("algo.margin=''", "algo.margin"),
                       ("algo.margin=inf", "algo.margin")]:
        with pytest.raises(ConfigError, match=match):
            compose(["algo=rm", bad])
    with pytest.raises(Exception, match="nonsense"):
        compose(["algo=rm", "algo.nonsense=1"])


def test_length_balance_keeps_the_minority_side_and_ties_and_draws_as_many_from_the_majority():
    """5 pairs with the chosen response the longer, 2 with it the shorter, 1 tie: 2 of the 5 are
    drawn (the seed decides which), the rest kept, the order unchanged; "longer wins" is then a coin."""
    from align.trainers.rm import balance_lengths

    def pair(c, r, tag):
        return {"prompt_ids": [tag], "chosen_ids": [0] * c, "rejected_ids": [0] * r}

    items = [pair(3, 1, 0), pair(1, 3, 1), pair(4, 2, 2), pair(2, 2, 3), pair(5, 1, 4), pair(2, 6, 5),
             pair(6, 1, 6), pair(7, 2, 7)]
    kept = balance_lengths(items, seed=0)
    tags = [x["prompt_ids"][0] for x in kept]
    assert tags == sorted(tags) and {1, 3, 5} <= set(tags) and len(tags) == 5
    longer = [x for x in kept if len(x["chosen_ids"]) > len(x["rejected_ids"])]
    assert len(longer) == 2 == len([x for x in kept if len(x["chosen_ids"]) < len(x["rejected_ids"])])
    assert balance_lengths(items, seed=0) == kept
    assert any(balance_lengths(items, seed=s) != kept for s in range(1, 6))
    # the other way round: the chosen response mostly the shorter
    flipped = [{**x, "chosen_ids": x["rejected_ids"], "rejected_ids": x["chosen_ids"]} for x in items]
    assert len(balance_lengths(flipped, seed=0)) == 5


def test_bench_rm_sft_stage_never_trains_on_the_rm_held_out_pairs(tmp_path):
    """scripts/bench_rm.py --sft-steps: the in-domain SFT stage composes (algo=sft, full, the
    same subset and windows) and splits its data as the RM stage does, so the RM's held-out
    accuracy is not measured on dialogues the base was fine-tuned on."""
    import argparse
    import importlib.util
    from pathlib import Path

    from align.data import build_split

    path = Path(__file__).resolve().parents[2] / "scripts" / "bench_rm.py"
    spec = importlib.util.spec_from_file_location("bench_rm", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = argparse.Namespace(model="tiny-neox", subset="helpful-base", steps=5, batch_size=16, lr=1e-3, val_size=512,
                              max_length=256, max_response_length=64, eval_every=0, threads=1, seed=0, set=[],
                              sft_steps=7, sft_lr=1e-3)
    rm_cfg, _ = compose(bench.overrides(args, "unused-model-dir", tmp_path / "rm"))
    sft_cfg, _ = compose(bench.sft_overrides(args, "unused-model-dir", tmp_path / "sft"))
    assert sft_cfg.algo.name == "sft" and sft_cfg.model.finetune == "full" and sft_cfg.trainer.max_steps == 7
    for key in ("source", "format", "val_size", "seed", "max_length", "max_prompt_length", "max_response_length"):
        assert getattr(sft_cfg.data, key) == getattr(rm_cfg.data, key), key

    def split(d):  # as align/trainers/rm.py and align/trainers/setup.py call it
        return build_split(d.source, d.format, val_fraction=d.val_fraction, val_size=d.val_size, seed=d.seed,
                           columns=dict(d.columns), on_error=d.on_error, limit=d.limit, split=d.split)

    (rm_train, rm_val), (sft_train, _) = split(rm_cfg.data), split(sft_cfg.data)
    assert len(rm_val) == 512 and len(rm_train) == 1833
    assert not {repr(ex) for ex in rm_val} & {repr(ex) for ex in sft_train}


def test_bench_rm_probe_features_and_linear_reward_learn_in_domain():
    """scripts/bench_rm.py --probe (issue 18 item 4's evidence): the surface features measure
    what they name, and the linear bag-of-words Bradley-Terry reward learns its own subset, on
    pairs held out of its training, so its failure on the other subsets is theirs, not a broken
    model's."""
    import argparse
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "bench_rm.py"
    spec = importlib.util.spec_from_file_location("bench_rm", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    prompt = "\n\nHuman: How do I bake bread at home?\n\nAssistant:"
    f = bench.surface_features(prompt, " Sorry, do you want to bake bread bread bread?")
    assert f["length"] == 9 and f["question"] == 1.0 and f["apology"] == 1.0
    assert f["overlap"] == 3 / 7 and f["repeats"] == 1 - 7 / 9
    assert bench.surface_features(prompt, " Mix flour and water.")["question"] == 0.0
    args = argparse.Namespace(subset="helpful-base", val_size=512, test_size=256, seed=0)
    out = bench.probe(args)
    acc = out["linear_bt"]["accuracy"]
    assert out["linear_bt"]["train_pairs"] == 1833
    assert acc["helpful-base"] > 0.5 + 2 * 0.5 / 256**0.5, acc  # in domain: two coin stds above chance
    assert set(acc) == set(out["chosen_has_more"]) == {"helpful-base", "helpful-online", "harmless-base"}
