"""`Experience`: the one batch type that crosses between the driver and the workers.

A row is one sampled response to one prompt. Prompts are left-padded and responses
right-padded, so every row's prompt ends and its response starts at the same column P:

    input_ids = [pad pad p0 p1 p2 | r0 r1 r2 pad]      (B, P + R)
                 <----- P ------>   <---- R ---->

The model's next-token outputs at columns P-1 .. P+R-2 score the response tokens, so every
per-token field below is (B, R) and aligned with `response_ids` (see `response_slice`). A
field that a phase has not filled yet is None. Experiences cross Ray by value (Ray serialises
the tensors); nothing here imports Ray.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import torch
from torch import Tensor

# Fields padded on the left (prompt side) and on the right (response side) when rows of
# different widths are concatenated; every other tensor field is per row, (B,).
_PROMPT_FIELDS = ("prompt_ids", "prompt_mask")
_RESPONSE_FIELDS = (
    "response_ids", "response_mask", "response_attention", "rollout_logp", "old_logp", "ref_logp", "values",
    "token_rewards", "advantages", "returns", "token_versions",
)


@dataclass
class Experience:
    """Rollouts and everything computed from them, one row per sampled response.

    prompt_ids:    (B, P) int64 prompt tokens, left-padded.
    prompt_mask:   (B, P) int64, 1 on real prompt tokens.
    response_ids:  (B, R) int64 response tokens, right-padded.
    response_mask: (B, R) bool, True on the response tokens the policy generated (the stop token
                   included): the tokens that log-probs, KL, advantages and losses apply to.
    response_attention: (B, R) bool, True on every real response token: the model's and, in a
                   multi-turn episode (rollout/multiturn.py), the environment's (tool results,
                   observations), which the model attends to but is not trained on. None: the
                   same as response_mask (single-turn rollouts).
    group_ids:     (B,) int64, the prompt each row answers (rows of one prompt share an id).
    rollout_logp:  (B, R) float32, the rollout engine's log-probs of the response tokens,
                   under the distribution it sampled from (logits / temperature: rollout.base).
    old_logp:      (B, R) log-probs under the policy before this iteration's updates (None:
                   not recomputed; on-policy updates use the live log-probs, detached).
    ref_logp:      (B, R) log-probs under the reference policy.
    values:        (B, R) critic values V(s_t) of the state before each response token.
    scores:        (B,) sequence scores: rule rewards + the reward model's weighted score.
    rm_scores:     (B,) reward-model scores alone.
    token_rewards: (B, R) per-token rewards (PPO: KL-shaped, score at the last token).
    advantages:    (B, R) per-token advantages.
    returns:       (B, R) value targets (PPO).
    episodes:      per row, a multi-turn episode's summary {"reward", "turns", info sums...}
                   (empty for single-turn rollouts).
    response_text: the decoded responses, one per row.
    finish_reason: "stop" or "length", one per row.
    policy_version: (B,) int64, the policy version (optimizer iterations published to the engine)
                   that generated the row; set by a rollout-group worker (rollout.mode=async).
                   With partial rollouts, the version of its first token (the oldest).
    token_versions: (B, R) int64, with rollout.partial_rollouts the policy version each response
                   token was sampled under (non-decreasing along a row; 0 on padding).
    prompts:       each row's prompt as the data gave it (text, or chat messages), for a reward
                   model with a tokenizer of its own (`align.models.scorer`); set by the driver.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    group_ids: Tensor
    rollout_logp: Tensor | None = None
    old_logp: Tensor | None = None
    ref_logp: Tensor | None = None
    values: Tensor | None = None
    scores: Tensor | None = None
    rm_scores: Tensor | None = None
    token_rewards: Tensor | None = None
    advantages: Tensor | None = None
    returns: Tensor | None = None
    response_attention: Tensor | None = None
    policy_version: Tensor | None = None
    token_versions: Tensor | None = None
    episodes: list = field(default_factory=list)
    response_text: list[str] = field(default_factory=list)
    finish_reason: list[str] = field(default_factory=list)
    prompts: list = field(default_factory=list)

    # ---- shape helpers ---------------------------------------------------------------------
    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def prompt_width(self) -> int:
        return self.prompt_ids.shape[1]

    @property
    def input_ids(self) -> Tensor:
        """(B, P + R) prompt then response tokens."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def response_attention_mask(self) -> Tensor:
        """(B, R), True on every real response token (environment tokens included)."""
        return self.response_mask if self.response_attention is None else self.response_attention

    @property
    def attention_mask(self) -> Tensor:
        """(B, P + R), 1 on real tokens."""
        return torch.cat([self.prompt_mask.long(), self.response_attention_mask.long()], dim=1)

    @property
    def response_slice(self) -> slice:
        """Columns of a (B, P + R - 1) next-token output (log-probs) or of a (B, P + R) per-prefix
        output (values) that belong to the response tokens."""
        P, R = self.prompt_width, self.response_ids.shape[1]
        return slice(P - 1, P - 1 + R)

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum())

    @property
    def response_lengths(self) -> Tensor:
        """(B,) number of response tokens per row (environment tokens included)."""
        return self.response_attention_mask.sum(-1)

    def replace(self, **changes: Any) -> "Experience":
        """A shallow copy with some fields replaced (the tensors are shared, not copied)."""
        return dataclasses.replace(self, **changes)

    # ---- selecting and splitting ---------------------------------------------------------------
    def select(self, index: Sequence[int] | Tensor) -> "Experience":
        """The rows `index` (a list or 1-D tensor of row numbers), in that order."""
        idx = torch.as_tensor(index, dtype=torch.long)
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                out[f.name] = value.index_select(0, idx.to(value.device))
            elif isinstance(value, list):
                out[f.name] = [value[i] for i in idx.tolist()] if value else []
            else:
                out[f.name] = value
        return Experience(**out)

    def split(self, size: int) -> list["Experience"]:
        """Consecutive pieces of `size` rows (the last one may be shorter)."""
        if size < 1:
            raise ValueError(f"split size must be >= 1, got {size}")
        return [self.select(range(i, min(i + size, len(self)))) for i in range(0, len(self), size)]

    def chunk(self, n: int) -> list["Experience"]:
        """`n` consecutive shards of near-equal size (the first len % n get one extra row); a
        shard may be empty when there are fewer rows than shards."""
        return [self.select(range(a, b)) for a, b in shard_bounds(len(self), n)]

    def trim(self) -> "Experience":
        """Drop prompt columns that are padding in every row (left) and response columns that are
        padding in every row (right): fewer positions to run, identical results on real tokens."""
        if len(self) == 0:
            return self
        real_p = self.prompt_mask.bool().any(0).nonzero()
        real_r = self.response_attention_mask.any(0).nonzero()
        p0 = int(real_p[0]) if real_p.numel() else self.prompt_width - 1
        r1 = int(real_r[-1]) + 1 if real_r.numel() else 1
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor) and f.name in _PROMPT_FIELDS:
                value = value[:, p0:]
            elif isinstance(value, Tensor) and f.name in _RESPONSE_FIELDS:
                value = value[:, :r1]
            out[f.name] = value
        return Experience(**out)

    @staticmethod
    def concat(parts: Sequence["Experience"]) -> "Experience":
        """Rows of all `parts` in order; prompts are left-padded and responses right-padded to the
        widest part, with zeros (masks say what is real). A field must be set in all parts or none."""
        parts = [p for p in parts if len(p)] or list(parts[:1])
        if not parts:
            raise ValueError("Experience.concat needs at least one part")
        P = max(p.prompt_width for p in parts)
        R = max(p.response_ids.shape[1] for p in parts)
        out = {}
        for f in fields(Experience):
            values = [getattr(p, f.name) for p in parts]
            if all(v is None for v in values):
                out[f.name] = None
            elif any(v is None for v in values):
                raise ValueError(f"Experience.concat: field {f.name!r} is set in some parts and not in others")
            elif isinstance(values[0], list):
                if any(v for v in values) and any(len(v) != len(p) for v, p in zip(values, parts)):
                    raise ValueError(f"Experience.concat: list field {f.name!r} is filled in some parts and not in others")
                out[f.name] = [x for v in values for x in v]
            elif f.name in _PROMPT_FIELDS:
                out[f.name] = torch.cat([_pad_to(v, P, left=True) for v in values])
            elif f.name in _RESPONSE_FIELDS:
                out[f.name] = torch.cat([_pad_to(v, R, left=False) for v in values])
            else:
                out[f.name] = torch.cat(values)
        return Experience(**out)

    def to(self, device: str | torch.device) -> "Experience":
        return self.replace(**{
            f.name: getattr(self, f.name).to(device)
            for f in fields(self) if isinstance(getattr(self, f.name), Tensor)
        })

    def minibatches(self, num: int, generator: torch.Generator | None = None) -> list["Experience"]:
        """`num` minibatches of near-equal size over a permutation of the rows (drawn from
        `generator`; in order when None)."""
        order = torch.randperm(len(self), generator=generator) if generator is not None else torch.arange(len(self))
        size = math.ceil(len(self) / num)
        return [self.select(order[i : i + size]) for i in range(0, len(self), size)]


def shard_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) of `parts` consecutive near-equal pieces of n items (the first n % parts get
    one more)."""
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def _pad_to(x: Tensor, width: int, *, left: bool) -> Tensor:
    missing = width - x.shape[1]
    if missing == 0:
        return x
    pad = x.new_zeros((x.shape[0], missing, *x.shape[2:]))
    return torch.cat([pad, x] if left else [x, pad], dim=1)


