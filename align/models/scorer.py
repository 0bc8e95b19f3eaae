"""A reward model with a base of its own: any Hugging Face sequence classifier with one output.

The reward role of the shared model (`MultiHeadModel`) is an adapter and a score head on the
policy's base, so it reads the policy's tokens directly. A reward model of another size, another
architecture or another tokenizer (an `export_reward_model` folder of a larger base, a hub reward
model such as a Skywork or ArmoRM classifier) cannot: `SequenceScorer` loads it as
`AutoModelForSequenceClassification` and scores each (prompt, response) pair from text, rendered
the way such reward models are trained (TRL's RewardTrainer, OpenRLHF, veRL):

- a prompt given as chat messages: the messages plus the response as the assistant turn, through
  the reward model's own chat template (TRL's rule for conversational data);
- a prompt given as text: prompt + response, then the reward model's EOS when the response ended
  on its own (finish reason "stop"), as reward models are trained on complete texts (our RM job
  and TRL's append EOS); BOS as its tokenizer adds it;
- tokenized by the reward model's tokenizer, cut from the left to its context (BOS kept; the
  response, at the end, is what is scored), right-padded; the score is the classifier's one
  logit, pooled by the model itself (the last non-pad token, as in training).

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
        pad_token = self.tokenizer.convert_ids_to_tokens(int(pad)) if pad is not None and pad >= 0 else None
        if pad_token is not None:  # the pooling was trained with this pad id: the tokenizer pads with it too
            self.tokenizer.pad_token = pad_token
        else:
            ensure_pad_token(self.tokenizer, self.model)
        context = getattr(self.model.config, "max_position_embeddings", None)
        self.max_length = min(context or 10**9, self.tokenizer.model_max_length or 10**9)
        self.batch_size = batch_size

    def render(self, prompt: str | Sequence[dict], response: str, ended: bool = True) -> str:
        """The text the reward model reads for one pair (see the module docstring). ended: the
        response finished on its own (EOS follows a text pair)."""
        if isinstance(prompt, str):
            return prompt + response + (self.tokenizer.eos_token or "" if ended else "")
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"reward.model_path {self.path!r}: chat prompts need a tokenizer with a chat template")
        return self.tokenizer.apply_chat_template(list(prompt) + [{"role": "assistant", "content": response}],
                                                  tokenize=False)

    def score_batch(self, batch, policy_tokenizer) -> torch.Tensor:
        """(B,) scores of an `Experience`'s responses: its `prompts` as the data gave them, or,
        when the rows carry none, its prompt tokens decoded by the policy's tokenizer."""
        prompts = batch.prompts or [
            policy_tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)
            for ids, mask in zip(batch.prompt_ids, batch.prompt_mask)
        ]
        ended = [r == "stop" for r in batch.finish_reason] if batch.finish_reason else None
        return self.score(prompts, batch.response_text, ended)

    @torch.no_grad()
    def score(self, prompts: Sequence[Any], responses: Sequence[str], ended: Sequence[bool] | None = None) -> torch.Tensor:
        """(B,) float32 scores of `responses[i]` to `prompts[i]` (text or chat messages); ended[i]:
        whether response i finished on its own (default: all did)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        ended = [True] * len(prompts) if ended is None else list(ended)
        ids = [self._token_ids(self.render(p, r, e), chat=not isinstance(p, str))
               for p, r, e in zip(prompts, responses, ended)]
        out = []
        for i in range(0, len(ids), self.batch_size):
            enc = self.tokenizer.pad({"input_ids": ids[i : i + self.batch_size]}, padding=True, return_tensors="pt")
            enc = enc.to(self.device)
            out.append(self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, 0].float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def _token_ids(self, text: str, chat: bool) -> list[int]:
        """`text`'s ids (a chat template writes its own BOS; plain text gets the tokenizer's), cut
        from the left to the context, the leading BOS kept."""
        ids = self.tokenizer(text, add_special_tokens=not chat).input_ids
        if len(ids) <= self.max_length:
            return ids
        bos = self.tokenizer.bos_token_id
        if bos is not None and ids[0] == bos:
            return [bos] + ids[len(ids) - self.max_length + 1 :]
        return ids[len(ids) - self.max_length :]
