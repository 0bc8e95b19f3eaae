"""One model per role behind the `RoleModel` verbs: full fine-tuning, or LoRA on per-role copies.

The layout OpenRLHF and veRL use: the actor, critic and reward each hold their own weights and
the reference is a frozen copy. It serves the same verbs as `MultiHeadModel`, so a trainer
switches between the two with a config flag; use it for full fine-tuning or for a reward model
of another size or family.
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from align.models.roles import (
    HEAD_FILES,
    HEADS,
    REFERENCE,
    ROLES,
    RoleModel,
    check_role,
    load_head,
    make_head,
    merged_state_dict,
    save_head,
)


def _is_peft(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


class SeparateModels(RoleModel):
    """A causal LM per trainable role (plain, or a peft LoRA model over its own copy) and a frozen reference.

    models: role -> model for any of actor, critic, reward (the critic and reward use only the
    backbone and their head). reference: the frozen reference policy, or None for none.
    """

    multi_role_modes = ("separate",)

    def __init__(
        self,
        models: Mapping[str, nn.Module],
        reference: nn.Module | None = None,
        *,
        pad_token_id: int | None = None,
    ):
        super().__init__()
        for role in models:
            check_role(role, ROLES)
        if not models:
            raise ValueError(f"SeparateModels needs at least one model for {list(ROLES)}")
        self.roles = tuple(r for r in ROLES if r in models)
        self.models = nn.ModuleDict({r: models[r] for r in self.roles})
        self.reference = reference
        if reference is not None:
            reference.requires_grad_(False)
            reference.eval()
        self.is_lora = all(_is_peft(m) for m in models.values())
        self.value_head = self._new_head("critic", bias=True) if "critic" in self.roles else None
        self.score_head = self._new_head("reward", bias=False) if "reward" in self.roles else None
        self.pad_token_id = pad_token_id if pad_token_id is not None else self._causal_lm(self.roles[0]).config.pad_token_id

    def train(self, mode: bool = True) -> "SeparateModels":
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()  # the reference is a fixed distribution: never dropout
        return self

    def _new_head(self, role: str, *, bias: bool) -> nn.Linear:
        lm = self._causal_lm(role)
        hidden = lm.config.get_text_config().hidden_size
        return make_head(hidden, bias=bias, device=lm.get_input_embeddings().weight.device)

    @classmethod
    def from_base(
        cls,
        base: nn.Module,
        roles: Sequence[str] = ROLES,
        *,
        lora=None,
        pad_token_id: int | None = None,
    ) -> "SeparateModels":
        """Copies of `base`, one per role; `base` itself becomes the frozen reference.

        lora: a `RoleConfig` to wrap every copy in a LoRA adapter (OpenRLHF's LoRA layout: the
        base is still held once per role), or None for full fine-tuning.
        """
        from peft import get_peft_model

        models = {}
        for role in roles:
            check_role(role, ROLES)
            model = copy.deepcopy(base)
            if lora is None:
                model.requires_grad_(True)
            else:
                model.requires_grad_(False)
                model = get_peft_model(model, lora.lora_config(), adapter_name=role)
            models[role] = model
        base.requires_grad_(False)
        return cls(models, base, pad_token_id=pad_token_id)

    @property
    def served_roles(self) -> tuple[str, ...]:
        return (*self.roles, REFERENCE) if self.reference is not None else self.roles

    # ---- hooks ---------------------------------------------------------------------------
    def _model(self, role: str) -> nn.Module:
        check_role(role, self.served_roles)
        return self.reference if role == REFERENCE else self.models[role]

    def _causal_lm(self, role: str) -> nn.Module:
        model = self._model(role)
        return model.get_base_model() if _is_peft(model) else model

    @contextmanager
    def _activate(self, role: str) -> Iterator[None]:
        yield  # every role has its own weights: nothing to switch

    def _generator(self, role: str) -> nn.Module:
        return self._model(role)

    def _adapter_name(self, role: str) -> str | None:
        return role if role != REFERENCE and _is_peft(self.models[role]) else None

    # ---- parameters, sync, save ----------------------------------------------------------
    def trainable_parameters(self, role: str) -> list[nn.Parameter]:
        """`role`'s own trainable weights (all of them, or its adapter), plus its head."""
        check_role(role, self.roles)
        params = [p for p in self.models[role].parameters() if p.requires_grad]
        if role in HEADS:
            params += list(getattr(self, HEADS[role]).parameters())
        return params

    def sync_state_dict(self, role: str = "actor") -> dict[str, torch.Tensor]:
        """What a rollout engine needs to follow `role`: the adapter tensors with LoRA, else the
        full state dict under plain Hugging Face names (views of the live weights)."""
        check_role(role, self.roles)
        model = self.models[role]
        if _is_peft(model):
            from peft import get_peft_model_state_dict

            return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=role).items()}
        return {k: v.detach() for k, v in merged_state_dict(model, None).items()}

    def save_role(self, role: str, out_dir: str) -> None:
        """A peft folder (LoRA) or a Hugging Face model folder (full), plus the role's head file."""
        from align.models.multihead import save_lora_adapter

        check_role(role, self.roles)
        model = self.models[role]
        if _is_peft(model):
            save_lora_adapter(model, role, out_dir)
        else:
            model.save_pretrained(out_dir)
        if role in HEADS:
            save_head(getattr(self, HEADS[role]), os.path.join(out_dir, HEAD_FILES[role]))

    def load_role(self, role: str, in_dir: str) -> None:
        """Load what `save_role` wrote into the live tensors (optimizers stay valid)."""
        from align.models.multihead import load_lora_adapter

        check_role(role, self.roles)
        model = self.models[role]
        if _is_peft(model):
            load_lora_adapter(model, role, in_dir)
        else:
            dtype = next(model.parameters()).dtype
            loaded = type(model).from_pretrained(in_dir, dtype=dtype)
            model.load_state_dict(loaded.state_dict(), strict=True)
            del loaded
        if role in HEADS:
            load_head(getattr(self, HEADS[role]), os.path.join(in_dir, HEAD_FILES[role]))

