"""One shared base model for actor, reference, critic and reward.

A single Hugging Face causal LM carries one peft LoRA adapter per trainable role (Hu et al.,
"LoRA", https://arxiv.org/abs/2106.09685); the critic adds a value head and the reward role a
score head (linear layers on the last hidden state); the reference is the same base with every
adapter disabled. OpenRLHF and veRL hold two to four copies of the weights for these roles;
here the base is held once, and each role trains only its adapter and head.

    model = MultiHeadModel(load_causal_lm(path), {"actor": RoleConfig(r=16), "critic": RoleConfig()})
    logp = model.log_probs(ids, mask, role="actor")           # (B, T-1)
    ref = model.log_probs(ids, mask, role="reference")        # adapters off
    actor_opt = torch.optim.AdamW(model.trainable_parameters("actor"))

Switching roles is state on the shared base (peft's active adapter), set by every verb before
its forward. A graph already built keeps the weights it used, so a role's loss may be built,
other roles run, and then `backward` called. Activation checkpointing
(align/models/checkpointing.py) replays each layer under the adapter it first ran with, not the
one active at backward time; Hugging Face's own gradient checkpointing would not, and is not used.
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from torch import nn

from align.models.roles import (
    _LORA_SEGMENTS,
    HEAD_FILES,
    HEADS,
    REFERENCE,
    ROLES,
    RoleModel,
    check_role,
    load_head,
    make_head,
    save_head,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class RoleConfig:
    """LoRA settings of one role.

    r: adapter rank. alpha: scale numerator (the update is alpha / r * B @ A). dropout: on the
    adapter's input, in training mode only. target_modules: module names to adapt, or
    "all-linear" (every linear layer but the LM head). enabled: False leaves the role out.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = "all-linear"
    enabled: bool = True

    def __post_init__(self):
        if self.r <= 0 or self.alpha <= 0:
            raise ValueError(f"RoleConfig needs r > 0 and alpha > 0, got r={self.r}, alpha={self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"RoleConfig.dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))

    def lora_config(self):
        from peft import LoraConfig

        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=targets,
            bias="none",
            task_type="CAUSAL_LM",
        )


DEFAULT_ROLES = {role: RoleConfig() for role in ROLES}


