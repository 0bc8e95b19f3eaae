"""The offline preference trainer (align/trainers/dpo.py) on the real stories260K and HH pairs.

- every loss learns: held-out implicit-reward accuracy ends above chance by a margin and above
  its starting value (exactly 0 with a reference: policy == reference at step 0); ORPO, mostly
  SFT on this tiny model, raises its log-prob preference less and lowers the chosen NLL;
- gradient accumulation is normalised over the whole step (2 x 2 == 1 x 4), ORPO's token-mean
  NLL and KTO's step-level reference point included;
- the reference is the shared base with adapters off, precomputed once, cached on disk and hit
  by a second run; the per-batch reference gives the same loss;
- a run killed with SIGKILL resumes to exactly the weights and metrics of an uninterrupted run;
- config values are checked at start-up with messages naming the key.
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.config import ConfigError, DPOConfig, ModelConfig, compose
from align.core import PREFERENCE_LOSSES
from align.trainers.metrics import read_metrics

HH = "${shared_data:}/hh-rlhf/helpful-base_test.jsonl.gz"
LOSSES = ["sigmoid", "robust", "ipo", "hinge", "simpo", "orpo", "kto"]


def run_overrides(out: Path, cache: Path, *extra: str, resume: str = "never") -> list[str]:
    return ["algo=dpo", f"output_dir={out}", f"algo.reference_cache_dir={cache}", "trainer.num_threads=1",
            "trainer.progress=false", f"trainer.resume={resume}", f"data.source={HH}", *extra]


def train(overrides: list[str]) -> dict:
    from align.trainers.dpo import train as dpo_train

    cfg, raw = compose(overrides)
    return dpo_train(cfg, raw)


# ---------------------------------------------------------------------------------------- config


def test_algo_dpo_composes_with_each_loss():
    cfg, _ = compose(["algo=dpo", "algo.loss=ipo"])
    assert isinstance(cfg.algo, DPOConfig) and cfg.algo.loss == "ipo"
    assert cfg.trainer.max_steps == 200  # configs/trainer/dpo.yaml won over the default
    kto, _ = compose(["algo=kto"])
    assert kto.algo.name == "dpo" and kto.algo.loss == "kto" and kto.algo.unpair
    assert set(LOSSES) == set(PREFERENCE_LOSSES.names())  # every registered loss is exercised here


@pytest.mark.parametrize("override, key", [
    (["algo.loss=dpoo"], "algo.loss"),
    (["algo.beta=0"], "algo.beta"),
    (["algo.loss=ipo", "algo.label_smoothing=0.1"], "algo.label_smoothing"),
    (["algo.loss=robust", "algo.label_smoothing=0.5"], "algo.label_smoothing"),
    (["algo.label_smoothing=0.7"], "algo.label_smoothing"),
    (["algo.unpair=true"], "algo.unpair"),
    (["algo.loss=kto", "algo.desirable_weight=-1"], "algo.desirable_weight"),
    (["algo.loss=simpo", "algo.length_normalize=true"], "algo.length_normalize"),
])
def test_bad_dpo_value_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose(["algo=dpo", *override])


def test_unknown_loss_message_lists_the_registry():
    with pytest.raises(ConfigError) as err:
        compose(["algo=dpo", "algo.loss=dpoo"])
    assert all(name in str(err.value) for name in LOSSES)


# ----------------------------------------------------------------------------- unit behaviour


@pytest.fixture(scope="module")
def tokenizer(stories_path):
    from align.models import load_tokenizer

    return load_tokenizer(stories_path)


@pytest.fixture(scope="module")
def pair_items(tokenizer, shared_data):
    """Eight real HH pairs, tokenized short."""
    from align.data import build_split, tokenize_pairs

    pairs, _ = build_split(str(shared_data / "hh-rlhf" / "helpful-base_test.jsonl.gz"), "hh", val_size=0,
                           on_error="skip", limit=8)
    return tokenize_pairs(pairs, tokenizer, max_length=48, max_prompt_length=24, max_response_length=24)


def fresh_model(stories_path, finetune="full"):
    from align.trainers.setup import build_policy

    torch.manual_seed(0)
    model, _ = build_policy(ModelConfig(name_or_path=stories_path, finetune=finetune))
    return model.train()


def grads_after(model, objective, micro) -> dict[str, torch.Tensor]:
    from align.trainers.dpo import step_loss

    model.zero_grad(set_to_none=True)
    step_loss(objective, model, micro)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def with_fake_reference(items, seed):
    """Copies of `items` with reference log-probs near (below) the policy's, so losses and
    KTO's reference point are away from their trivial values."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for item in items:
        x = dict(item)
        x["ref"] = (-40 + 10 * torch.rand(2, generator=g)).tolist()
        out.append(x)
    return out


