"""A reward model with a base of its own (`align.models.scorer`): another size, another tokenizer.

The classifier here is a random 1-layer Llama of hidden size 32 reading the GPT-NeoX tokenizer
(the policy, stories260K, is a 5-layer hidden-64 Llama with a 512-token vocabulary), so the only
way to score a policy sample is through text.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from align.models.scorer import SequenceScorer, reward_model_kind

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"


def save_classifier(path, tokenizer_dir, *, num_labels=1, chat_template=None, seed=0):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if chat_template:
        tok.chat_template = chat_template
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         num_labels=num_labels, pad_token_id=tok.eos_token_id, initializer_range=0.2)
    LlamaForSequenceClassification(config).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def neox_dir(shared_data):
    return shared_data / "tokenizers" / "gpt-neox-20b"


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, neox_dir):
    return save_classifier(tmp_path_factory.mktemp("rm-clf"), neox_dir)


def direct_score(path, text, add_special_tokens=True):
    """One unpadded forward of the saved classifier on one text: the reference."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    ids = tok(text, add_special_tokens=add_special_tokens, return_tensors="pt").input_ids
    with torch.no_grad():
        return float(model(input_ids=ids).logits[0, 0])


def test_kind_tells_a_reward_role_from_a_classifier(classifier, tmp_path):
    role = tmp_path / "role"
    role.mkdir()
    (role / "score_head.safetensors").write_bytes(b"")
    assert reward_model_kind(str(role)) == "role"
    assert reward_model_kind(classifier) == "classifier"
    assert reward_model_kind("some-org/some-reward-model") == "classifier"  # a hub id


def test_batched_scores_equal_one_pair_at_a_time(classifier):
    scorer = SequenceScorer(classifier, batch_size=3)
    prompts = ["Once upon a time", "Tom had a red ball. One day", "The sun"]
    responses = [" there was a cat.", " he lost it and cried for a long, long time.", ""]
    scores = scorer.score(prompts * 2, responses * 2)  # two forwards of 3, padded differently
    expected = [direct_score(classifier, p + r) for p, r in zip(prompts, responses)]
    assert scores.shape == (6,)
    assert torch.allclose(scores, torch.tensor(expected * 2), atol=1e-5)
    assert len({round(float(s), 4) for s in scores[:3]}) == 3  # the scores depend on the text


def test_long_pairs_are_cut_from_the_left(classifier):
    scorer = SequenceScorer(classifier)
    prompt, response = "word " * 400, " and the end of the story."
    ids = scorer.tokenizer(prompt + response).input_ids
    assert len(ids) > scorer.max_length == 128
    kept = scorer.tokenizer.decode(ids[-128:])
    assert float(scorer.score([prompt], [response])[0]) == pytest.approx(
        direct_score(classifier, kept, add_special_tokens=False), abs=1e-4)


def test_chat_template_renders_message_prompts_and_text_stays_text(tmp_path, neox_dir):
    """TRL's rule: chat prompts go through the reward model's template, text prompts are read as
    prompt + response (this tokenizer has no EOS to append)."""
    path = save_classifier(tmp_path / "chat-rm", neox_dir, chat_template=CHAT_TEMPLATE)
    scorer = SequenceScorer(path)
    assert scorer.render("Hi", " Hello") == "Hi Hello"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = scorer.render(messages, "Hello")
    assert text == "<|system|>Be brief.\n<|user|>Hi\n<|assistant|>Hello\n"
    assert float(scorer.score([messages], ["Hello"])[0]) == pytest.approx(
        direct_score(path, text, add_special_tokens=False), abs=1e-5)


def test_an_exported_reward_role_scores_as_the_role_does(stories_path, tmp_path):
    """Our RM job's reward role, exported as a classifier (`export_reward_model`), read through
    SequenceScorer from text gives the role's own scores on the policy's tokens: EOS appended
    where the response ended (training appends it), not where it was cut at the length limit."""
    from align.models import load_model_and_tokenizer
    from align.models.multihead import MultiHeadModel, RoleConfig

    base, tok = load_model_and_tokenizer(stories_path)
    torch.manual_seed(3)
    rm = MultiHeadModel(base, {"reward": RoleConfig()}, pad_token_id=tok.pad_token_id).eval()
    with torch.no_grad():
        for name, p in rm.peft.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.05)
        rm.score_head.weight.normal_(std=0.5)
    rm.export_reward_model(str(tmp_path / "clf"), tok)
    prompts = ["Once upon a time", "Tom saw a big dog"]
    responses = [" there was a little girl named Lily.", " and he ran away"]
    ended = [True, False]
    rows = [tok(p + r).input_ids + ([tok.eos_token_id] if e else []) for p, r, e in zip(prompts, responses, ended)]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        expected = rm.scores(ids, mask)
    got = SequenceScorer(str(tmp_path / "clf")).score(prompts, responses, ended)
    assert torch.allclose(got, expected, atol=1e-4), (got, expected)
    # and the EOS matters: without it the first score moves
    assert abs(float(SequenceScorer(str(tmp_path / "clf")).score(prompts[:1], responses[:1], [False])[0])
               - float(expected[0])) > 1e-3