def save_lora_adapter(peft_model, adapter: str, out_dir: str) -> None:
    """Write one adapter as a peft folder (`PeftModel.from_pretrained(base, out_dir)` and vLLM's
    `LoRARequest` read it): adapter_config.json and adapter_model.safetensors at the top level."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    config = copy.deepcopy(peft_model.peft_config[adapter])
    config.inference_mode = True
    config.save_pretrained(out_dir)
    sd = get_peft_model_state_dict(peft_model, adapter_name=adapter)
    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, os.path.join(out_dir, ADAPTER_WEIGHTS),
              metadata={"format": "pt"})


def load_lora_adapter(peft_model, adapter: str, in_dir: str) -> None:
    """Copy a saved adapter into the live adapter `adapter` in place (optimizers stay valid).

    The saved adapter must have this adapter's tensors (same rank and targets) and scaling;
    anything else is an error naming both, not a silent partial load.
    """
    from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    saved_config = LoraConfig.from_pretrained(in_dir)
    live_config = peft_model.peft_config[adapter]
    saved = load_file(os.path.join(in_dir, ADAPTER_WEIGHTS))
    live = get_peft_model_state_dict(peft_model, adapter_name=adapter)
    same_shapes = saved.keys() == live.keys() and all(saved[k].shape == live[k].shape for k in saved)
    same_scale = (saved_config.lora_alpha, saved_config.use_rslora) == (live_config.lora_alpha, live_config.use_rslora)
    if not (same_shapes and same_scale):
        raise ValueError(
            f"adapter in {in_dir} (r={saved_config.r}, alpha={saved_config.lora_alpha}, "
            f"targets={sorted(saved_config.target_modules or [])}) does not fit role {adapter!r} "
            f"(r={live_config.r}, alpha={live_config.lora_alpha}, targets={sorted(live_config.target_modules or [])}); "
            "build the model with a RoleConfig matching the saved adapter"
        )
    device = next(iter(live.values())).device
    set_peft_model_state_dict(peft_model, {k: v.to(device) for k, v in saved.items()}, adapter_name=adapter)


def _is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


class MultiHeadModel(RoleModel):
    """One causal-LM base, a LoRA adapter per role, a value and a score head; reference = adapters off.

    base: a Hugging Face causal LM (taken over: peft injects LoRA layers into it in place; a 4-bit
    base from `load_causal_lm(..., quantization="nf4")` gives QLoRA). roles: role name -> RoleConfig
    for any of actor, critic, reward (default: all three, rank 8, all linear layers).
    pad_token_id: written into an exported reward model (default: the base config's).
    """

    is_lora = True
    # The first mode is the default. On CPU one pass per role measured as fast or faster than
    # one mixed-adapter pass from 1.5M to 50M parameters (scripts/bench_multirole.py); mixed won
    # only on a 160K-parameter toy, where per-call overhead dominates.
    multi_role_modes = ("separate", "mixed")

    def __init__(self, base: nn.Module, roles: Mapping[str, RoleConfig] | None = None, *, pad_token_id: int | None = None):
        super().__init__()
        from peft import get_peft_model, prepare_model_for_kbit_training

        roles = dict(DEFAULT_ROLES if roles is None else roles)
        for name in roles:
            check_role(name, ROLES)
        enabled = {name: cfg for name, cfg in roles.items() if cfg.enabled}
        if not enabled:
            raise ValueError(f"MultiHeadModel needs at least one enabled role of {list(ROLES)}")
        self.role_configs = enabled
        self.roles = tuple(r for r in ROLES if r in enabled)

        if _is_quantized(base):  # QLoRA: layer norms to fp32, base frozen; not HF's checkpointing (see module doc)
            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        base.requires_grad_(False)
        first, *rest = self.roles
        self.peft = get_peft_model(base, enabled[first].lora_config(), adapter_name=first)
        for role in rest:
            self.peft.add_adapter(role, enabled[role].lora_config())

        hidden = base.config.get_text_config().hidden_size
        device = base.get_input_embeddings().weight.device
        self.value_head = make_head(hidden, bias=True, device=device) if "critic" in enabled else None
        self.score_head = make_head(hidden, bias=False, device=device) if "reward" in enabled else None
        self.pad_token_id = pad_token_id if pad_token_id is not None else base.config.pad_token_id

        # Each role's adapter parameters by name: looked up when needed, since sharding (FSDP2)
        # replaces the parameter objects.
        self._adapter_names: dict[str, list[str]] = {role: [] for role in self.roles}
        for name, _ in self.peft.named_parameters():
            parts = name.split(".")
            for i, part in enumerate(parts[:-1]):
                if part in _LORA_SEGMENTS:
                    self._adapter_names[parts[i + 1]].append(name)
                    break
        self._set_active(first)
        self.train(base.training)  # peft's wrappers start in training mode; follow the base

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        roles: Mapping[str, RoleConfig] | None = None,
        *,
        dtype: str | torch.dtype = "float32",
        device: str = "cpu",
        quantization: str | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ) -> "MultiHeadModel":
        """Load the base (optionally in 4-bit NF4: QLoRA) and build the roles on it."""
        from align.models.loading import load_causal_lm

        base = load_causal_lm(path, dtype=dtype, device=device, quantization=quantization, **kwargs)
        return cls(base, roles, pad_token_id=pad_token_id)

    # ---- role switching ------------------------------------------------------------------
    def _restore_trainable(self) -> None:
        # peft marks only the active adapter trainable, and none while adapters are disabled;
        # every role keeps its own optimizer, so all adapters stay trainable (an inactive one
        # simply receives no gradient).
        for params in self._adapter_params().values():
            for p in params:
                p.requires_grad_(True)

    def _adapter_params(self) -> dict[str, list[nn.Parameter]]:
        named = dict(self.peft.named_parameters())
        return {role: [named[n] for n in names] for role, names in self._adapter_names.items()}

    def _set_active(self, role: str) -> None:
        if self.peft.active_adapter != role:
            self.peft.set_adapter(role)
        self._restore_trainable()

    @contextmanager
    def _activate(self, role: str) -> Iterator[None]:
        if role == REFERENCE:
            try:
                with self.peft.disable_adapter():
                    yield
            finally:
                self._restore_trainable()
        else:
            self._set_active(role)
            yield

    def _causal_lm(self, role: str) -> nn.Module:
        return self.peft.get_base_model()

    def _generator(self, role: str) -> nn.Module:
        return self.peft

    def _adapter_name(self, role: str) -> str | None:
        return None if role == REFERENCE else role

    def _fused_hidden(self, mode, roles, input_ids, attention_mask) -> dict[str, torch.Tensor]:
        return self._mixed_hidden(roles, input_ids, attention_mask)

    def _mixed_hidden(self, roles, input_ids, attention_mask) -> dict[str, torch.Tensor]:
        """One backbone pass over the batch repeated per role, each copy under its own adapter.

        peft's mixed-adapter batches: LoRA layers add each adapter's update to its rows only,
        "__base__" rows get none. It is inference-only (peft refuses it in training mode).
        """
        B = input_ids.shape[0]
        names = [("__base__" if role == REFERENCE else role) for role in roles for _ in range(B)]
        ids = input_ids.repeat(len(roles), 1)  # (K*B, T)
        mask = attention_mask.repeat(len(roles), 1)
        # The LoRA model's own hook context (what PeftModel.forward uses for `adapter_names`),
        # entered directly so the backbone runs without the LM head.
        with self.peft.base_model._enable_peft_forward_hooks(adapter_names=names):
            hidden = self._backbone(roles[0], ids, mask, packed=False)  # (K*B, T, H): adapters per row, so unpacked
        return dict(zip(roles, hidden.split(B)))

    # ---- parameters, sync, save ----------------------------------------------------------
    def trainable_parameters(self, role: str) -> list[nn.Parameter]:
        """The parameters `role`'s optimizer owns: its adapter, plus its head (critic, reward)."""
        check_role(role, self.roles)
        params = list(self._adapter_params()[role])
        if role in HEADS:
            params += list(getattr(self, HEADS[role]).parameters())
        return params

    def adapter_state_dict(self, role: str = "actor") -> dict[str, torch.Tensor]:
        """`role`'s LoRA tensors in peft's saved key format (what a rollout engine loads), detached copies."""
        from peft import get_peft_model_state_dict

        check_role(role, self.roles)
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.peft, adapter_name=role).items()}

    def sync_state_dict(self, role: str = "actor") -> dict[str, torch.Tensor]:
        """What the rollout engine needs to follow `role`: with LoRA, the adapter tensors only."""
        return self.adapter_state_dict(role)

    def save_role(self, role: str, out_dir: str) -> None:
        """`role`'s adapter as a peft folder, plus its head file (value_head / score_head.safetensors)."""
        check_role(role, self.roles)
        save_lora_adapter(self.peft, role, out_dir)
        if role in HEADS:
            save_head(getattr(self, HEADS[role]), os.path.join(out_dir, HEAD_FILES[role]))

    def load_role(self, role: str, in_dir: str) -> None:
        """Load what `save_role` wrote, in place."""
        check_role(role, self.roles)
        load_lora_adapter(self.peft, role, in_dir)
        if role in HEADS:
            load_head(getattr(self, HEADS[role]), os.path.join(in_dir, HEAD_FILES[role]))