@pytest.mark.parametrize("loss", ["sigmoid", "orpo", "kto"])
def test_two_by_two_accumulation_equals_one_by_four(loss, stories_path, pair_items, tokenizer):
    """The step's loss is the mean over all its pairs (ORPO's NLL: over all its chosen tokens;
    KTO: z0 from all its mismatched pairs), so splitting 4 pairs into 2 micro-batches of 2
    gives the same gradient. The micro-batches have different token counts, so a per-micro
    token mean (or per-micro z0) would fail this."""
    from align.trainers.dpo import PreferenceObjective, assign_mismatched, collate, unpair

    items = with_fake_reference(pair_items[:4], seed=1)
    if loss == "kto":
        items = unpair(pair_items[:2])  # four unpaired examples
        assign_mismatched(items, max_length=48, seed=0)
        items = [dict(x, ref=[-70.0 + i, -90.0 - i]) for i, x in enumerate(items)]
    model = fresh_model(stories_path)
    algo = DPOConfig(loss=loss, beta=0.1 if loss != "orpo" else 0.5, unpair=loss == "kto")
    objective = PreferenceObjective(algo, reference=None)
    pad = tokenizer.pad_token_id
    one = grads_after(model, objective, [collate(items, pad, torch.device("cpu"))])
    two = grads_after(model, objective, [collate(items[:2], pad, torch.device("cpu")),
                                         collate(items[2:], pad, torch.device("cpu"))])
    assert one.keys() == two.keys() and len(one) > 0
    for name in one:
        scale = one[name].abs().max().item()  # float32 sums in another order: compare at the tensor's scale
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5 * scale, msg=name)
    if loss == "kto":  # the fake references put z0 above 0, so the reference point matters
        batch = collate(items, pad, torch.device("cpu"))
        z0 = objective.kto_point(model, [batch], [objective.reference_logps(batch)])
        assert z0 > 0


def test_shared_prompt_forward_equals_one_sequence_at_a_time(stories_path, pair_items, tokenizer):
    """Each prompt run once and its two responses over the cached keys and values give the
    log-probs of a naive loop (one unpadded prompt + response at a time, log_softmax + gather),
    and the same gradients as the concatenated (2B, P + R) forward."""
    from align.trainers.logps import collate_shared, concatenated_logps, shared_prompt_logps

    # prompts of different lengths (BOS + their last n - 1 tokens), so the cache has padding inside
    items = [dict(x, prompt_ids=x["prompt_ids"][:1] + x["prompt_ids"][1 - n:])
             for x, n in zip(pair_items, (24, 9, 17, 3))]
    model = fresh_model(stories_path)
    batch = collate_shared([x["prompt_ids"] for x in items],
                           [r for x in items for r in (x["chosen_ids"], x["rejected_ids"])], tokenizer.pad_token_id)
    naive = []
    with torch.no_grad():
        for x in items:
            for response in (x["chosen_ids"], x["rejected_ids"]):
                ids = torch.tensor([x["prompt_ids"] + response])
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
                targets = ids[0, 1:]
                naive.append(logp[torch.arange(len(targets)), targets][-len(response):].sum().item())
    results = {}
    for name, fn in (("shared", shared_prompt_logps), ("concatenated", concatenated_logps)):
        model.zero_grad(set_to_none=True)
        logps, lengths = fn(model, **batch, k=2)
        logps.sum().backward()
        results[name] = logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
        assert lengths.tolist() == [len(r) for x in items for r in (x["chosen_ids"], x["rejected_ids"])]
        expected = torch.tensor(naive, dtype=torch.float64)
        torch.testing.assert_close(logps.detach().double(), expected, rtol=1e-5, atol=2e-4)
    shared, concat = results["shared"][1], results["concatenated"][1]
    for n in concat:
        torch.testing.assert_close(shared[n], concat[n], rtol=1e-4, atol=1e-5 * concat[n].abs().max().item(), msg=n)


