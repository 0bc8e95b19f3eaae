"""Multi-turn episodes (rollout/multiturn.py): token-in token-out trajectories, the loss mask,
the trainer's log-probs against the engine's, episode limits and batching across episodes."""

from __future__ import annotations

import pytest
import torch

from align.workers.batch import Experience, from_episodes
from rewards.envs import ENVS, Step
from rollout import HFEngine, SamplingParams
from rollout.base import RolloutOutput, RolloutSample
from rollout.multiturn import observation_ids, run_episodes

TEMPERATURE = 0.8


class ScriptedEngine:
    """Returns fixed token ids per call (with made-up log-probs) and records each call's batch."""

    def __init__(self, tokenizer, turns: list[list[int]], finish="stop"):
        self.turns, self.finish, self.calls = turns, finish, []
        self.eos_token_ids = [tokenizer.eos_token_id]
        self.tokenizer = tokenizer

    def generate(self, prompts, params):
        self.calls.append([list(p) for p in prompts])
        full = self.turns[min(len(self.calls) - 1, len(self.turns) - 1)]
        ids = full[: params.max_new_tokens]
        finish = "length" if len(ids) < len(full) else self.finish  # as an engine cut by max_new_tokens says
        return RolloutOutput([RolloutSample(i, list(ids), self.tokenizer.decode(ids, skip_special_tokens=True),
                                            [-0.5] * len(ids), finish) for i in range(len(prompts))])


@pytest.fixture
def counting_env():
    """Done at the turn count a row asks for ("stop_at"), reward = that count."""

    class Counting:
        tools: list = []

        def __init__(self, row, **_):
            self.stop_at, self.turns = row["stop_at"], 0

        def step(self, turn):
            self.turns += 1
            done = self.turns >= self.stop_at
            return Step("go on", float(self.turns) if done else 0.0, done)

    ENVS["test-counting"] = Counting
    yield "test-counting"
    del ENVS["test-counting"]


def _run(engine, tok, rows, env, **kw):
    defaults = dict(env_options={}, params=SamplingParams(n=1, temperature=1.0, max_new_tokens=16, seed=0),
                    max_turns=4, max_total_tokens=400, max_prompt_length=64)
    return run_episodes(engine, tok, rows, list(range(len(rows))), env_name=env, **{**defaults, **kw})


def test_generated_ids_are_kept_as_generated_and_environment_tokens_masked(stories, counting_env):
    """Ids whose decode/re-encode would differ (" story" spelled letter by letter, then eos) stay as they are."""
    _, tok = stories
    turn = [tok.convert_tokens_to_ids(t) for t in ["\u2581", "s", "t", "o", "r", "y"]] + [tok.eos_token_id]
    assert tok(tok.decode(turn[:-1]), add_special_tokens=False).input_ids != turn[:-1]  # would drift
    engine = ScriptedEngine(tok, [turn])
    (ep,) = _run(engine, tok, [{"prompt": "p", "stop_at": 2}], counting_env)
    obs = observation_ids(tok, "go on", [], tok.eos_token_id)
    assert ep.ids == turn + obs + turn and ep.mask == [1] * len(turn) + [0] * len(obs) + [1] * len(turn)
    assert ep.logprobs == [-0.5] * len(turn) + [0.0] * len(obs) + [-0.5] * len(turn)
    assert ep.reward == 2.0 and ep.turns == 2 and ep.finish_reason == "stop"
    # the second call's context is the first's plus the turn and the observation, token for token
    assert engine.calls[1][0] == engine.calls[0][0] + turn + obs
    # the template's render: the eos closes the turn, then the user turn and the generation prompt
    assert tok.decode(obs) == "<|user|>\ngo on\n<|assistant|>\n"


def test_finished_episodes_leave_the_batch(stories, counting_env):
    _, tok = stories
    engine = ScriptedEngine(tok, [tok("hi", add_special_tokens=False).input_ids + [tok.eos_token_id]])
    rows = [{"prompt": "p", "stop_at": k} for k in (1, 3, 2)]
    episodes = _run(engine, tok, rows, counting_env)
    assert [len(c) for c in engine.calls] == [3, 2, 1]  # turns interleave; a done episode drops out
    assert [e.turns for e in episodes] == [1, 3, 2] and [e.reward for e in episodes] == [1.0, 3.0, 2.0]


def test_max_turns_and_the_token_budget_end_episodes_cleanly(stories, counting_env):
    _, tok = stories
    turn = tok("hello there", add_special_tokens=False).input_ids + [tok.eos_token_id]
    (ep,) = _run(ScriptedEngine(tok, [turn]), tok, [{"prompt": "p", "stop_at": 99}], counting_env, max_turns=3)
    assert ep.turns == 3 and ep.done and ep.reward == 0.0 and ep.mask[-1] == 1  # ends on the model's turn
    obs = len(observation_ids(tok, "go on", [], tok.eos_token_id))
    budget = len(turn) + obs + 2  # the second reply is cut after 2 tokens
    (ep,) = _run(ScriptedEngine(tok, [turn]), tok, [{"prompt": "p", "stop_at": 99}], counting_env,
                 max_total_tokens=budget)
    assert len(ep.ids) == budget and ep.finish_reason == "length" and ep.mask[-2:] == [1, 1]
    # an observation that does not fit ends the episode without it
    (ep,) = _run(ScriptedEngine(tok, [turn]), tok, [{"prompt": "p", "stop_at": 99}], counting_env,
                 max_total_tokens=len(turn) + obs)
    assert ep.ids == turn and ep.finish_reason == "length"


