"""The Hydra configuration: composition, validation at start-up, messages that name the key."""

import subprocess
import sys

import pytest

from align.config import ConfigError, SFTConfig, TrainerConfig, compose


def test_default_composes_to_typed_frozen_config():
    cfg, raw = compose([])
    assert isinstance(cfg.algo, SFTConfig) and cfg.algo.name == "sft"
    assert isinstance(cfg.trainer, TrainerConfig)
    assert cfg.model.name_or_path.endswith("models/stories260K")
    # the algo's trainer defaults (configs/trainer/sft.yaml) won over the plain default
    assert cfg.trainer.max_steps == 120 != TrainerConfig().max_steps
    from dataclasses import FrozenInstanceError

    with pytest.raises(FrozenInstanceError):
        cfg.trainer.lr = 1.0  # frozen after start-up


def test_command_line_overrides_apply():
    cfg, _ = compose(["trainer.lr=0.01", "model=stories260k_lora", "model.lora.r=4", "trainer=default"])
    assert cfg.trainer.lr == 0.01
    assert cfg.model.finetune == "lora" and cfg.model.lora.r == 4
    assert cfg.trainer.max_steps == TrainerConfig().max_steps


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.lr_scheduler=cosin", "trainer.lr_scheduler"),
        ("trainer.batch_size=0", "trainer.batch_size"),
        ("data.overlong=chop", "data.overlong"),
        ("model.finetune=qlora", "model.finetune"),
        ("data.max_prompt_length=600", "data.max_prompt_length"),
    ],
)
def test_bad_value_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose([override])


@pytest.mark.parametrize("override, key", [("trainer.lrr=1", "lrr"), ("trainer.lr=abc", "trainer.lr")])
def test_unknown_key_or_wrong_type_fails_in_hydra(override, key):
    with pytest.raises(Exception, match=key):
        compose([override])


def test_cli_reports_bad_value_and_exits_nonzero(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "align", "trainer.lr_scheduler=cosin", f"output_dir={tmp_path}/run"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "trainer.lr_scheduler" in proc.stderr and "cosin" in proc.stderr


def test_cli_reports_unknown_key(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "align", "trainer.not_a_key=3", f"output_dir={tmp_path}/run"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "not_a_key" in proc.stderr


def test_importing_align_is_light():
    code = "import sys, align, align.config; bad = [m for m in ('ray', 'vllm', 'torch', 'transformers') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("algo", ["quantize", "pipeline", "eval"])
def test_replicas_refused_for_single_process_stages(algo):
    # These stages have no data parallelism; the key used to be ignored silently.
    with pytest.raises(ConfigError, match=rf"cluster\.num_replicas: algo={algo} runs in one process"):
        compose([f"algo={algo}", "cluster.num_replicas=2", "trainer.strategy=ddp"])
    assert compose([f"algo={algo}"])[0].cluster.num_replicas == 1


@pytest.mark.parametrize("algo", ["grpo", "ppo", "sft", "dpo", "kto", "rm"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_replicas_accepted_for_training_stages(algo, strategy):
    cfg = compose([f"algo={algo}", "cluster.num_replicas=2", f"trainer.strategy={strategy}"])[0]
    assert (cfg.cluster.num_replicas, cfg.trainer.strategy) == (2, strategy)


def test_replicas_need_a_data_parallel_strategy_and_an_even_share():
    with pytest.raises(ConfigError, match=r"trainer\.strategy=single holds one replica.*ddp.*fsdp2"):
        compose(["algo=sft", "cluster.num_replicas=2"])
    with pytest.raises(ConfigError, match=r"trainer\.strategy: 'zero3' is not one of"):
        compose(["algo=sft", "trainer.strategy=zero3"])
    with pytest.raises(ConfigError, match=r"trainer\.fsdp_shard_size=3: needs trainer\.strategy=fsdp2 and must divide"):
        compose(["algo=sft", "cluster.num_replicas=4", "trainer.strategy=fsdp2", "trainer.fsdp_shard_size=3"])
    with pytest.raises(ConfigError, match=r"trainer\.fsdp_shard_size=2: needs trainer\.strategy=fsdp2"):
        compose(["algo=sft", "cluster.num_replicas=4", "trainer.strategy=ddp", "trainer.fsdp_shard_size=2"])
    assert compose(["algo=sft", "cluster.num_replicas=4", "trainer.strategy=fsdp2",
                    "trainer.fsdp_shard_size=2"])[0].trainer.fsdp_shard_size == 2
    with pytest.raises(ConfigError, match=r"trainer\.batch_size=3 must be a multiple of cluster\.num_replicas=2"):
        compose(["algo=sft", "cluster.num_replicas=2", "trainer.strategy=fsdp2", "trainer.batch_size=3"])