@pytest.mark.parametrize("loss", ["ipo", "sigmoid"])
def test_length_normalize_feeds_per_token_logps_to_the_loss(loss):
    """algo.length_normalize divides policy and reference log-probs by the response length
    before the registry loss; the summed log-probs still go to the logs."""
    from align.trainers.dpo import PreferenceObjective

    pc, pr, rc, rr = torch.tensor([-30.0, -12.0]), torch.tensor([-20.0, -30.0]), torch.tensor([-28.0, -15.0]), \
        torch.tensor([-25.0, -27.0])
    lc, lr = torch.tensor([10.0, 4.0]), torch.tensor([5.0, 10.0])
    got, stats = PreferenceObjective(DPOConfig(loss=loss, beta=0.5, length_normalize=True), None).pairs(
        pc, pr, lc, lr, rc, rr)
    expected, _ = PREFERENCE_LOSSES.get(loss)(pc / lc, pr / lr, rc / lc, rr / lr, beta=0.5)
    summed, _ = PREFERENCE_LOSSES.get(loss)(pc, pr, rc, rr, beta=0.5)
    assert got.item() == pytest.approx(expected.item()) and abs(expected.item() - summed.item()) > 1e-3
    assert stats["logps/chosen"].item() == pytest.approx(-21.0)


def test_unpair_and_mismatched_completions(pair_items):
    """Each pair gives a desirable and an undesirable example with the pair's prompt; every
    example's mismatched completion answers another prompt and fits max_length."""
    from align.trainers.dpo import assign_mismatched, unpair

    items = unpair(pair_items)
    assert len(items) == 2 * len(pair_items)
    assert [x["label"] for x in items[:4]] == [True, False, True, False]
    assert items[0]["completion_ids"] == pair_items[0]["chosen_ids"]
    assert items[1]["completion_ids"] == pair_items[0]["rejected_ids"]
    assign_mismatched(items, max_length=40, seed=3)
    completions = {tuple(x["completion_ids"]): x["prompt_ids"] for x in items}
    for x in items:
        kl = x["kl_completion_ids"]
        assert len(x["prompt_ids"]) + len(kl) <= 40
        owners = [p for c, p in completions.items() if c[: len(kl)] == tuple(kl)]
        assert owners and all(p != x["prompt_ids"] for p in owners)


def test_lora_reference_is_the_base_with_adapters_off(stories_path, pair_items, tokenizer):
    """With LoRA the reference comes from the same model object with its adapters disabled:
    equal to a separately loaded base model, and different from the (perturbed) policy."""
    from align.models import load_causal_lm
    from align.trainers.reference import compute_logps, reference_mode

    policy = fresh_model(stories_path, finetune="lora")
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    seqs = [(x["prompt_ids"], x["chosen_ids"]) for x in pair_items]
    with reference_mode(policy):
        ref = compute_logps(policy, seqs, tokenizer.pad_token_id, batch_size=4)
    assert policy.training  # the mode is restored
    base = load_causal_lm(stories_path).eval()
    with torch.no_grad():
        expected = compute_logps(base, seqs, tokenizer.pad_token_id, batch_size=4)
        policy.eval()
        moved = compute_logps(policy, seqs, tokenizer.pad_token_id, batch_size=4)
    torch.testing.assert_close(ref, expected, rtol=0, atol=1e-4)
    assert (moved - expected).abs().max() > 0.1