def test_trainer_logprobs_of_a_multiturn_trajectory_equal_the_engines(stories):
    """HF engine, stories260K, guess_number over 3 turns: the trainer's one-pass log-probs over the
    whole trajectory (`response_log_probs` with environment tokens attended) equal the engine's
    per-turn log-probs on every model token (fp32, 1e-4), as single-turn rollouts do."""
    from align.models.multihead import MultiHeadModel, RoleConfig

    model, tok = stories
    rows = [{"prompt": "Guess my number.", "target": 3}, {"prompt": "Pick a number!", "target": 1}]
    params = SamplingParams(n=2, temperature=TEMPERATURE, max_new_tokens=10, seed=3)
    episodes = run_episodes(HFEngine(model, tok), tok, rows, [0, 1], env_name="guess_number",
                            env_options={"low": 1, "high": 3}, params=params, max_turns=3, max_total_tokens=160,
                            max_prompt_length=64)
    batch = from_episodes(episodes)
    assert (batch.response_attention & ~batch.response_mask).any()  # environment tokens are in there
    assert max(e.turns for e in episodes) >= 2
    policy = MultiHeadModel(model, {"actor": RoleConfig(r=2)}, pad_token_id=0).eval()
    with torch.no_grad():
        logp = policy.response_log_probs(batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                                         batch.response_attention_mask, temperature=TEMPERATURE)
    m = batch.response_mask
    assert float((logp[m] - batch.rollout_logp[m]).abs().max()) < 1e-4
    # without the environment tokens attended, the later turns would be scored out of context
    with torch.no_grad():
        wrong = policy.response_log_probs(batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask,
                                          temperature=TEMPERATURE)
    assert float((wrong[m] - batch.rollout_logp[m]).abs().max()) > 1e-2


def test_environment_tokens_receive_zero_gradient(stories):
    """The GRPO loss of a multi-turn batch: d loss / d logp is 0 on every environment token and
    not on the model's; through the model, changing nothing the loss reads on environment tokens."""
    from align.core import POLICY_LOSSES

    _, tok = stories
    R = 6
    attention = torch.ones(2, R, dtype=torch.bool)
    mask = torch.tensor([[1, 1, 0, 0, 1, 1], [1, 0, 0, 1, 1, 0]], dtype=torch.bool)
    attention[1, -1] = False
    logp = torch.randn(2, R, requires_grad=True)
    advantages = torch.tensor([[1.0], [-0.5]]) * mask
    loss, _ = POLICY_LOSSES.get("ppo")(logp, logp.detach(), advantages, mask, agg="token-mean",
                                       normaliser=float(mask.sum()))
    (grad,) = torch.autograd.grad(loss, logp)
    assert (grad[~mask] == 0).all() and (grad[mask] != 0).all()
    batch = Experience(prompt_ids=torch.ones(2, 1, dtype=torch.long), prompt_mask=torch.ones(2, 1, dtype=torch.long),
                       response_ids=torch.ones(2, R, dtype=torch.long), response_mask=mask,
                       group_ids=torch.zeros(2, dtype=torch.long), response_attention=attention)
    assert batch.attention_mask[:, 1:].tolist() == attention.long().tolist()
    assert batch.response_lengths.tolist() == [6, 5] and batch.trim().response_ids.shape[1] == R


def test_tool_schemas_reach_the_prompt_through_the_template(stories):
    from rollout.multiturn import prompt_ids

    _, tok = stories
    env_tools = [{"type": "function", "function": {"name": "calculator", "parameters": {}}}]
    text = tok.decode(prompt_ids(tok, "What is 2+2?", env_tools, 512))
    assert '"name": "calculator"' in text and text.rstrip().endswith("<|assistant|>")


# A ChatML template in the shape of Qwen2.5's: tool schemas in the system turn, tool results as
# <tool_response> blocks in a user turn, each turn closed by <|im_end|> and a newline.
CHATML = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %}\n{{ t | tojson }}{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_observation_tokens_under_a_chatml_template(stories):
    """The model stops on <|im_end|>: the environment adds the template's "\\n" after it, the tool
    result as the template renders it, and the next generation prompt; cut by length, the whole
    close ("<|im_end|>\\n") comes first."""
    import copy

    _, base = stories
    tok = copy.deepcopy(base)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    tools = [{"type": "function", "function": {"name": "calculator"}}]
    obs = [{"role": "tool", "name": "calculator", "content": "31"}]
    expected = "\n<|im_start|>user\n<tool_response>\n31\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(observation_ids(tok, obs, tools, im_end)) == expected
    assert tok.decode(observation_ids(tok, obs, tools, None)) == "<|im_end|>" + expected
    from rollout.multiturn import prompt_ids

    first = tok.decode(prompt_ids(tok, "What is 48/2+7?", tools, 512))
    assert first.startswith("<s><|im_start|>system\nTools:") and '"name": "calculator"' in first
    assert first.endswith("<|im_end|>\n<|im_start|>assistant\n")
