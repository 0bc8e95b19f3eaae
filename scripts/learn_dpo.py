"""Does each preference loss learn on real data? Held-out accuracy before and after, per loss.

    python scripts/learn_dpo.py                                  # all losses, HH helpful-base
    python scripts/learn_dpo.py --losses sigmoid,simpo --steps 200 --limit 2000

Trains stories260K (full fine-tuning, CPU, one thread) on HH-RLHF helpful-base pairs with each
loss of the DPO trainer in turn (`python -m align algo=dpo algo.loss=<loss>` with the settings
below) and prints one JSON object: per loss the held-out implicit-reward accuracy at step 0 and
at the end, the held-out log-prob preference (fraction of pairs whose chosen reply has the higher
mean per-token log-prob), the chosen replies' NLL per token, and the seconds taken.

For the reference-based losses (sigmoid, robust, ipo, hinge, kto) the accuracy at step 0 is 0:
policy and reference give identical log-probs, every implicit reward is 0 and no pair is won;
compare the end value with chance (0.5). For SimPO and ORPO the implicit reward is the mean
log-prob, so their accuracy is the log-prob preference, whose step-0 value is the base model's.
KTO trains on the pairs split into desirable and undesirable examples and is scored on the same
held-out pairs with DPO's implicit reward. The CI test (tests/trainers/test_dpo.py) runs a
smaller version of this.

Measured with the defaults (744 training pairs from the first 1,000 helpful-base rows, 256
held-out pairs, prompt cut to 32 tokens and replies to 112, 100 steps of 8 pairs, lr 1e-3
unless PER_LOSS says otherwise, CPU):

    loss     held-out accuracy   log-prob preference   chosen NLL/token
    sigmoid  0.000 -> 0.598      0.520 -> 0.578        3.29 -> 3.44
    robust   0.000 -> 0.590      0.520 -> 0.594        3.29 -> 3.47
    ipo      0.000 -> 0.613      0.520 -> 0.582        3.29 -> 6.92   (per-token log-probs)
    hinge    0.000 -> 0.594      0.520 -> 0.566        3.29 -> 3.43
    simpo    0.520 -> 0.617      0.520 -> 0.617        3.29 -> 5.83
    orpo     0.520 -> 0.586      0.520 -> 0.586        3.29 -> 3.16
    kto      0.000 -> 0.570      0.520 -> 0.531        3.29 -> 2.93

About 0.6 is what this model reaches here: once cut to 112 tokens the chosen reply is the
longer one in about half of the held-out pairs and the shorter in about 30%, and a 260K-parameter
story model learns little beyond length and a few surface cues. Chance is 0.5.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# Per-loss settings. Where they differ from the papers' defaults, the reason (measured on the
# CI test's setup, 30 steps): IPO on summed log-probs regresses log-ratio gaps that swing by
# tens of nats to a target of a few and hardly learns (0.53 after 100 steps at tau 0.5); on
# per-token log-probs (algo.length_normalize, as the IPO authors and TRL run it) it does. Hinge
# at beta 0.1 asks for a 10-nat margin; 0.2 learns faster. ORPO at lambda 0.1-3 is mostly SFT on
# this tiny model and the held-out preference does not move; lambda 10 at a lower lr (3e-4)
# raises it a little while still lowering the chosen NLL. KTO at lambda_U = lambda_D lowers
# every log-prob (the undesirable side wins by shrinking all replies), and a uniform per-token
# drop makes longer replies, mostly the chosen ones here, lose the summed reward: held-out pair
# accuracy stays below 0.5 although equal-length pairs are ranked right (0.68 in a run at lr
# 5e-5). lambda_U = 0.5 (lambda_D n_D / lambda_U n_U = 2, above the paper's suggested [1, 4/3])
# stops the drift; lr 2e-4 because 1e-3 collapses it.
PER_LOSS = {
    "sigmoid": ["algo.beta=0.1"],
    "robust": ["algo.beta=0.1", "algo.label_smoothing=0.1"],
    "ipo": ["algo.beta=0.1", "algo.length_normalize=true"],
    "hinge": ["algo.beta=0.2"],
    "simpo": ["algo.beta=2.0", "algo.simpo_gamma=0.5"],
    "orpo": ["algo.beta=10.0", "trainer.lr=3e-4"],
    "kto": ["algo.beta=0.1", "algo.unpair=true", "algo.undesirable_weight=0.5", "trainer.lr=2e-4"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--losses", default=",".join(PER_LOSS))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--limit", type=int, default=1000, help="pairs read (the held-out ones included)")
    p.add_argument("--val-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=144)
    p.add_argument("--max-prompt-length", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", default=None, help="run folders go here (default: a temporary folder)")
    args = p.parse_args()

    from align.config import compose
    from align.trainers.dpo import train

    root = args.out or tempfile.mkdtemp(prefix="learn_dpo_")
    common = [
        "algo=dpo", f"data.limit={args.limit}", f"data.val_size={args.val_size}", f"data.max_length={args.max_length}",
        f"data.max_prompt_length={args.max_prompt_length}",
        f"data.max_response_length={args.max_length - args.max_prompt_length}",
        f"trainer.batch_size={args.batch_size}", f"trainer.max_steps={args.steps}", f"trainer.lr={args.lr}",
        f"trainer.eval_batches={-(-args.val_size // args.batch_size)}",  # every held-out pair
        "trainer.warmup_steps=5", f"trainer.eval_every={max(args.steps // 4, 1)}", f"trainer.save_every={args.steps}",
        "trainer.num_threads=1", "trainer.progress=false", "trainer.resume=never",
        f"algo.reference_cache_dir={os.path.join(root, 'reference_cache')}",
    ]
    results = {}
    for loss in args.losses.split(","):
        cfg, raw = compose([*common, f"algo.loss={loss}", *PER_LOSS[loss], f"output_dir={os.path.join(root, loss)}"])
        t0 = time.perf_counter()
        s = train(cfg, raw)
        before, after = s["val_before"], s["val_after"]
        results[loss] = {
            "accuracy": [round(before["rewards/accuracy"], 4), round(after["rewards/accuracy"], 4)],
            "logp_preference": [round(before["logp_accuracy"], 4), round(after["logp_accuracy"], 4)],
            "chosen_nll": [round(before["nll"], 4), round(after["nll"], 4)],
            "train_items": s["train_items"], "val_pairs": s["val_items"], "settings": PER_LOSS[loss],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(f"{loss}: {results[loss]}", file=sys.stderr, flush=True)
    print(json.dumps({"results": results, "steps": args.steps, "settings": common, "out": root}, indent=1))


if __name__ == "__main__":
    main()
