"""A reward model with a base of its own: any Hugging Face sequence classifier with one output.

The reward role of the shared model (`MultiHeadModel`) is an adapter and a score head on the
policy's base, so it reads the policy's tokens directly. A reward model of another size, another
architecture or another tokenizer (an `export_reward_model` folder of a larger base, a hub reward
model such as a Skywork or ArmoRM classifier) cannot: `SequenceScorer` loads it as
`AutoModelForSequenceClassification` and scores each (prompt, response) pair from text, rendered
the way such reward models are trained (TRL's RewardTrainer, OpenRLHF, veRL):

- the prompt as chat messages (what the data gave) or text, the response as the assistant turn,
  through the reward model's own chat template when its tokenizer has one;
- otherwise prompt text + response text;
- tokenized by the reward model's tokenizer, cut from the left to its context (the response,
  at the end, is what is scored), right-padded; the score is the classifier's one logit, pooled
  by the model itself (the last non-pad token, as in training).

`reward_model_kind(path)` tells the two kinds of `reward.model_path` apart.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from align.models.roles import HEAD_FILES


def reward_model_kind(path: str) -> str:
    """`role`: a folder written by `save_role("reward", ...)` (it holds the score head file), an
    adapter or weights for the policy's own base. `classifier`: anything else, a Hugging Face
    sequence-classification folder or hub id, loaded by `SequenceScorer`."""
    return "role" if os.path.isfile(os.path.join(path, HEAD_FILES["reward"])) else "classifier"


class SequenceScorer:
    """Scores (prompt, response) pairs with a sequence classifier of its own base and tokenizer.

    path:        a folder or hub id of an `AutoModelForSequenceClassification` with num_labels 1.
    dtype, device, trust_remote_code: as for the policy (`model.*`).
    batch_size:  pairs per forward.
    """

    def __init__(self, path: str, *, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False,
                 batch_size: int = 16):
        from transformers import AutoModelForSequenceClassification

        from align.models.loading import ensure_pad_token, load_tokenizer, resolve_device, resolve_dtype

        self.path = path
        self.device = resolve_device(device)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code).to(self.device).eval()
        self.model.requires_grad_(False)
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward.model_path {path!r}: a reward model has one output (num_labels=1); this "
                             f"classifier has {self.model.config.num_labels}")
        self.tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        pad = self.model.config.pad_token_id
        if pad is not None:  # the pooling was trained with this pad id: the tokenizer pads with it too
            self.tokenizer.pad_token = self.tokenizer.convert_ids_to_tokens(int(pad))
        else:
            ensure_pad_token(self.tokenizer, self.model)
        self.tokenizer.truncation_side = "left"
        context = getattr(self.model.config, "max_position_embeddings", None)
        self.max_length = min(context or 10**9, self.tokenizer.model_max_length or 10**9)
        self.batch_size = batch_size

    def render(self, prompt: str | Sequence[dict], response: str) -> str:
        """The text the reward model reads for one pair (see the module docstring)."""
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            return self.tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                                      tokenize=False)
        if not isinstance(prompt, str):
            raise ValueError(f"reward.model_path {self.path!r}: chat prompts need a tokenizer with a chat template")
        return prompt + response

    def score_batch(self, batch, policy_tokenizer) -> torch.Tensor:
        """(B,) scores of an `Experience`'s responses: its `prompts` as the data gave them, or,
        when the rows carry none, its prompt tokens decoded by the policy's tokenizer."""
        prompts = batch.prompts or [
            policy_tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)
            for ids, mask in zip(batch.prompt_ids, batch.prompt_mask)
        ]
        return self.score(prompts, batch.response_text)

    @torch.no_grad()
    def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> torch.Tensor:
        """(B,) float32 scores of `responses[i]` to `prompts[i]` (text or chat messages)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        texts = [self.render(p, r) for p, r in zip(prompts, responses)]
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i : i + self.batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, add_special_tokens=not getattr(self.tokenizer, "chat_template", None),
                                 return_tensors="pt").to(self.device)
            out.append(self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, 0].float().cpu())
        return torch.cat(out) if out else torch.zeros(0)
