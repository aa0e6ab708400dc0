"""`mlora export`: model cards, merged models, the builtin base as a transformers folder, the vLLM serving check,
and hub uploads (the hub mocked at HfApi, the boundary)."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import micro_sweep, mlora, write_sweep

from mlora_cli import cli
from mlora_cli.export import VLLM_DEFAULT_MAX_LORA_RANK, vllm_problems, vllm_rank_for

# Three adapters: ranks 4 and 16, and O-LoRA at rank 8, whose saved LoRA grows to 8 x 2 tasks = rank 16.
SWEEP = micro_sweep(sweep={"list": [{"adapter.rank": 4}, {"adapter.rank": 16},
                                    {"adapter.rank": 8, "adapter.strategy": "olora"}]})
PROMPT = "copy: hello world"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("export")
    result = mlora("run", write_sweep(folder, SWEEP), "--no-plots", "--quiet")
    assert result.exit_code == 0, result.output
    (run,) = (folder / "runs").iterdir()
    return run


def logits(model: Any, tokenizer: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(tokenizer(PROMPT, return_tensors="pt").input_ids).logits


# -- pure rules, no run ---------------------------------------------------------------------------


def test_vllm_rules() -> None:
    llama = ["LlamaForCausalLM"]
    assert vllm_problems({"r": 8}, {"q_proj", "v_proj", "lm_head"}, llama, 16) == ([], [])
    problems, _ = vllm_problems({"r": 24}, {"q_proj"}, llama, 16)  # O-LoRA: rank 8 x 3 tasks
    assert problems == ["rank 24 > --max-lora-rank 16 (serve it with --max-lora-rank 32)"]
    problems, _ = vllm_problems({"r": 8, "use_dora": True, "bias": "all"}, {"q_proj", "lm_head"},
                                ["Qwen2ForCausalLM"], 16)
    assert [p.split(":")[0].split(" (")[0] for p in problems] == ["DoRA", "bias 'all'", "lm_head"]
    problems, notes = vllm_problems({"r": 8}, {"c_attn"}, ["GPT2LMHeadModel"], 16)
    assert problems == ["GPT2LMHeadModel: vLLM 0.33.0 has no LoRA support for this architecture"]
    assert notes and notes[0].startswith("c_attn: not a projection this check knows")
    assert vllm_problems({"r": 600}, set(), llama, 512)[0] == ["rank 600 > --max-lora-rank 512 and > 512, vLLM's "
                                                              "largest max_lora_rank"]
    assert (vllm_rank_for(1), vllm_rank_for(2), vllm_rank_for(16), vllm_rank_for(513)) == (1, 8, 16, None)


def test_the_cli_default_max_lora_rank_is_vllms() -> None:
    default = inspect.signature(cli.export).parameters["max_lora_rank"].default
    assert default == VLLM_DEFAULT_MAX_LORA_RANK == 16


# -- on a micro run --------------------------------------------------------------------------------


@pytest.mark.slow
def test_card_holds_config_scores_and_how_to_load(run_dir: Path) -> None:
    result = mlora("export", run_dir)
    assert result.exit_code == 0, result.output
    results = json.loads((run_dir / "results.json").read_text())
    for name, entry in results["adapters"].items():
        card = (run_dir / "adapters" / name / "README.md").read_text()
        assert f"model card: {run_dir / 'adapters' / name / 'README.md'}" in result.output
        assert card.startswith("---\nlibrary_name: peft\n") and f"# {name}\n" in card
        rank = entry["config"]["adapter"]["rank"]
        assert f"| rank | {rank}" in card and "| learning rate | 0.01 " in card
        assert "`k_proj`, `o_proj`, `q_proj`, `v_proj`" in card
        assert f"| strategy | {entry['config']['adapter']['strategy']}" in card
        assert "| 1 | copy | `builtin:copy` | sft | 3 |" in card and "| 2 | reverse |" in card
        final = entry["final"]
        assert f"| copy | {100 * final['copy']['exact_match']:.1f} | {final['copy']['loss']:.4f} |" in card
        cl_loss = entry["cl_metrics"]["loss"]
        assert f"| loss | {cl_loss['acc']:.4f} | {cl_loss['bwt']:+.4f} | {cl_loss['fwt']:+.4f} |" in card
        assert "| metric | ACC | BWT | FWT | forgetting |" in card
        assert f"model = PeftModel.from_pretrained(base, '{(run_dir / 'adapters' / name).resolve()}')" in card
        assert "--base-out BASE_DIR" in card and "rl.group_size" not in card
    olora = (run_dir / "adapters" / "r8-olora" / "README.md").read_text()
    assert "| rank | 8 per task; saved as one LoRA of rank 16" in olora and "olora_lambda1 0.5" in olora


@pytest.mark.slow
def test_card_lists_rl_settings_when_a_task_is_rl(run_dir: Path) -> None:
    from mlora_cli.export import load_run, model_card

    run = load_run(run_dir)
    run.tasks = [{**task, "objective": "grpo"} for task in run.tasks]
    card = model_card(run, "r4")
    assert "| RL tasks | copy, reverse |" in card and "| rl.group_size | 4 |" in card and "| rl.loss | dapo |" in card


@pytest.mark.slow
def test_merged_model_loads_with_plain_transformers_and_equals_peft(run_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlora_cli.model.base import load_base

    result = mlora("export", run_dir, "r4", "--merge", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    folder = tmp_path / "merged" / "r4"
    merged, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    assert (folder / "README.md").read_text().startswith("---\nlibrary_name: transformers\n")
    base = load_base("builtin:micro")
    base_logits = logits(base.model, base.tokenizer)
    peft = PeftModel.from_pretrained(base.model, str(run_dir / "adapters" / "r4"))
    expected = logits(peft, base.tokenizer)
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter changes the model: the check is not vacuous
    torch.testing.assert_close(logits(merged, tokenizer), expected, atol=1e-4, rtol=0)
    assert f"merged copy (the LoRA folded into the base weights, no PEFT needed) is at `{folder.resolve()}`" in (
        run_dir / "adapters" / "r4" / "README.md").read_text()


@pytest.mark.slow
def test_base_out_writes_a_transformers_folder(run_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlora_cli.model.base import load_base

    result = mlora("export", run_dir, "r4", "--base-out", tmp_path / "base")
    assert result.exit_code == 0, result.output
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tmp_path / "base"), AutoTokenizer.from_pretrained(
        tmp_path / "base")
    builtin = load_base("builtin:micro")
    assert tokenizer(PROMPT).input_ids == builtin.tokenizer(PROMPT).input_ids
    torch.testing.assert_close(logits(model, tokenizer), logits(builtin.model, builtin.tokenizer), atol=0, rtol=0)
    card = (run_dir / "adapters" / "r4" / "README.md").read_text()
    assert f"base = AutoModelForCausalLM.from_pretrained('{(tmp_path / 'base').resolve()}')" in card
    # A folder that holds something else is not replaced.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    refused = mlora("export", run_dir, "--base-out", tmp_path / "notes")
    assert refused.exit_code == 2 and "exists and is not a model folder" in refused.output
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


@pytest.mark.slow
def test_vllm_check_flags_ranks_above_the_limit_and_prints_the_serve_command(run_dir: Path) -> None:
    result = mlora("export", run_dir, "--check-vllm", "--max-lora-rank", "8")
    assert result.exit_code == 1, result.output  # an adapter would not load
    lines = result.output.splitlines()
    assert "vLLM 0.33.0 multi-LoRA serving, --max-lora-rank 8:" in lines
    assert "ok  r4 (rank 4)" in lines
    assert "no  r16 (rank 16): rank 16 > --max-lora-rank 8 (serve it with --max-lora-rank 16)" in lines
    assert "no  r8-olora (rank 16): rank 16 > --max-lora-rank 8 (serve it with --max-lora-rank 16)" in lines
    (serve,) = [line for line in lines if line.startswith("vllm serve ")]
    adapter = (run_dir / "adapters" / "r4").resolve()
    assert serve == f"vllm serve BASE_DIR --enable-lora --max-lora-rank 8 --max-loras 1 --lora-modules r4={adapter}"
    assert any(line.startswith("BASE_DIR: builtin:micro is built in code") for line in lines)

    everything = mlora("export", run_dir, "--check-vllm")  # vLLM's default max_lora_rank, 16, holds them all
    assert everything.exit_code == 0, everything.output
    assert "--max-lora-rank 16 --max-loras 3 --lora-modules r4=" in everything.output
    wrong = mlora("export", run_dir, "--check-vllm", "--max-lora-rank", "4")
    assert wrong.exit_code == 2 and "--max-lora-rank: vLLM 0.33.0 takes one of 1, 8, 16" in wrong.output


@pytest.mark.slow
def test_push_to_hub_uploads_each_adapter_folder_with_its_card(run_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    from huggingface_hub import HfApi

    calls: list[tuple[str, dict[str, Any]]] = []
    cards: dict[str, str] = {}

    def create_repo(self: HfApi, repo_id: str, **kwargs: Any) -> None:
        calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self: HfApi, **kwargs: Any) -> None:
        calls.append(("upload_folder", kwargs))
        cards[kwargs["repo_id"]] = (Path(kwargs["folder_path"]) / "README.md").read_text()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    result = mlora("export", run_dir, "r4", "r16", "--push-to-hub", "someone/micro")
    assert result.exit_code == 0, result.output
    assert [(kind, call["repo_id"]) for kind, call in calls] == [
        ("create_repo", "someone/micro-r4"), ("upload_folder", "someone/micro-r4"),
        ("create_repo", "someone/micro-r16"), ("upload_folder", "someone/micro-r16")]
    assert calls[0][1]["exist_ok"] is True
    assert calls[1][1]["folder_path"] == str(run_dir / "adapters" / "r4")
    assert calls[3][1]["folder_path"] == str(run_dir / "adapters" / "r16")
    assert "model = PeftModel.from_pretrained(base, 'someone/micro-r4')" in cards["someone/micro-r4"]
    assert "uploaded: https://huggingface.co/someone/micro-r16" in result.output

    def offline(self: HfApi, **kwargs: Any) -> None:
        raise OSError("no network\nmore detail")

    monkeypatch.setattr(HfApi, "upload_folder", offline)
    failed = mlora("export", run_dir, "r4", "--push-to-hub", "someone/micro")
    assert failed.exit_code == 1
    assert failed.stderr.splitlines() == ["--push-to-hub: someone/micro-r4: OSError: no network"]
    invalid = mlora("export", run_dir, "r4", "--push-to-hub", "a/b/c")
    assert invalid.exit_code == 2 and invalid.output.startswith("--push-to-hub: a/b/c-r4: ")


@pytest.mark.slow
def test_an_unknown_adapter_is_one_line_and_exit_2(run_dir: Path, tmp_path: Path) -> None:
    result = mlora("export", run_dir, "r44")
    assert result.exit_code == 2
    assert result.output.splitlines() == [f"r44: no such adapter in {run_dir} (did you mean 'r4'?)"]
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "adapters" / "r16")  # as if it had failed
    missing = mlora("export", copy, "r16")
    assert missing.exit_code == 2 and missing.output.splitlines() == [
        f"r16: no final adapter in {copy / 'adapters'} (status done)"]
    assert mlora("export", tmp_path / "nowhere").output.splitlines() == [f"{tmp_path / 'nowhere'}: no such run folder"]
    (tmp_path / "empty").mkdir()
    assert mlora("export", tmp_path / "empty").output.splitlines() == [
        f"{tmp_path / 'empty'}: not a run folder (no sweep.resolved.yaml)"]