def from_rollout(prompts: Sequence[Sequence[int]], group_ids: Sequence[int], output) -> Experience:
    """An Experience from a `rollout.base.RolloutOutput` of `prompts` (token ids, no padding);
    `group_ids[i]` is the group of prompt i (its samples are rows i*n .. i*n + n - 1)."""
    samples = output.samples
    B = len(samples)
    P = max(len(p) for p in prompts)
    R = max(1, max((len(s.token_ids) for s in samples), default=1))
    prompt_ids = torch.zeros(B, P, dtype=torch.long)
    prompt_mask = torch.zeros(B, P, dtype=torch.long)
    response_ids = torch.zeros(B, R, dtype=torch.long)
    response_mask = torch.zeros(B, R, dtype=torch.bool)
    rollout_logp = torch.zeros(B, R, dtype=torch.float32)
    for row, s in enumerate(samples):
        p = prompts[s.prompt_index]
        prompt_ids[row, P - len(p):] = torch.tensor(p, dtype=torch.long)
        prompt_mask[row, P - len(p):] = 1
        n = len(s.token_ids)
        if n:
            response_ids[row, :n] = torch.tensor(s.token_ids, dtype=torch.long)
            response_mask[row, :n] = True
            rollout_logp[row, :n] = torch.tensor(s.logprobs, dtype=torch.float32)
    return Experience(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        group_ids=torch.tensor([group_ids[s.prompt_index] for s in samples], dtype=torch.long),
        rollout_logp=rollout_logp,
        response_text=[s.text for s in samples],
        finish_reason=[s.finish_reason for s in samples],
    )


