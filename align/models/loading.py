"""Loading Hugging Face causal LMs and tokenizers from a local path or a hub id.

Every loader here is hub-agnostic: a local folder and a hub name go through the same
`from_pretrained` call. `trust_remote_code` is off unless the caller asks for it.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

DEFAULT_MODEL = os.environ.get(
    "ALIGN_DEFAULT_MODEL",
    os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "models", "stories260K"),
)


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """Map a config string (`float32`, `bf16`, ...) to a torch dtype; fail naming the value."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; valid: {sorted(set(_DTYPES))}") from None


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_tokenizer(path: str, *, trust_remote_code: bool = False, padding_side: str = "right"):
    """Load a tokenizer and make sure it has a pad token.

    A tokenizer without a pad token (Llama, GPT-2, stories260K) gets its unk token as pad when
    it has one, else its eos token. Padding is always masked out by the attention mask and the
    loss masks, so which real token serves as pad does not change any result.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    ensure_pad_token(tok)
    tok.padding_side = padding_side
    return tok


def ensure_pad_token(tokenizer, model=None) -> None:
    """Give `tokenizer` a pad token when it has none, and mirror its id into `model.config`."""
    if tokenizer.pad_token is None:
        if getattr(tokenizer, "unk_token", None) is not None:
            tokenizer.pad_token = tokenizer.unk_token
        elif tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    if model is not None:
        if tokenizer.pad_token_id >= model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id


QUANTIZATIONS = ("nf4",)


def quantization_config(quantization: str, compute_dtype: str | torch.dtype = "float32"):
    """A BitsAndBytesConfig for `quantization` ("nf4": 4-bit NormalFloat with double quantization,
    the QLoRA recipe, Dettmers et al. 2023, https://arxiv.org/abs/2305.14314, section 3).

    Fails with an error naming the option and the fix when bitsandbytes is missing or cannot
    load on this platform.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; valid: {list(QUANTIZATIONS)} or None")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            f"quantization={quantization!r} (QLoRA) needs bitsandbytes, which is not installed: "
            "pip install 'align[qlora]' (or pip install bitsandbytes), or use quantization=None"
        )
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # a wheel without a backend for this platform fails at import
        raise RuntimeError(
            f"quantization={quantization!r} needs bitsandbytes, which is installed but does not load on "
            f"this platform ({type(err).__name__}: {err}); use quantization=None"
        ) from err
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=resolve_dtype(compute_dtype),
    )


def load_causal_lm(
    path: str,
    *,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    quantization: str | None = None,
    meta: bool = False,
    **kwargs: Any,
):
    """Load any Hugging Face causal LM (local folder or hub id) in `dtype` on `device`.

    `quantization="nf4"` loads the linear layers in 4-bit NF4 with double quantization (the
    QLoRA base; needs bitsandbytes); `dtype` is then the compute dtype and of the other layers.
    `meta=True` builds the architecture from the folder's config on the meta device, reading no
    weights and allocating nothing: a replica that `TrainEngine.prepare` fills from rank 0.
    """
    from transformers import AutoModelForCausalLM

    extra = dict(kwargs)
    if attn_implementation:
        extra["attn_implementation"] = attn_implementation
    if meta:
        if quantization is not None:
            raise ValueError("a 4-bit base cannot be built on the meta device (QLoRA runs as one replica)")
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype),
                                                    trust_remote_code=trust_remote_code, **extra)
    target = resolve_device(device)
    if quantization is not None:
        extra["quantization_config"] = quantization_config(quantization, dtype)
        extra.setdefault("device_map", {"": str(target)})  # quantized weights cannot be moved by .to()
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code, **extra
            )
        except (RuntimeError, NotImplementedError) as err:
            raise RuntimeError(
                f"loading {path} with quantization={quantization!r} on {target} failed: {err}. "
                "bitsandbytes 4-bit needs CUDA, or CPU with bitsandbytes >= 0.46; use quantization=None"
            ) from err
        return _cpu_4bit_inference_fix(model)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code, **extra
    )
    return model.to(target)


def _cpu_4bit_inference_fix(model):
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for its CPU kernel at the first
    no-grad forward, which needs the output width a multiple of 32 and the input width one of the
    quantization block: stories260K's 172-wide MLP fails there ("N must be divisible by block_n",
    then a reshape error). Such layers keep the unpacked path, which serves any width."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if getattr(module, "support_avx512bf16_for_cpu", False) and getattr(weight, "quant_state", None) is not None:
            out_width, in_width = weight.quant_state.shape
            if out_width % 32 or in_width % weight.quant_state.blocksize:
                module.support_avx512bf16_for_cpu = False
    return model


def load_model_and_tokenizer(path: str, *, dtype="float32", device="cpu", trust_remote_code=False, **kw):
    """Both at once, with the pad token set on the tokenizer and mirrored into the model config."""
    tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
    model = load_causal_lm(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code, **kw)
    ensure_pad_token(tok, model)
    return model, tok


def tiny_llama_config(
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = False,
):
    """A LlamaConfig for tiny random models in tests (head_dim = hidden_size / num_heads)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def build_tiny_llama(seed: int = 0, **config_kwargs):
    """A randomly initialised tiny Llama (fp32, CPU), deterministic under `seed`."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**config_kwargs)).eval()