def test_critic_cannot_start_from_a_classifier(classifier, tmp_path):
    """PPO's critic_init_from_reward copies the reward role's adapter and head: with a classifier of
    another base the run is refused before any worker starts, naming the key."""
    from align.config import ConfigError, compose
    from align.trainers.rl import RLRun

    cfg, raw = compose(["algo=ppo", f"output_dir={tmp_path}", f"reward.model_path={classifier}",
                        "algo.critic_init_from_reward=true"])
    with pytest.raises(ConfigError, match="algo.critic_init_from_reward"):
        RLRun(cfg, raw, roles=("actor", "critic"), headline=("reward/mean",))


def test_a_classifier_with_several_outputs_is_refused(tmp_path, neox_dir):
    path = save_classifier(tmp_path / "two", neox_dir, num_labels=2)
    with pytest.raises(ValueError, match="num_labels=1"):
        SequenceScorer(path)


def test_colocated_worker_scores_with_the_classifier(classifier, stories_path):
    """The policy's worker keeps its roles on the shared model and scores with the classifier; the
    prompts the driver attaches are what the classifier reads."""
    from align.config import ModelConfig, TrainerConfig
    from align.workers.worker import ModelWorker, WorkerSpec
    from rollout.base import SamplingParams

    spec = WorkerSpec(model=ModelConfig(name_or_path=stories_path, finetune="lora"), trainer=TrainerConfig(),
                      roles=("actor",), reward_model_path=classifier)
    worker = ModelWorker(spec)
    assert worker.model.roles == ("actor",) and worker.info()["roles"] == ["actor", "reward"]
    texts = ["Once upon a time", "Lily saw a bird"]
    prompts = [worker.tokenizer(t).input_ids for t in texts]
    batch = worker.generate(prompts, [0, 1], SamplingParams(n=2, max_new_tokens=8, seed=0))
    batch = batch.replace(prompts=[texts[g] for g in batch.group_ids.tolist()])
    out = worker.annotate(batch, ("reference", "reward"))
    expected = [direct_score(classifier, texts[g] + r) for g, r in zip(batch.group_ids.tolist(), batch.response_text)]
    assert torch.allclose(out["rm_scores"], torch.tensor(expected), atol=1e-5)
    assert out["ref_logp"].shape == batch.response_ids.shape
    # without the driver's prompts, the worker decodes the prompt tokens: the same text here
    decoded = worker.annotate(batch.replace(prompts=[]), ("reward",))["rm_scores"]
    assert torch.allclose(decoded, out["rm_scores"], atol=1e-5)


@pytest.mark.slow
def test_grpo_split_placement_with_a_reward_model_of_another_size(ray_cluster, classifier, tmp_path):
    """Two GRPO iterations in split placement: the reward group's worker loads only the classifier,
    and the sequence score is the rule reward plus the weighted classifier score."""
    from align.config import compose
    from align.trainers.grpo import train
    from align.trainers.metrics import read_metrics

    cfg, hydra_cfg = compose([
        "algo=grpo", f"output_dir={tmp_path}", "cluster.placement=split", "cluster.num_cpus_per_worker=0.5",
        f"reward.model_path={classifier}", "reward.model_weight=0.5", "algo.rollout_batch_size=2",
        "algo.num_generations=4", "algo.eval_prompts=2", "algo.eval_samples=1", "rollout.max_new_tokens=12",
        "trainer.max_steps=2", "trainer.save_every=2", "trainer.eval_every=2", "trainer.progress=false",
    ])
    train(cfg, hydra_cfg)

    workers = json.loads((tmp_path / "workers.json").read_text())
    assert {w["name"]: w["roles"] for w in workers} == {"actor-0": ["actor"], "reward-0": ["reward"]}
    rows = read_metrics(tmp_path)[1:]
    assert len(rows) == 2
    for r in rows:
        assert math.isfinite(r["reward/model"]) and r["reward/model"] != 0
        assert r["reward/mean"] == pytest.approx(r["reward/target"] * 0.5 + r["reward/sentiment"] * 0.3
                                                 + r["reward/ending"] * 0.2 + 0.5 * r["reward/model"], abs=1e-5)
    assert (tmp_path / "checkpoints" / "step_2").is_dir()
    shutil.rmtree(tmp_path / "checkpoints")