def test_reference_cache_is_keyed_by_sequences_and_model(tmp_path, stories_path, pair_items, tokenizer):
    """First call computes and writes; the same sequences and model hit the file with identical
    numbers; a changed sequence or another model misses."""
    from align.trainers.reference import compute_logps, reference_logps

    model = fresh_model(stories_path)
    cfg = ModelConfig(name_or_path=stories_path)
    seqs = [(x["prompt_ids"], x["chosen_ids"]) for x in pair_items]
    calls = []

    def compute(m, seqs=seqs):
        calls.append(len(seqs))
        return compute_logps(m, seqs, tokenizer.pad_token_id, batch_size=4)

    kw = dict(model_cfg=cfg, tokenizer=tokenizer, cache_dir=tmp_path, layout="chunks=4")
    first, hit1 = reference_logps(model, seqs, compute, **kw)
    again, hit2 = reference_logps(model, seqs, compute, **kw)
    assert (hit1, hit2) == (False, True) and torch.equal(first, again) and calls == [8]
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    shorter = seqs[:-1] + [(seqs[-1][0], seqs[-1][1][:-1])]
    assert reference_logps(model, shorter, lambda m: compute(m, shorter), **kw)[1] is False
    other = dict(kw, model_cfg=ModelConfig(name_or_path=stories_path, dtype="bfloat16"))
    assert reference_logps(model, seqs, compute, **other)[1] is False
    assert reference_logps(model, seqs, compute, **dict(kw, layout="chunks=8"))[1] is False
    assert reference_logps(model, seqs, compute, **dict(kw, cache_dir=None))[1] is False  # no cache: always computed


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_per_batch_reference_gives_the_precomputed_loss(finetune, stories_path, pair_items, tokenizer):
    """precompute_reference=false (a frozen copy with full fine-tuning, the adapters off with
    LoRA) gives the loss that the precomputed reference gives, after the policy has moved."""
    from align.trainers.dpo import OnlineReference, PreferenceObjective, collate, item_sequences
    from align.trainers.reference import compute_logps, reference_mode

    model = fresh_model(stories_path, finetune)
    online = OnlineReference(model, lora=finetune == "lora")  # before any update
    items = pair_items[:4]
    with reference_mode(model):
        ref = compute_logps(model, [s for x in items for s in item_sequences(x)], tokenizer.pad_token_id, 8)
    with torch.no_grad():  # the policy moves away from the reference
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    algo = DPOConfig(loss="sigmoid")
    cpu = torch.device("cpu")
    pre_batch = collate([dict(x, ref=r) for x, r in zip(items, ref.view(-1, 2).tolist())], tokenizer.pad_token_id, cpu)
    pre, pre_stats = PreferenceObjective(algo, None).pair_step_share(model, pre_batch, 1.0, 1.0)
    batch = collate(items, tokenizer.pad_token_id, cpu)
    got, _ = PreferenceObjective(algo, online).pair_step_share(model, batch, 1.0, 1.0)
    torch.testing.assert_close(got, pre, rtol=1e-4, atol=1e-5)
    assert abs(float(pre_stats["rewards/margins"])) > 1e-3  # the policy did move


def test_data_kind_must_match_the_loss(tmp_path, tokenizer, shared_data):
    """Pair losses refuse unpaired data; KTO refuses pairs unless told to split them
    (algo.unpair), and then gives one desirable and one undesirable example per pair."""
    import json

    from align.config import DataConfig
    from align.data import build_split
    from align.trainers.dpo import load_preference_data

    hh = str(shared_data / "hh-rlhf" / "helpful-base_test.jsonl.gz")
    pairs, _ = build_split(hh, "hh", val_size=0, on_error="skip", limit=12)
    unpaired = tmp_path / "kto.jsonl"
    unpaired.write_text("".join(json.dumps({"prompt": p.prompt, "completion": c, "label": label}) + "\n"
                                for p in pairs for c, label in ((p.chosen, True), (p.rejected, False))))
    kw = dict(val_size=4, max_length=64, max_prompt_length=24, max_response_length=40, on_error="skip")
    with pytest.raises(ValueError, match="needs preference pairs"):
        load_preference_data(DataConfig(source=str(unpaired), format="kto", **kw), DPOConfig(), tokenizer, 0)
    with pytest.raises(ValueError, match="algo.unpair=true"):
        load_preference_data(DataConfig(source=hh, format="hh", limit=12, **kw), DPOConfig(loss="kto"), tokenizer, 0)
    split = load_preference_data(DataConfig(source=hh, format="hh", limit=12, **kw),
                                 DPOConfig(loss="kto", unpair=True), tokenizer, 0)
    assert len(split.train) == 2 * 8 and sum(x["label"] for x in split.train) == 8
    assert all("chosen_ids" in x for x in split.val)  # held-out pairs stay pairs
    kto = load_preference_data(DataConfig(source=str(unpaired), format="kto", **kw), DPOConfig(loss="kto"),
                               tokenizer, 0)
    assert all("kl_completion_ids" in x for x in kto.train + kto.val)


