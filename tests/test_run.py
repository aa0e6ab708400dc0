"""End to end: `mlora run` on a micro sweep writes a complete run folder, and every saved
adapter reloads with plain PEFT and reproduces mlora's own evaluation numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import builtin_tasks, micro_sweep, mlora, write_sweep
from peft import PeftModel

from mlora_cli.data.batches import collate, collate_prompts, token_losses, tokenize_task
from mlora_cli.data.sources import load_task
from mlora_cli.model.base import load_base
from mlora_cli.spec.schema import TaskConfig

# Whole runs and evaluations through the CLI: the slow tier.
pytestmark = pytest.mark.slow

SWEEP = micro_sweep(
    name="micro",
    seed=3,
    tasks=[*builtin_tasks("copy", train_examples=32, eval_examples=6),
           *builtin_tasks("sort", train_examples=32, eval_examples=6, steps=4)],
    adapter={"rank": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    eval={"max_new_tokens": 6, "metrics": ["loss", "exact_match", "token_accuracy"]},
    sweep={
        "grid": {"adapter": {"rank": [2, 4]}},
        "list": [{"train.batch_size": 3}, {"adapter.lr": 3e-3, "adapter.dropout": 0.1}],
    },
    output_dir="runs",
)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("run")
    result = mlora("run", write_sweep(folder, SWEEP), f"output_dir={folder / 'runs'}")
    assert result.exit_code == 0, result.output
    assert "final evaluation" in result.output
    (run_dir,) = (folder / "runs").iterdir()
    return run_dir


def test_run_folder_layout(finished_run: Path) -> None:
    results = json.loads((finished_run / "results.json").read_text())
    names = ["r2-bs3", "r2-lr3e-3-do0.1", "r4-bs3", "r4-lr3e-3-do0.1"]
    assert list(results["adapters"]) == names
    assert sorted(p.name for p in (finished_run / "adapters").iterdir()) == sorted(names)
    for name, entry in results["adapters"].items():
        assert entry["status"] == "done"
        assert set(entry["final"]) == {"copy", "sort"}
        assert entry["steps"] == 7 and entry["train_tokens"] > 0 and entry["train_tokens_per_s"] > 0
        assert len(entry["matrix"]["loss"]) == 3  # before training + after each of 2 tasks
        assert (finished_run / "adapters" / name / "adapter_config.json").is_file()
        assert (finished_run / "checkpoints" / name / "after-task-2" / "adapter_model.safetensors").is_file()
    assert results["adapters"]["r4-bs3"]["config"]["train"]["batch_size"] == 3
    assert results["adapters"]["r4-lr3e-3-do0.1"]["config"]["adapter"]["dropout"] == 0.1
    run = results["run"]
    assert run["wall_seconds"] > 0 and run["peak_rss_mib"] > 0 and "torch" in run["versions"]

    resolved = yaml.safe_load((finished_run / "sweep.resolved.yaml").read_text())
    assert resolved["output_dir"].endswith("runs") and resolved["seed"] == 3
    expanded = json.loads((finished_run / "adapters.json").read_text())
    assert [a["name"] for a in expanded] == names
    base = json.loads((finished_run / "base.json").read_text())
    assert base["base_model"] == "builtin:micro" and len(base["weights_sha256"]) == 64

    lines = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 4 * 7
    assert {"adapter", "step", "loss", "lr", "grad_norm", "tokens", "seconds"} <= set(lines[0])


def test_saved_adapters_reload_with_peft_and_reproduce_eval(finished_run: Path) -> None:
    results = json.loads((finished_run / "results.json").read_text())
    base = load_base("builtin:micro")
    assert base.info["weights_sha256"] == json.loads((finished_run / "base.json").read_text())["weights_sha256"]
    tokenizer = base.tokenizer
    model = None
    for index, (name, entry) in enumerate(results["adapters"].items()):
        path = finished_run / "adapters" / name
        label = f"adapter{index}"  # PEFT adapter names cannot hold '.'
        if model is None:
            model = PeftModel.from_pretrained(base.model, str(path), adapter_name=label)
        else:
            model.load_adapter(str(path), adapter_name=label)
        model.set_adapter(label)
        model.eval()
        for task in SWEEP["tasks"]:
            data = load_task(TaskConfig(**task), SWEEP["seed"], None)
            rows = tokenize_task(data, tokenizer, SWEEP["train"]["max_seq_len"]).eval
            batch = collate(list(rows), tokenizer.pad_token_id)
            with torch.no_grad():
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            loss, tokens, correct = token_losses(logits, batch.labels)
            expected = entry["final"][task["name"]]
            assert loss.sum().item() / tokens.sum().item() == pytest.approx(expected["loss"], rel=1e-4)
            assert correct.sum().item() / tokens.sum().item() == pytest.approx(expected["token_accuracy"], abs=1e-6)
            ids, mask = collate_prompts(list(rows), tokenizer.pad_token_id)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            texts = [tokenizer.decode(g[: g.index(2)] if 2 in g else g, skip_special_tokens=True)
                     for g in out[:, ids.size(1):].tolist()]
            hits = sum(t.strip() == r.completion.strip() for t, r in zip(texts, rows))
            assert hits / len(rows) == pytest.approx(expected["exact_match"])


def test_eval_recomputes_the_matrix_from_checkpoints(finished_run: Path) -> None:
    original = json.loads((finished_run / "results.json").read_text())
    outputs = []
    for _ in range(2):
        result = mlora("eval", finished_run)
        assert result.exit_code == 0, result.output
        outputs.append(sorted((finished_run / "evals").iterdir()))
    assert len(outputs[-1]) == 2  # a new evaluation beside the old one, never over it
    recomputed = json.loads((outputs[-1][-1] / "results.json").read_text())
    assert (outputs[-1][-1] / "forgetting.csv").is_file()
    for name, entry in original["adapters"].items():
        for metric, matrix in entry["matrix"].items():
            again = recomputed["adapters"][name]["matrix"][metric]
            assert len(again) == len(matrix)
            for row, row_again in zip(matrix, again):
                assert row_again == pytest.approx(row, rel=1e-4, abs=1e-6)
        for metric, values in entry["cl_metrics"].items():
            for key, value in values.items():
                if value is not None and key in recomputed["adapters"][name]["cl_metrics"][metric]:
                    assert recomputed["adapters"][name]["cl_metrics"][metric][key] == pytest.approx(value, abs=1e-6)


def test_eval_any_peft_adapters_on_a_task_file(finished_run: Path, tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump({"tasks": SWEEP["tasks"], "eval": SWEEP["eval"], "seed": SWEEP["seed"]}))
    names = ["r2-bs3", "r4-bs3"]
    args = ["eval", "--base", "builtin:micro", "--tasks", str(tasks)]
    for name in names:
        args += ["--adapter", str(finished_run / "adapters" / name)]
    result = mlora(*args)
    assert result.exit_code == 0, result.output
    assert "2 adapters on builtin:micro" in result.output

    from mlora_cli.eval import reeval
    from mlora_cli.spec.load import load_task_suite

    scores = reeval.evaluate_adapters("builtin:micro", [finished_run / "adapters" / n for n in names],
                                      load_task_suite(tasks), max_seq_len=SWEEP["train"]["max_seq_len"])
    original = json.loads((finished_run / "results.json").read_text())
    for name in names:
        for task, values in original["adapters"][name]["final"].items():
            assert scores["adapters"][name]["final"][task]["loss"] == pytest.approx(values["loss"], rel=1e-4)
            assert scores["adapters"][name]["final"][task]["exact_match"] == pytest.approx(values["exact_match"])


def test_eval_task_file_paths_resolve_against_its_folder(finished_run: Path, tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "suite"
    (folder / "data").mkdir(parents=True)
    rows = [{"prompt": f"copy {w}=", "completion": w} for w in ("abc", "bcd", "cde", "def", "efg", "fgh")]
    (folder / "data" / "copy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tasks.yaml").write_text(yaml.safe_dump({
        "tasks": [{"name": "file-copy", "source": "jsonl:data/copy.jsonl", "train_examples": 2, "eval_examples": 3}],
        "eval": {"max_new_tokens": 4},
    }))
    monkeypatch.chdir(tmp_path)  # not the tasks file's folder
    result = mlora("eval", "--base", "builtin:micro", "--adapter", finished_run / "adapters" / "r2-bs3",
                   "--tasks", folder / "tasks.yaml")
    assert result.exit_code == 0, result.output
    assert "file-copy" in result.output