def from_episodes(episodes: Sequence[Any]) -> Experience:
    """An Experience from multi-turn episodes (`rollout.multiturn.Episode`): the response side is
    the whole trajectory after the first prompt; `response_mask` marks the model's own tokens
    (loss mask), `response_attention` every token; `scores` the episodes' summed environment
    rewards; `episodes` their summaries (turns, tool calls...)."""
    B = len(episodes)
    P = max(len(e.prompt_ids) for e in episodes)
    R = max(1, max(len(e.ids) for e in episodes))
    prompt_ids = torch.zeros(B, P, dtype=torch.long)
    prompt_mask = torch.zeros(B, P, dtype=torch.long)
    response_ids = torch.zeros(B, R, dtype=torch.long)
    response_mask = torch.zeros(B, R, dtype=torch.bool)
    attention = torch.zeros(B, R, dtype=torch.bool)
    rollout_logp = torch.zeros(B, R, dtype=torch.float32)
    for row, e in enumerate(episodes):
        p, n = e.prompt_ids, len(e.ids)
        prompt_ids[row, P - len(p):] = torch.tensor(p, dtype=torch.long)
        prompt_mask[row, P - len(p):] = 1
        if n:
            response_ids[row, :n] = torch.tensor(e.ids, dtype=torch.long)
            response_mask[row, :n] = torch.tensor(e.mask, dtype=torch.bool)
            attention[row, :n] = True
            rollout_logp[row, :n] = torch.tensor(e.logprobs, dtype=torch.float32)
    return Experience(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids, response_mask=response_mask,
        group_ids=torch.tensor([e.group for e in episodes], dtype=torch.long), rollout_logp=rollout_logp,
        scores=torch.tensor([e.reward for e in episodes], dtype=torch.float32), response_attention=attention,
        episodes=[{"reward": e.reward, "turns": e.turns, **e.info} for e in episodes],
        response_text=["".join(e.turn_texts) for e in episodes], finish_reason=[e.finish_reason for e in episodes],
    )
