"""`loraplex train` and `loraplex merge`: loss falls, the adapter learns its targets, PEFT and loraplex agree
on it, the merged model equals adapter-on-base, training is deterministic, and bad input is named."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from loraplex import LLM, SamplingParams
from loraplex.cli import main
from loraplex.demo import QUESTIONS
from loraplex.errors import InvalidRequestError
from loraplex.training.data import IGNORE, DatasetError, load_dataset, read_jsonl
from loraplex.training.demo_data import poetry, sql
from loraplex.training.merge import merge
from loraplex.training.tenants import demo_recipe
from loraplex.training.config import TrainConfig
from loraplex.training.trainer import train

pytestmark = pytest.mark.slow  # the whole file: its tests share trainings of ~30 s on 2 cores

TINY = dict(rank=8, alpha=16.0, dropout=0.0, epochs=4, lr=3e-3, batch_size=8, max_length=96, seed=0, progress=False)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[float]]:
    """A small SQL tenant: 16 examples, 8 steps."""
    root = tmp_path_factory.mktemp("train")
    data = _jsonl(root / "sql.jsonl", sql()[:16])
    result = train(TrainConfig(data=data, output=root / "adapter", **TINY))  # type: ignore[arg-type]
    return data, result.output, result.losses


def test_loss_decreases(trained: tuple[Path, Path, list[float]]) -> None:
    _, out, losses = trained
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < 0.5 * sum(losses[:2]) / 2
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert json.loads((out / "training_log.json").read_text())["losses"] == losses


def token_accuracy(llm: LLM, data: Path, adapter: str | None, max_length: int, count: int = 8) -> float:
    """Teacher-forced accuracy: how often the greedy next token is the completion's, over `count` training examples."""
    hits = total = 0
    for ex in load_dataset(data, llm.tokenizer, max_length)[:count]:
        targets = torch.tensor(ex.labels[1:])
        mask = targets != IGNORE
        pred = llm.engine.prompt_logits(ex.input_ids, adapter=adapter)[:-1].argmax(-1)
        hits += int((pred[mask] == targets[mask]).sum())
        total += int(mask.sum())
    return hits / total


def test_adapter_learns_its_targets(trained: tuple[Path, Path, list[float]]) -> None:
    """On the training prompts, the adapter's greedy next-token predictions hit the completion tokens more often
    than the base model's (teacher-forced token accuracy)."""
    data, adapter, _ = trained
    llm = LLM(dtype="float32", lora_modules={"sql": str(adapter)})
    base_acc, sql_acc = token_accuracy(llm, data, None, 96), token_accuracy(llm, data, "sql", 96)
    assert sql_acc > base_acc + 0.2, (base_acc, sql_acc)


def test_demo_recipe_meets_the_bars(tmp_path: Path, default_model_dir: Path) -> None:
    """The recipe `make` trains the demo tenants with (two epochs, LoRA on the upper half of the layers, in the
    dtype this CPU resolves) keeps the bars above on a whole demo tenant: the loss halves, the adapter's token
    accuracy beats the base's by 0.2, and the demo's SQL question is answered with a query."""
    data = _jsonl(tmp_path / "sql.jsonl", sql())
    recipe = demo_recipe(default_model_dir)
    result = train(TrainConfig(data=data, output=tmp_path / "sql", progress=False, **recipe))  # type: ignore[arg-type]
    assert sum(result.losses[-2:]) / 2 < 0.5 * sum(result.losses[:2]) / 2
    config = json.loads((result.output / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == list(recipe["layers"])  # type: ignore[call-overload]
    llm = LLM(lora_modules={"sql": str(result.output)})
    max_length = int(recipe["max_length"])  # type: ignore[call-overload]
    base_acc, sql_acc = token_accuracy(llm, data, None, max_length), token_accuracy(llm, data, "sql", max_length)
    assert sql_acc > base_acc + 0.2, (base_acc, sql_acc)
    prompt = llm.apply_chat_template([{"role": "user", "content": QUESTIONS[0][0]}])
    answer = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0), adapters="sql")[0].outputs[0].text
    assert answer.startswith("SELECT"), answer


def test_peft_and_loraplex_agree_on_trained_adapter(trained: tuple[Path, Path, list[float]], hf_base) -> None:  # type: ignore[no-untyped-def]
    from peft import PeftModel

    _, adapter, _ = trained
    llm = LLM(dtype="float32", lora_modules={"sql": str(adapter)})
    prompt = llm.apply_chat_template([{"role": "user", "content": "Table orders(id, total). What is the average total?"}])
    ours = llm.generate([prompt], SamplingParams(max_tokens=16, min_tokens=16, temperature=0), adapters="sql")[0]
    model = PeftModel.from_pretrained(hf_base, adapter)
    try:
        ids = torch.tensor([prompt])
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                             do_sample=False)[0, len(prompt):].tolist()
    finally:
        model.unload()
    assert ours.outputs[0].token_ids == ref


