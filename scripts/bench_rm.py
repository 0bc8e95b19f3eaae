"""Reward-model learning on real preference data, on CPU, in a few minutes.

Trains a reward model with `python -m align algo=rm` (the real driver, in-process) on the
shipped HH-RLHF pairs (malformed rows skipped and counted) with a deterministic held-out split,
and prints one JSON object: held-out pairwise accuracy before and after, steps, wall and CPU
seconds, the model and the machine.

    python scripts/bench_rm.py                        # random tiny Llama + GPT-NeoX tokenizer, full
    python scripts/bench_rm.py --model stories260k    # the shipped stories260K, reward LoRA
    python scripts/bench_rm.py --subset all --steps 330   # the three HH subsets mixed
    python scripts/bench_rm.py --sft-steps 230        # in-domain SFT of the tiny model first (slow: see below)

Data: by default the helpful-base pairs (1,833 for training after the 512 held out, one pass).
Mixed with harmless-base, whose preferred answer is often the shorter refusal, the same small
model learns no single direction and stays at chance (measured: 0.436 -> 0.506 on 512 held-out
pairs after one pass over 5,277); a larger pretrained model is needed for the whole mix.

Models: `tiny-neox` is a randomly initialised 2-layer Llama (hidden 64) reading real English
through the shipped GPT-NeoX tokenizer, trained in full (its embeddings learn which words mark a
preferred answer); `stories260k` is the shipped pretrained model with a reward LoRA adapter
(the layout PPO loads), whose 512-token vocabulary spells HH dialogues out in small pieces.
Chance is 0.5; `chance_std` is the standard deviation of a coin's accuracy on the held-out pairs.
`--sft-steps N` first fine-tunes the tiny model with `algo=sft` on the training subset's
dialogues (chosen response as the target; the RM's held-out pairs excluded by the same split),
then trains the reward head on top. Its next-token loss runs the 50k-word GPT-NeoX head over
every response token: on our shared 2-core machines a 16 x 256 step took 30-50 s, so a useful
number of steps did not fit in a session (measured in issue 18's item 4 work).

Generalisation: the exported reward model is then evaluated with `algo=eval` on the first
`--test-size` pairs of `--test-subset` (default helpful-online, never trained on), tokenized as in
training; `test` reports its accuracy beside the "longer response wins" baseline on the same
pairs, overall and by response length. Run from the project root with PYTHONPATH=. (or an
installed align) so this checkout's code is the one imported.

`--probe` trains no network: it asks what the pairs themselves allow a reward model to carry
from one subset to another (issue 18's item 4). For each subset it prints, among the pairs whose
two responses differ in a surface feature (length, reuse of the last human turn's words,
repeated words, asking a question, apologising), the fraction whose chosen response has more
of it; and a linear Bradley-Terry reward over hashed word and word-pair presence (the model
class of a bag-of-words RM, with none of a tiny transformer's capacity limits), trained on
`--subset`'s training split and scored on every subset's first `--test-size` pairs (its own:
its held-out split). Measured (seed 0, about 20 s):

    chosen has more of it   length  overlap  repeats  question  apology
    helpful-base            0.598   0.585    0.582    0.390     0.398
    helpful-online          0.433   0.491    0.457    0.377     0.344
    harmless-base           0.442   0.439    0.447    0.495     0.720

    linear BT trained on -> helpful-base  helpful-online  harmless-base
    helpful-base             (0.598)      0.475           0.398
    helpful-online           0.547        (0.514)         0.486
    harmless-base            0.426        0.500           (0.623)

What marks helpful-base's preferred answer (longer, reusing the question's words, repeating
itself) points the other way in the other two subsets, and what the two helpful subsets share
(no question back, no apology) reverses in harmless-base; so a model with no prior knowledge of
English learns, from one subset, preferences that do not transfer (0.40-0.55 on the others,
never above both chance and the length baseline). Only a pretrained language model brings
one that does, and none is shipped here but stories260K.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

MODELS = ("tiny-neox", "stories260k")
SUBSETS = ("all", "harmless-base", "helpful-base", "helpful-online")


def build_tiny_neox(out: Path, *, hidden: int, layers: int, heads: int, seed: int) -> str:
    """A random tiny Llama with the shipped GPT-NeoX tokenizer (pad = its own <|padding|>,
    which never ends a real sequence, so the exported classifier pools where we do)."""
    from transformers import PreTrainedTokenizerFast

    from align.config import shared_data_dir
    from align.models.loading import build_tiny_llama

    tok = PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(shared_data_dir(), "tokenizers", "gpt-neox-20b", "tokenizer.json"),
        bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|padding|>",
    )
    model = build_tiny_llama(seed=seed, vocab_size=len(tok), hidden_size=hidden, num_layers=layers,
                             num_heads=heads, max_position_embeddings=2048, tie_word_embeddings=True)
    model.config.bos_token_id = model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def overrides(args, model_dir: str | None, out: Path) -> list[str]:
    from align.config import shared_data_dir

    pattern = "*" if args.subset == "all" else f"{args.subset}_test"
    hh_pairs = os.path.join(shared_data_dir(), "hh-rlhf", f"{pattern}.jsonl.gz")
    model = ([f"model.name_or_path={model_dir}", "model.finetune=full"] if args.model == "tiny-neox"
             else ["model=stories260k_lora"])
    return [
        "algo=rm", *model, "data=hh_pairs", f"data.source={hh_pairs}", "data.format=hh", "data.on_error=skip",
        f"data.val_size={args.val_size}", f"data.max_length={args.max_length}",
        f"data.max_prompt_length={args.max_length - args.max_response_length}",
        f"data.max_response_length={args.max_response_length}", f"trainer.max_steps={args.steps}",
        f"trainer.batch_size={args.batch_size}", f"trainer.lr={args.lr}", "trainer.warmup_steps=10",
        f"trainer.eval_batches={-(-args.val_size // args.batch_size)}", f"trainer.eval_every={args.eval_every or args.steps}",
        f"trainer.save_every={args.steps}", f"trainer.num_threads={args.threads}", "trainer.progress=false",
        "trainer.resume=never", f"seed={args.seed}", f"output_dir={out}", *args.set,
    ]


def sft_overrides(args, model_dir: str, out: Path) -> list[str]:
    """`algo=sft` of the tiny model on the training subset's dialogues (chosen response as the
    target), the same held-out split and windows as the RM run: in-domain language modelling
    before the reward head (the pipeline's sft -> rm order)."""
    from align.config import shared_data_dir

    pattern = "*" if args.subset == "all" else f"{args.subset}_test"
    return ["algo=sft", f"model.name_or_path={model_dir}", "model.finetune=full", "data=hh_sft",
            f"data.source={os.path.join(shared_data_dir(), 'hh-rlhf', f'{pattern}.jsonl.gz')}", "data.format=hh",
            "data.on_error=skip", f"data.val_size={args.val_size}", f"data.max_length={args.max_length}",
            f"data.max_prompt_length={args.max_length - args.max_response_length}",
            f"data.max_response_length={args.max_response_length}", f"trainer.max_steps={args.sft_steps}",
            f"trainer.batch_size={args.batch_size}", f"trainer.lr={args.sft_lr}", "trainer.warmup_steps=10",
            "trainer.eval_batches=4", f"trainer.eval_every={args.sft_steps}", f"trainer.save_every={args.sft_steps}",
            f"trainer.num_threads={args.threads}", "trainer.progress=false", "trainer.resume=never",
            f"seed={args.seed}", f"output_dir={out}"]


def eval_overrides(args, reward_model: str, out: Path) -> list[str]:
    """`algo=eval` of the exported reward model on --test-subset, tokenized as in training."""
    from align.config import shared_data_dir

    pairs = os.path.join(shared_data_dir(), "hh-rlhf", f"{args.test_subset}_test.jsonl.gz")
    return ["algo=eval", "data=hh_pairs", f"data.source={pairs}", "data.format=hh", "data.on_error=skip",
            f"data.limit={args.test_size}", f"data.max_length={args.max_length}",
            f"data.max_prompt_length={args.max_length - args.max_response_length}",
            f"data.max_response_length={args.max_response_length}", f"algo.model={reward_model}",
            "trainer.progress=false", f"trainer.num_threads={args.threads}", f"output_dir={out}"]


def _words(text: str) -> list[str]:
    import re

    return re.findall(r"[a-z']+|[?]", text.lower())


def surface_features(prompt: str, response: str) -> dict[str, float]:
    """Content-free features of one response to its prompt (the HH `Human:`/`Assistant:` text)."""
    turn = prompt[prompt.rfind("Human:") + 6:]
    human = set(_words(turn[:turn.rfind("Assistant:")] if "Assistant:" in turn else turn)) - {"?"}
    words = [w for w in _words(response) if w != "?"]
    distinct = set(words)
    return {"length": len(words), "overlap": len(human & distinct) / max(len(human), 1),
            "repeats": 1 - len(distinct) / max(len(words), 1), "question": float("?" in response),
            "apology": float(bool(distinct & {"sorry", "apologize", "apologise"}))}


def _bag(response: str, dim: int):
    """Hashed presence of the response's words and word pairs (crc32: the same in every process)."""
    import zlib

    import torch

    words = _words(response)
    x = torch.zeros(dim)
    for g in set(words) | {f"{a} {b}" for a, b in zip(words, words[1:], strict=False)}:
        x[zlib.crc32(g.encode()) % dim] = 1.0
    return x


def probe(args) -> dict:
    """What a reward model can carry across HH subsets from the pairs alone (see the docstring)."""
    import torch

    from align.config import shared_data_dir
    from align.data import DataStats, load_examples
    from align.data.split import train_val_split

    torch.manual_seed(args.seed)
    stats = DataStats()
    pairs = {s: load_examples(os.path.join(shared_data_dir(), "hh-rlhf", f"{s}_test.jsonl.gz"), "hh",
                              on_error="skip", stats=stats) for s in SUBSETS[1:]}
    # the RM run's split (build_split: val_size held out by content hash), the others' first pairs
    train, held_out = train_val_split(pairs[args.subset], val_size=min(args.val_size, len(pairs[args.subset])),
                                      seed=args.seed)
    tests = {s: held_out[:args.test_size] if s == args.subset else rows[:args.test_size] for s, rows in pairs.items()}
    features = {}
    for s, rows in pairs.items():
        fc = [surface_features(e.prompt, e.chosen) for e in rows]
        fr = [surface_features(e.prompt, e.rejected) for e in rows]
        features[s] = {k: round(sum(c[k] > r[k] for c, r in zip(fc, fr, strict=True))
                                / max(sum(c[k] != r[k] for c, r in zip(fc, fr, strict=True)), 1), 3) for k in fc[0]}
    dim = 2**16
    diff = lambda rows: torch.stack([_bag(e.chosen, dim) - _bag(e.rejected, dim) for e in rows])  # noqa: E731
    x = diff(train)
    w = torch.zeros(dim, requires_grad=True)
    opt = torch.optim.Adam([w], lr=1e-2)
    for _ in range(300):  # full-batch Bradley-Terry: -log sigmoid(r(chosen) - r(rejected)), L2 1e-3
        loss = torch.nn.functional.softplus(-(x @ w)).mean() + 1e-3 * (w * w).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        linear = {s: round(((diff(rows) @ w) > 0).float().mean().item(), 3) for s, rows in tests.items()}
    return {"probe": "hh surface features and a linear bag-of-words Bradley-Terry reward",
            "chosen_has_more": features, "linear_bt": {"trained_on": args.subset, "train_pairs": len(train),
                                                          "accuracy": linear, "held_out_pairs": args.test_size},
            "rows_skipped": stats.rows_skipped, "seed": args.seed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="tiny-neox")
    p.add_argument("--subset", choices=SUBSETS, default="helpful-base", help="HH-RLHF pairs to use")
    p.add_argument("--steps", type=int, default=115, help="default: one pass over helpful-base's 1,833 training pairs")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=None, help="default: 1e-3 (tiny-neox), 5e-3 (stories260k LoRA)")
    p.add_argument("--val-size", type=int, default=512, help="held-out pairs")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--max-response-length", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=0, help="held-out evaluations in between (0: only before and after)")
    p.add_argument("--test-subset", choices=SUBSETS[1:] + ("none",), default="helpful-online",
                   help="also evaluate (algo=eval) on pairs of this subset, never trained on unless it is --subset")
    p.add_argument("--test-size", type=int, default=512, help="pairs of --test-subset evaluated (its first ones)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="an extra Hydra override of the RM run (repeatable)")
    p.add_argument("--sft-steps", type=int, default=0,
                   help="tiny-neox: first this many SFT steps on the training subset's dialogues (0: none)")
    p.add_argument("--sft-lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=64, help="tiny-neox hidden size")
    p.add_argument("--layers", type=int, default=2, help="tiny-neox layers")
    p.add_argument("--output-dir", default=None, help="default: a temporary folder, removed afterwards")
    p.add_argument("--probe", action="store_true",
                   help="no network: surface features and a linear bag-of-words RM across the HH subsets")
    args = p.parse_args()
    if args.probe:
        if args.subset == "all":
            raise SystemExit("--probe: train on one subset (--subset)")
        print(json.dumps(probe(args)))
        return
    args.lr = args.lr if args.lr is not None else (1e-3 if args.model == "tiny-neox" else 5e-3)

    from align.config import compose
    from align.trainers import run

    with tempfile.TemporaryDirectory(prefix="bench_rm_") as tmp:
        out = Path(args.output_dir or tmp)
        model_dir = None
        if args.model == "tiny-neox":
            model_dir = build_tiny_neox(out / "init_model", hidden=args.hidden, layers=args.layers, heads=4,
                                        seed=args.seed)
        sft = None
        if args.sft_steps:
            if args.model != "tiny-neox":
                raise SystemExit("--sft-steps: tiny-neox only")
            t_sft = time.perf_counter()
            sft = run(*compose(sft_overrides(args, model_dir, out / "sft")))
            sft["seconds"] = time.perf_counter() - t_sft
            model_dir = str(Path(sft["output_dir"]) / "final")
        cfg, raw = compose(overrides(args, model_dir, out / "run"))
        t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        summary = run(cfg, raw)
        seconds, cpu1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        test = None
        if args.test_subset != "none":
            test = run(*compose(eval_overrides(args, summary["reward_model_path"], out / "eval")))
    before, after = summary["val_before"], summary["val_after"]
    n = summary["val_pairs"]
    result = {
        "held_out_accuracy_before": round(before["accuracy"], 4),
        "held_out_accuracy_after": round(after["accuracy"], 4),
        "held_out_pairs": n,
        "chance_std": round(0.5 / n**0.5, 4),
        "held_out_loss_before": round(before["loss"], 4),
        "held_out_loss_after": round(after["loss"], 4),
        "held_out_margin_after": round(after["scores/margin"], 4),
        "test": None if test is None else {
            "subset": args.test_subset, "pairs": test["pairs"], "accuracy": round(test["accuracy"], 4),
            "length_baseline": round(test["length_baseline"], 4), "chance_std": round(0.5 / test["pairs"] ** 0.5, 4),
            "margin_mean": round(test["margin"]["mean"], 4),
            "by_length": [[round(b["accuracy"], 3), round(b["length_baseline"], 3)] for b in test["by_length"]]},
        "sft": None if sft is None else {"steps": args.sft_steps, "lr": args.sft_lr,
                                         "val_loss_before": round(sft["val_loss_before"], 4),
                                         "val_loss_after": round(sft["val_loss_after"], 4),
                                         "seconds": round(sft["seconds"], 1)},
        "steps": args.steps,
        "pairs_seen": args.steps * args.batch_size,
        "train_pairs": summary["train_pairs"],
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 1),
        "model": {"name": args.model, "hidden": args.hidden, "layers": args.layers, "finetune": cfg.model.finetune, "lr": args.lr, "batch_size": args.batch_size,
                  "max_length": args.max_length, "max_response_length": args.max_response_length},
        "data": {"subset": args.subset, "source": cfg.data.source, "rows_read": summary["data"]["rows_read"],
                 "rows_skipped": summary["data"]["rows_skipped"]},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "threads": args.threads,
                    "load_average_1m": round(os.getloadavg()[0], 2)},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
