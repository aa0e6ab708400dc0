"""Loading the frozen base: a transformers causal LM, or a builtin model built in code.

`builtin:tiny` is a Llama-architecture model (hidden 256, 4 layers, 4 heads, intermediate
1024) with a character-level tokenizer of 100 tokens, initialised from a fixed seed. It
needs no download, and is large enough that matmuls, not Python, dominate a step.
`base_info` records what rebuilds the exact base (and a hash of its weights to verify it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
CHARACTERS = tuple(chr(i) for i in range(32, 127)) + ("\n",)

BUILTIN_SPECS: dict[str, dict[str, Any]] = {
    "builtin:tiny": {
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "intermediate_size": 1024,
        "max_position_embeddings": 512,
        "init_seed": 1234,
    },
    # For unit tests and smoke runs: the same architecture, small enough to train in milliseconds.
    "builtin:micro": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 256,
        "init_seed": 1234,
    },
}


@dataclass
class Base:
    model: nn.Module
    tokenizer: Any
    info: dict[str, Any]


def char_tokenizer() -> Any:
    """A real `PreTrainedTokenizerFast` that maps each printable ASCII character to one token.

    BPE with no merges splits text into single characters, so no pre-tokenizer is needed.
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def build_builtin(name: str) -> tuple[nn.Module, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = dict(BUILTIN_SPECS[name])
    init_seed = spec.pop("init_seed")
    tokenizer = char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        **spec,
    )
    # Build from a private RNG state so the weights never depend on what ran before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = LlamaForCausalLM(config)
    return model, tokenizer


def weights_sha256(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_base(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Base:
    """The frozen base model in eval mode, its tokenizer, and what rebuilds it."""
    import transformers

    if name in BUILTIN_SPECS:
        model, tokenizer = build_builtin(name)
        info: dict[str, Any] = {"base_model": name, "builtin_spec": BUILTIN_SPECS[name]}
        info["rebuild"] = f"from mlora_cli.model.base import load_base; load_base({name!r}).model"
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=False, dtype=dtype)
        info = {"base_model": name, "revision": getattr(model.config, "_commit_hash", None)}
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device=device, dtype=dtype)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    info.update(
        {
            "model_class": type(model).__name__,
            "config": model.config.to_dict(),
            "parameters": sum(p.numel() for p in model.parameters()),
            "weights_sha256": weights_sha256(model),
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
        }
    )
    return Base(model=model, tokenizer=tokenizer, info=info)
