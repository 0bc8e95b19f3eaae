"""`python -m align algo=eval`: a policy on prompts (pass@k, maj@k, mean@n, greedy, lengths) and a
reward model on pairs (accuracy, margins, the length baseline), on the shipped stories260K."""

import json
import shutil

import pytest
import torch

from align.config import ConfigError, compose
from align.core.evaluation import pass_at_k
from align.trainers import run


def _rows(out):
    return [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]


def test_policy_eval_counts_match_the_rescored_samples(tmp_path):
    """Every number of summary.json is recomputed here from eval.jsonl, and every sample's reward
    from its response text: n_correct counts rewards >= threshold, pass@k is the mean of each
    prompt's unbiased estimate, pass@1 the fraction of correct samples, mean@n the mean reward."""
    from rewards import get_reward

    cfg, raw = compose(["algo=eval", "data.limit=6", "algo.n=4", "algo.k=[1,2,4]", "algo.threshold=0.3",
                        "rollout.max_new_tokens=16", "trainer.progress=false", f"output_dir={tmp_path}"])
    summary = run(cfg, raw)
    rows = _rows(tmp_path)
    assert len(rows) == summary["prompts"] == 6
    story = get_reward("story")
    all_scores = []
    for row in rows:
        assert row["n"] == 4 == len(row["scores"]) == len(row["responses"])
        assert row["scores"] == pytest.approx(story([row["prompt"]] * 4, row["responses"]))
        assert row["n_correct"] == sum(s >= 0.3 for s in row["scores"])
        assert all(length == 16 for length, t in zip(row["lengths"], row["truncated"]) if t)
        assert row["greedy"]["score"] == pytest.approx(story([row["prompt"]], [row["greedy"]["response"]])[0])
        all_scores += row["scores"]
    for k in (1, 2, 4):
        assert summary[f"pass@{k}"] == pytest.approx(sum(pass_at_k(4, r["n_correct"], k) for r in rows) / 6)
    assert summary["pass@1"] == pytest.approx(sum(s >= 0.3 for s in all_scores) / 24)
    assert summary["mean@4"] == pytest.approx(sum(all_scores) / 24)
    assert summary["greedy"] == pytest.approx(sum(r["greedy"]["correct"] for r in rows) / 6)
    assert summary["truncated_frac"] == pytest.approx(sum(map(sum, (r["truncated"] for r in rows))) / 24)
    assert not any(k.startswith("maj@") for k in summary)  # the story reward extracts no answers
    # samples differ (temperature 1), the greedy response is one of a kind per prompt
    assert len({tuple(r["responses"]) for r in rows}) == 6 and len(set(rows[0]["responses"])) > 1


def test_math_answers_vote_after_normalisation():
    """maj@k votes on normalised answers: "72", "72.0" and "\\boxed{72}" are one answer."""
    from align.evaluation.policy import answer_extractor, sample_metrics
    from rewards import get_reward

    extract = answer_extractor(get_reward("math"))
    answers = [extract(t) for t in ("so 72.0", "\\boxed{72}", "it is 5", "#### 5")]
    assert answers[0] == answers[1] != answers[2] == answers[3]
    assert answer_extractor(get_reward("story")) is None
    # prompt 0: answers 72, 72, 5 (72 is right): maj@3 = 1; prompt 1: 3, 4, 4 (3 is right): maj@3 = 0
    m = sample_metrics([[1, 1, 0], [1, 0, 0]], 1.0, [1, 3], [["72", "72", "5"], ["3", "4", "4"]])
    assert m == pytest.approx({"mean@3": 0.5, "pass@1": 0.5, "pass@3": 1.0, "maj@1": 1.0, "maj@3": 0.5})