def test_kto_on_unpaired_data_runs_end_to_end(tmp_path, shared_data):
    """data.format=kto: unpaired training and unpaired held-out examples (KTO's own accuracy:
    examples on the right side of z0), reference precomputed; two steps, finite numbers."""
    import json

    from align.data import build_split

    pairs, _ = build_split(str(shared_data / "hh-rlhf" / "helpful-base_test.jsonl.gz"), "hh", val_size=0,
                           on_error="skip", limit=16)
    source = tmp_path / "kto.jsonl"
    source.write_text("".join(json.dumps({"prompt": p.prompt, "completion": c, "label": label}) + "\n"
                              for p in pairs for c, label in ((p.chosen, True), (p.rejected, False))))
    summary = train(run_overrides(tmp_path / "run", tmp_path / "cache", *TINY, f"data.source={source}",
                                  "data.format=kto", "algo.loss=kto", "trainer.max_steps=2", "trainer.eval_every=2"))
    after = summary["val_after"]
    assert summary["reference"].startswith("precomputed")
    assert {"loss", "rewards/accuracy", "kl"} <= set(after) and all(math.isfinite(v) for v in after.values())
    assert summary["val_before"]["kl"] == 0.0  # z0 at step 0: policy == reference


# ------------------------------------------------------------------------------ learning

# A small HH helpful-base subset (about 270 training pairs, 128 held out), the prompt cut to its
# last 32 tokens and responses to 80: a few seconds of CPU per loss and step count. Full fine-
# tuning of stories260K learns faster here than a LoRA adapter.
LEARN = ["data.limit=400", "data.val_size=128", "data.max_length=112", "data.max_prompt_length=32",
         "data.max_response_length=80", "trainer.batch_size=8", "trainer.warmup_steps=3", "trainer.lr=1e-3",
         "trainer.max_steps=30", "trainer.eval_every=30", "trainer.save_every=30", "trainer.eval_batches=16",
         "algo.reference_batch_size=32"]
PER_LOSS = {  # the papers' temperatures where they learn here; see scripts/learn_dpo.py for why not elsewhere
    "sigmoid": ["algo.beta=0.1"],
    "robust": ["algo.beta=0.1", "algo.label_smoothing=0.1"],
    "ipo": ["algo.beta=0.1", "algo.length_normalize=true"],
    "hinge": ["algo.beta=0.2"],
    "simpo": ["algo.beta=2.0", "algo.simpo_gamma=0.5"],
    "orpo": ["algo.beta=10.0", "trainer.lr=3e-4", "trainer.max_steps=40", "trainer.eval_every=40",
             "trainer.save_every=40"],
    "kto": ["algo.beta=0.1", "algo.unpair=true", "algo.undesirable_weight=0.5", "trainer.lr=2e-4"],
}
CHANCE = 0.5
MARGIN = 0.06  # 0.56 on 128 held-out pairs: 8 pairs above chance; the runs reach about 0.59-0.63


@pytest.fixture(scope="module")
def learn_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("reference_cache")  # shared: the reference losses reuse one precompute


@pytest.mark.parametrize("loss", LOSSES)
def test_each_loss_learns_on_hh(loss, learn_cache, tmp_path, stories_path):
    """Held-out implicit-reward accuracy (for SimPO and ORPO their implicit reward is the mean
    log-prob, so this is the log-prob preference) ends clearly above chance and above its
    starting value. With a reference the start is exactly 0: at step 0 policy and reference
    give identical log-probs, every implicit reward is 0 and no pair is won. ORPO also lowers
    the chosen responses' NLL. The loss stays finite and the weights move."""
    out = tmp_path / loss
    summary = train(run_overrides(out, learn_cache, *LEARN, *PER_LOSS[loss], f"algo.loss={loss}"))
    before, after = summary["val_before"], summary["val_after"]
    acc0, acc = before["rewards/accuracy"], after["rewards/accuracy"]
    if loss in ("simpo", "orpo"):
        assert acc0 == before["logp_accuracy"] and acc == after["logp_accuracy"]
    else:
        assert acc0 == 0.0 and before["rewards/margins"] == 0.0  # policy == reference, bit for bit
    if loss == "orpo":  # mostly SFT on this tiny model: a smaller preference gain, and a lower NLL
        assert acc >= acc0 + 0.03, (acc0, acc)
        assert after["nll"] < before["nll"] - 0.05, (before["nll"], after["nll"])
    else:
        assert acc >= max(CHANCE + MARGIN, acc0 + 0.05), (loss, acc0, acc)
    rows = read_metrics(out)
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r) and len(rows) == summary["steps"] + 1
    start = load_file(str(Path(stories_path) / "model.safetensors"))
    final = load_file(str(out / "final" / "model.safetensors"))
    assert any(not torch.equal(final[k], start[k]) for k in start if k in final)


