"""GRPO and PPO end to end with 2 FSDP2-sharded replicas per worker group (gloo on CPU): the
rollout copy is refreshed from gathered shards (the engine samples as the trainer scores), the
checkpoint is written sharded (DCP, a file per replica) and a rerun resumes from it; with full
fine-tuning (a whole rollout copy of the actor, a sharded frozen reference and, for PPO, a
sharded critic) the sharded run equals one unsharded replica on the whole batch. That the
sharded updates of the worker verbs equal one replica's is tests/workers/test_data_parallel.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from align.config import ConfigError, compose
from align.trainers.metrics import read_metrics

COMMON = ["algo.rollout_batch_size=2", "algo.num_generations=4", "algo.eval_prompts=2", "rollout.max_new_tokens=10",
          "trainer.eval_every=3", "trainer.save_every=2", "trainer.progress=false", "seed=3",
          "trainer.strategy=fsdp2", "cluster.num_replicas=2"]


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_sharded_rl_run_syncs_checkpoints_and_resumes(ray_cluster, tmp_path, algo):
    from align.trainers import run

    extra = ["algo.minibatch_size=4"] if algo == "ppo" else []
    overrides = [f"algo={algo}", *COMMON, *extra, f"cluster.address={ray_cluster}", f"output_dir={tmp_path}"]
    cfg, raw = compose([*overrides, "trainer.max_steps=2"])
    run(cfg, raw)
    # each replica wrote its own shards of the trainable weights and optimizer states (DCP)
    worker = tmp_path / "checkpoints" / "step_2" / "workers" / "model"
    assert sorted(f.name for f in (worker / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (worker / "actor").exists()  # nothing gathered whole
    cfg, raw = compose([*overrides, "trainer.max_steps=3"])
    summary = run(cfg, raw)  # resume=auto: from the sharded step-2 checkpoint
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for r in rows[1:]:
        assert math.isfinite(r["actor/loss"]) and r["actor/grad_norm"] > 0
        # the merged rollout copy, rebuilt from gathered shards after every update, samples as
        # the sharded actor scores: a stale or half-gathered copy would show here
        assert r["actor/mismatch/abs_logp_diff"] < 1e-4, r["actor/mismatch/abs_logp_diff"]
    if algo == "ppo":
        assert all(math.isfinite(r["critic/vf_loss"]) for r in rows[1:])
    assert summary["export_dir"]


# Full fine-tuning of stories260K, plain SGD (a weight change is lr x the clipped gradient, so equal
# weights mean equal gradients), 2 minibatches per iteration (PPO: x 2 epochs), the KL term on.
FULL = ["model=stories260k", "algo.rollout_batch_size=1", "algo.num_generations=4", "algo.minibatch_size=2",
        "algo.eval_prompts=1", "rollout.max_new_tokens=10", "trainer.max_steps=2", "trainer.save_every=2",
        "trainer.eval_every=2", "trainer.progress=false", "trainer.optimizer=sgd", "trainer.lr=0.5", "seed=3"]


def _role_tensors(folder: Path) -> dict:
    """Every tensor of a Hugging Face model folder (and of a role's head file beside it)."""
    from safetensors.torch import load_file

    out = {f"{f.name}:{k}": v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert out, f"no safetensors under {folder}"
    return out


def _critic_tensors(worker: Path) -> dict:
    """The critic's weights and value head in a worker's checkpoint, keyed as its role folder
    keys them: from the role folder (one replica) or from the replicas' shards (DCP)."""
    if (worker / "critic").is_dir():
        return _role_tensors(worker / "critic")
    from align.trainers.checkpoint import read_trainable

    saved = read_trainable(worker)
    out = {f"model.safetensors:{k.removeprefix('models.critic.')}": v for k, v in saved.items()
           if k.startswith("models.critic.")}
    out.update({f"value_head.safetensors:{k.removeprefix('value_head.')}": v for k, v in saved.items()
                if k.startswith("value_head.")})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("algo,strategy", [("grpo", "fsdp2"), ("ppo", "fsdp2"), ("grpo", "ddp")])
def test_sharded_full_fine_tuning_equals_one_replica(ray_cluster, tmp_path, algo, strategy):
    """2 iterations of full fine-tuning: one replica (`single`: the HF engine samples from the
    actor itself) against 2 fsdp2 replicas (each generates from its whole rollout copy, rebuilt
    from the gathered shards at every sync; the reference and critic are sharded too). One prompt
    per iteration, so rank 0 of the pair samples exactly what the single replica samples (the same
    per-rank seed) and rank 1 none; annotation and updates split the 4 rows. Same rewards, losses
    (the KL term included), gradient norms and updated actor (and critic) weights, to fp32
    rounding; the weights moved. A stale rollout copy would sample the second iteration from the
    first policy: other samples, and a sampler/trainer log-prob gap."""
    from align.trainers import run

    runs = {}
    for name, extra in {"one": ["trainer.strategy=single", "cluster.num_replicas=1"],
                        "two": [f"trainer.strategy={strategy}", "cluster.num_replicas=2"]}.items():
        out = tmp_path / name
        cfg, raw = compose([f"algo={algo}", *FULL, *extra, f"cluster.address={ray_cluster}", f"output_dir={out}"])
        assert cfg.model.finetune == "full"
        summary = run(cfg, raw)
        weights = {"actor": _role_tensors(Path(summary["export_dir"]))}  # the exported Hugging Face folder
        if algo == "ppo":  # the critic is not exported: the last checkpoint's
            weights["critic"] = _critic_tensors(out / "checkpoints" / "step_2" / "workers" / "model")
        runs[name] = ({r["step"]: r for r in read_metrics(out)}, weights)
    (rows_one, weights_one), (rows_two, weights_two) = runs["one"], runs["two"]
    assert sorted(rows_one) == sorted(rows_two) == [0, 1, 2]
    keys = ["reward/mean", "actor/loss", "actor/pg_loss", "actor/grad_norm"]
    keys += ["actor/kl_loss"] if algo == "grpo" else ["critic/vf_loss", "critic/grad_norm"]
    for step in (1, 2):
        for key in keys:
            assert rows_two[step][key] == pytest.approx(rows_one[step][key], rel=1e-4, abs=1e-6), (step, key)
        for rows in (rows_one, rows_two):  # each engine samples as its trainer scores
            assert rows[step]["actor/mismatch/abs_logp_diff"] < 1e-4, (step, rows[step]["actor/mismatch/abs_logp_diff"])
    if algo == "grpo":
        assert rows_one[2]["actor/kl_loss"] > 0  # the actor has left the reference: the KL term is exercised
    initial = _role_tensors(Path(compose(["model=stories260k"])[0].model.name_or_path))
    for role, tensors in weights_one.items():
        assert tensors.keys() == weights_two[role].keys()
        for key, value in tensors.items():
            torch.testing.assert_close(weights_two[role][key], value, atol=1e-5, rtol=1e-5, msg=f"{role} {key}")
    for role, tensors in weights_one.items():
        moved = max(float((tensors[k] - v).abs().max()) for k, v in initial.items() if k in tensors)
        assert moved > 1e-3, f"the updates did not move the {role}"


def test_sharded_rl_refuses_generating_through_the_shards():
    """Under ddp and fsdp2 (FSDP2 units) the HF engine generates from a whole copy of the actor
    (LoRA merged in, or the fully fine-tuned weights); without it (or with a quantized base, which
    cannot be merged) it would gather the units for every token, so the config refuses, naming the keys."""
    for strategy in ("fsdp2", "ddp"):
        for finetune in ("lora", "full"):
            with pytest.raises(ConfigError, match=rf"trainer\.strategy={strategy} runs the RL workers' model as FSDP2 "
                                                  r"units, and with rollout\.merged_copy=false"):
                compose(["algo=grpo", f"trainer.strategy={strategy}", "cluster.num_replicas=2",
                         "rollout.merged_copy=false", f"model.finetune={finetune}"])
    with pytest.raises(ConfigError, match=r"model\.quantization=nf4"):
        compose(["algo=ppo", "trainer.strategy=fsdp2", "cluster.num_replicas=2", "model.quantization=nf4"])
    for strategy in ("fsdp2", "ddp"):  # full fine-tuning: the rollout copy (the default) generates
        for algo in ("grpo", "ppo"):
            cfg, _ = compose([f"algo={algo}", "model=stories260k", f"trainer.strategy={strategy}", "cluster.num_replicas=2"])
            assert cfg.model.finetune == "full" and cfg.rollout.merged_copy
    # one replica and vLLM need no copy: nothing refused
    compose(["algo=grpo", "cluster.num_replicas=1", "rollout.merged_copy=false", "model=stories260k"])
    compose(["algo=grpo", "trainer.strategy=fsdp2", "cluster.num_replicas=2", "rollout=vllm", "rollout.merged_copy=false"])