def test_adapter_run_folder_and_checkpoint_load_the_adapted_policy(stories_path, tmp_path):
    """A LoRA adapter folder, an RL run folder and its checkpoint all resolve to the adapter on
    its base, and the engine generates from the merged weights, not from the base."""
    from peft import LoraConfig, get_peft_model

    from align.evaluation.policy import build_engine, resolve_policy
    from align.models.loading import load_causal_lm

    torch.manual_seed(0)
    peft = get_peft_model(load_causal_lm(stories_path), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                  init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft.save_pretrained(adapter)
    actor = tmp_path / "run" / "checkpoints" / "step_2" / "workers" / "model" / "actor"
    shutil.copytree(adapter, actor)
    (actor.parents[2] / "trainer_state.json").write_text("{}")
    for path in (adapter, tmp_path / "run", actor.parents[2]):
        base, found = resolve_policy(str(path), stories_path)
        assert base == stories_path and found is not None and found.endswith(("adapter", "actor")), path
    with pytest.raises(FileNotFoundError, match="algo.model"):
        resolve_policy(str(tmp_path), stories_path)

    cfg, _ = compose(["algo=eval", f"algo.model={adapter}"])
    engine, _ = build_engine(cfg, str(adapter), None)
    ids = torch.tensor([[1, 400, 30, 12, 99]])
    expected = peft.eval()(ids).logits
    assert torch.allclose(engine.model(ids).logits, expected, atol=1e-4)
    assert not torch.allclose(load_causal_lm(stories_path)(ids).logits, expected, atol=1e-3)


def test_eval_config_names_bad_keys():
    with pytest.raises(ConfigError, match=r"algo.k"):
        compose(["algo=eval", "algo.n=2", "algo.k=[1,4]"])
    with pytest.raises(ConfigError, match="algo.temperature"):
        compose(["algo=eval", "algo.temperature=0"])
    with pytest.raises(ConfigError, match="algo.eval_k"):
        compose(["algo=grpo", "algo.eval_samples=2", "algo.eval_k=[4]"])


RM = ["data.limit=96", "data.val_size=16", "data.max_length=96", "data.max_prompt_length=64",
      "data.max_response_length=32", "trainer.progress=false", "trainer.num_threads=1"]


@pytest.mark.slow
def test_reward_model_eval_agrees_with_the_rm_job_on_its_held_out_pairs(tmp_path):
    """The RM job's held-out accuracy, recomputed by algo=eval from its `reward/` role and from
    its `reward_model/` classifier on the same split: the same pairs, the same scores."""
    before = torch.get_num_threads()
    cfg, raw = compose(["algo=rm", *RM, "trainer.batch_size=4", "trainer.eval_batches=4", "trainer.max_steps=4",
                        "trainer.lr=5e-3", "trainer.warmup_steps=0", f"output_dir={tmp_path / 'rm'}"])
    trained, base = run(cfg, raw), cfg.model.name_or_path
    results = {}
    for name in ("reward", "reward_model"):
        cfg, raw = compose(["algo=eval", "data=hh_pairs", *RM, "algo.split=val", f"algo.model={tmp_path / 'rm' / name}",
                            f"model.name_or_path={base}", f"output_dir={tmp_path / name}"])
        results[name] = run(cfg, raw), _rows(tmp_path / name)
    torch.set_num_threads(before)
    (role, role_rows), (classifier, classifier_rows) = results["reward"], results["reward_model"]
    assert role["pairs"] == classifier["pairs"] == trained["val_pairs"] == 16
    assert role["accuracy"] == pytest.approx(trained["val_after"]["accuracy"])
    assert role["margin"]["mean"] == pytest.approx(trained["val_after"]["scores/margin"], abs=1e-4)
    for a, b in zip(role_rows, classifier_rows):
        assert a["chosen_score"] == pytest.approx(b["chosen_score"], abs=1e-4)
        assert a["rejected_score"] == pytest.approx(b["rejected_score"], abs=1e-4)
    # the report's groups are the rows' counts
    rows = role_rows
    assert role["accuracy"] == sum(r["correct"] for r in rows) / 16
    longer = [r for r in rows if r["chosen_length"] > r["rejected_length"]]
    assert role["chosen_longer"]["pairs"] == len(longer)
    assert sum(b["pairs"] for b in role["by_length"]) == 16


def test_pairs_refuse_a_causal_lm_as_reward_model(tmp_path):
    """The default algo.model on pair data is the policy, a causal LM: named, not scored by a random head."""
    cfg, raw = compose(["algo=eval", "data=hh_pairs", "data.limit=4", f"output_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"algo.model .*LlamaForCausalLM"):
        run(cfg, raw)


def test_a_sharded_rl_checkpoint_points_to_the_exported_model(tmp_path):
    # N replicas write their shards only (DCP): eval says where the whole model is instead of
    # loading the checkpoint folder as a model.
    from align.evaluation.policy import resolve_policy

    step = tmp_path / "checkpoints" / "step_2"
    (step / "workers" / "model" / "sharded").mkdir(parents=True)
    (step / "trainer_state.json").write_text('{"step": 2}')
    with pytest.raises(FileNotFoundError, match="written sharded.*final/"):
        resolve_policy(str(tmp_path), "base")