# ------------------------------------------------------------------------------ the driver

# A few seconds a run: 40 HH pairs cut to 64 tokens.
TINY = ["data.limit=48", "data.val_size=8", "data.max_length=64", "data.max_prompt_length=24",
        "data.max_response_length=40", "trainer.batch_size=4", "trainer.warmup_steps=2", "trainer.lr=1e-3"]


def test_second_run_reads_the_reference_from_the_disk_cache(tmp_path):
    """Same data, model and tokenisation: the second run reads the file the first one wrote
    and starts from identical held-out numbers; another max_length is another key."""
    steps = ["trainer.max_steps=1", "trainer.eval_every=1", "trainer.save_every=1"]
    first = train(run_overrides(tmp_path / "a", tmp_path / "cache", *TINY, *steps))
    second = train(run_overrides(tmp_path / "b", tmp_path / "cache", *TINY, *steps))
    assert first["reference"].startswith("precomputed") and second["reference"].startswith("read from cache")
    assert second["val_before"] == first["val_before"]
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    third = train(run_overrides(tmp_path / "c", tmp_path / "cache", *TINY, *steps, "data.max_length=60"))
    assert third["reference"].startswith("precomputed")
    simpo = train(run_overrides(tmp_path / "d", tmp_path / "cache", *TINY, *steps, "algo.loss=simpo"))
    assert simpo["reference"].startswith("none")


def test_a_short_run_computes_references_for_the_pairs_it_visits_only(tmp_path):
    """max_steps=2 of 2 x 2 pairs computes (and caches) the reference log-probs of those 8 pairs
    and the held-out ones, not of the whole training set; and its steps equal those of a run
    that visits, so precomputes, every pair. One item per reference forward
    (reference_batch_size=1), so an item's numbers do not depend on which others share its
    forward; a constant schedule, so the first steps do not depend on max_steps. DPO and the
    other stages log time_to_first_step on step 1."""
    run = [*TINY, "trainer.batch_size=2", "trainer.grad_accum=2", "trainer.lr_scheduler=constant",
           "trainer.eval_every=100", "algo.reference_batch_size=1"]
    short = train(run_overrides(tmp_path / "short", tmp_path / "cache_short", *run, "trainer.max_steps=2"))
    n, val = short["train_items"], short["val_items"]
    assert n > 8 * 3 and val > 0
    (cached,) = (tmp_path / "cache_short").glob("*.safetensors")
    assert load_file(str(cached))["logps"].shape == (2 * (8 + val),)  # chosen and rejected of each item
    assert short["reference_items"] == 8 + val

    everything = train(run_overrides(tmp_path / "all", tmp_path / "cache_all", *run, f"trainer.max_steps={n // 4}"))
    assert everything["reference_items"] == n // 4 * 4 + val
    assert everything["val_before"] == short["val_before"]
    a, b = read_metrics(tmp_path / "short"), read_metrics(tmp_path / "all")
    keys = ["loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"]
    assert [[r[k] for k in keys] for r in a[1:3]] == [[r[k] for k in keys] for r in b[1:3]]
    assert [r["step"] for r in a if "time_to_first_step" in r] == [1] and a[1]["time_to_first_step"] > 0


def test_sigkill_then_resume_matches_the_uninterrupted_run(tmp_path):
    """A run killed (SIGKILL) after a checkpoint and resumed with trainer.resume=auto ends with
    the same weights, bit for bit, and the same per-step metrics as a run never interrupted;
    metrics.jsonl holds each step once."""
    run = [*TINY, "trainer.max_steps=12", "trainer.save_every=2", "trainer.eval_every=6", "trainer.keep_checkpoints=2"]
    cache = tmp_path / "cache"
    train(run_overrides(tmp_path / "straight", cache, *run))

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "align", *run_overrides(killed, cache, *run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=Path(__file__).parents[2])
    deadline = time.time() + 600
    while not (killed / "checkpoints" / "step_2" / "trainer_state.json").exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (killed / "final").exists()

    summary = train(run_overrides(killed, cache, *run, resume="auto"))
    assert summary["steps"] == 12
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(killed / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(killed)
    assert [r["step"] for r in resumed] == list(range(13))
    drop = {"time", "time_to_first_step", "samples_per_s"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed] == \
        [{k: v for k, v in r.items() if k not in drop} for r in straight]
