"""Evaluation's greedy generation gives what `generate(do_sample=False)` gives, token for token.

`greedy_generate` starts from the teacher-forced pass over prompt + reference and decodes
further only the rows that left the reference, so rows whose reference is the model's own
greedy output, a prefix of it that then differs, or unrelated text all take different
paths. Each must equal HF generate for every adapter of a fused batch, on a tiny Llama,
GPT-2 and Qwen2, with rows stopped by max_new_tokens and rows decoded past the pass.
"""

from __future__ import annotations

import pytest
import torch
from test_models import TARGETS, tiny_config
from transformers import AutoModelForCausalLM

from mlora_cli.data.batches import Row, collate, collate_prompts
from mlora_cli.data.sources import load_task
from mlora_cli.eval.evaluate import greedy_generate
from mlora_cli.model.base import char_tokenizer, model_cache
from mlora_cli.model.engine import MultiLoraModel
from mlora_cli.spec.schema import AdapterConfig, TaskConfig

MAX_NEW = 8


def hf_generate(engine: MultiLoraModel, slot: int, prompts: list[list[int]], tokenizer) -> list[list[int]]:
    rows = [Row(ids=tuple(p), prompt_len=len(p), completion="") for p in prompts]
    ids, mask = collate_prompts(rows, tokenizer.pad_token_id)
    with torch.no_grad(), engine.routed([slot], [len(rows)]):
        out = engine.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False,
                                    num_beams=1, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=tokenizer.eos_token_id)
    results = []
    for tokens in out[:, ids.size(1) :].tolist():
        if tokenizer.eos_token_id in tokens:
            tokens = tokens[: tokens.index(tokenizer.eos_token_id) + 1]
        results.append(tokens)
    return results


@pytest.mark.parametrize("kind", list(TARGETS))
def test_greedy_generation_from_the_loss_pass_equals_hf_generate(kind: str) -> None:
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, tokenizer)).eval()
    config = AdapterConfig(rank=4, alpha=8.0, target_modules=tuple(TARGETS[kind]))
    engine = MultiLoraModel(model, TARGETS[kind], 2, 4)
    generator = torch.Generator().manual_seed(1)
    for slot in range(2):
        engine.load_slot(slot, config, None, seed=slot)
        with torch.no_grad():
            for layer in engine.layers.values():
                layer.lora_B[slot].copy_(torch.randn(layer.lora_B[slot].shape, generator=generator))

    task = load_task(TaskConfig(name="copy", source="builtin:copy", train_examples=4, eval_examples=12), 0, None)
    prompts = [tokenizer(e.prompt, add_special_tokens=False)["input_ids"] for e in task.eval]
    rows, groups, expected = [], [], []
    for slot in range(2):
        greedy = hf_generate(engine, slot, prompts, tokenizer)
        for i, (prompt, tokens) in enumerate(zip(prompts, greedy)):
            if i % 3 == 0:
                reference = tokens  # the model's own output: read off the pass entirely
            elif i % 3 == 1:
                cut = min(3, len(tokens) - 1)  # leaves the greedy path at token 3 (or at its eos)
                reference = tokens[:cut] + [(tokens[cut] + 1) % 90 + 4]
            else:
                reference = tokenizer(task.eval[i].completion, add_special_tokens=False)["input_ids"]
            if i % 2:
                reference = reference + [tokenizer.eos_token_id]
            rows.append(Row(ids=tuple(prompt + reference), prompt_len=len(prompt), completion=""))
            groups.append(slot)
            expected.append(tokens)

    batch = collate(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        with engine.routed([0, 1], [len(prompts), len(prompts)]):
            output = engine.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=True)
        generated = greedy_generate(engine, rows, [0, 1], groups, batch.attention_mask, output.logits.argmax(-1),
                                    model_cache(output), MAX_NEW, tokenizer.eos_token_id)
    assert generated == expected
    assert any(len(t) < MAX_NEW for t in expected) or kind != "gpt2"  # GPT-2's rows stop at eos
    assert expected[: len(prompts)] != expected[len(prompts) :]  # the two adapters really differ