def test_merged_model_equals_adapter_on_base(trained: tuple[Path, Path, list[float]], tmp_path: Path) -> None:
    """`merge` writes a directory that loraplex and transformers load as a base model; its greedy output equals the
    adapter served on the original base."""
    from transformers import AutoModelForCausalLM

    _, adapter, _ = trained
    merged = merge(adapter, tmp_path / "merged")
    assert (merged / "config.json").is_file() and list(merged.glob("*.safetensors"))
    question = [{"role": "user", "content": "Table products(id, price). How many rows are in products?"}]
    params = SamplingParams(max_tokens=16, min_tokens=16, temperature=0)
    with_adapter = LLM(dtype="float32", lora_modules={"sql": str(adapter)})
    prompt = with_adapter.apply_chat_template(question)
    expected = with_adapter.generate([prompt], params, adapters="sql")[0].outputs[0].token_ids
    standalone = LLM(str(merged), dtype="float32", enable_lora=False)
    assert standalone.generate([prompt], params)[0].outputs[0].token_ids == expected
    hf = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    ids = torch.tensor([prompt])
    ref = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                      do_sample=False)[0, len(prompt):].tolist()
    assert ref == expected
    with pytest.raises(InvalidRequestError, match="exists; pass --overwrite"):
        merge(adapter, merged)


def test_training_is_deterministic(tmp_path: Path) -> None:
    """Same --seed, same adapter bytes; another seed, other weights."""
    data = _jsonl(tmp_path / "p.jsonl", poetry()[:4])
    cfg = {**TINY, "max_steps": 1, "dropout": 0.1, "max_length": 48}
    outs = [train(TrainConfig(data=data, output=tmp_path / f"a{i}", **{**cfg, "seed": s})).output  # type: ignore[arg-type]
            for i, s in enumerate([3, 3, 4])]
    blob = [(o / "adapter_model.safetensors").read_bytes() for o in outs]
    assert blob[0] == blob[1] and blob[0] != blob[2]


def test_qlora_trains_on_a_4bit_base(tmp_path: Path) -> None:
    """--qlora trains on an NF4 base (bitsandbytes, CPU) and writes a standard PEFT adapter that loraplex serves."""
    data = _jsonl(tmp_path / "s.jsonl", sql()[:4])
    result = train(TrainConfig(data=data, output=tmp_path / "q", qlora=True, **{**TINY, "max_steps": 2}))  # type: ignore[arg-type]
    assert len(result.losses) == 2 and all(l == l for l in result.losses)  # finite, no NaN
    llm = LLM(dtype="float32", lora_modules={"q": str(result.output)})
    assert llm.generate(["SELECT"], SamplingParams(max_tokens=4), adapters="q")[0].outputs[0].token_ids
    # ... and on the quantized base it was trained against (--quantize nf4 --double-quant: the same codes)
    del llm
    qllm = LLM(dtype="float32", quantization="nf4", double_quant=True, lora_modules={"q": str(result.output)})
    assert qllm.engine.facts.memory.quantization == "nf4+double-quant"
    assert qllm.generate(["SELECT"], SamplingParams(max_tokens=4), adapters="q")[0].outputs[0].token_ids


def test_loss_masks(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Loss only on assistant turns (messages) or the completion (prompt/completion); on everything for text."""
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]},
            {"prompt": "Q: 2+2? A:", "completion": " 4"}, {"text": "plain text"}]
    chat, pc, text = load_dataset(_jsonl(tmp_path / "d.jsonl", rows), tokenizer, 512)
    learned = tokenizer.decode([t for t in chat.labels if t != IGNORE])
    assert learned.startswith("Hello there") and "Hi" not in learned
    assert [t for t in pc.labels if t != IGNORE] == tokenizer.encode(" 4", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert text.labels == text.input_ids


@pytest.mark.parametrize(("content", "message"), [
    ('{"text": "ok"}\n{"text": broken}\n', r":2: malformed JSON"),
    ("\n\n", "the dataset is empty"),
    ('{"question": "x"}\n', r":1: unknown format \(keys: question\)"),
    ('[1, 2]\n', r":1: each line must be a JSON object"),
])
def test_bad_datasets(tmp_path: Path, tokenizer, content: str, message: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_dataset(path, tokenizer, 64)


def test_long_examples_are_truncated_with_a_count(tmp_path: Path, tokenizer, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    rows = [{"text": "word " * 200}, {"text": "short"}, {"prompt": "p " * 10, "completion": "c " * 100}]
    with caplog.at_level(logging.WARNING):
        examples = load_dataset(_jsonl(tmp_path / "l.jsonl", rows), tokenizer, 32)
    assert all(len(e.input_ids) <= 32 for e in examples)
    assert "2 of 3 examples are longer than --max-length 32 and were truncated" in caplog.text


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Unknown targets list the valid ones; an existing output needs --overwrite; a malformed line names its number."""
    good = _jsonl(tmp_path / "g.jsonl", sql()[:2])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "b"}\n{oops\n')
    cases = [
        (["--data", str(good), "--output", str(tmp_path / "o1"), "--targets", "q_proj", "qkv"],
         "unknown target module(s) qkv; valid: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"),
        (["--data", str(good), "--output", str(tmp_path / "out")], "exists; pass --overwrite"),
        (["--data", str(bad), "--output", str(tmp_path / "o2")], "b.jsonl:3: malformed JSON"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(["train", *args])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert (tmp_path / "out" / "keep.txt").is_file()
