"""Our own Llama-family forward pass against transformers (fp32, CPU).

Tiny random Llama / Mistral / Qwen2 checkpoints written by `save_pretrained` must give the same logits in
loraplex as in transformers: at every prompt position (one full prefill), at each decode step (paged KV
cache), and with the prompt prefilled in chunks. Unsupported architectures and RoPE types are refused by
name. Finally the embedded default model (SmolLM2-135M-Instruct) generates transformers' greedy tokens.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from loraplex import LLM, SamplingParams
from loraplex.errors import ModelLoadError, UnsupportedModelError
from loraplex.models.config import SUPPORTED_ARCHITECTURES

VOCAB = 320
PROMPT_LEN = 40  # longer than the sliding windows (8) and than several KV blocks
NEW_TOKENS = 8
ATOL = 1e-4  # fp32; observed max differences are 0.6-1.6e-5 on logits reaching |20|-|60|


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Run this module on one intra-op thread: on a small shared CPU, torch's threads wait on each other
    whenever another process holds a core (observed 3x-50x slowdowns); one thread keeps it fast everywhere."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- tiny checkpoints -----------------------------------------------------------------------------


def save_tokenizer(out: Path, vocab: int) -> None:
    """A word-level tokenizer with one token per id ("t0" ... "t{vocab-1}"): the engine needs one to start."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(out)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """O(1) activations and logits of spread ~4-8: HF's 0.02-std init gives near-uniform logits that hide errors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.5 * noise)
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(noise if "embed_tokens" in name else 0.5 * noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[1]))


@dataclass
class Tiny:
    dir: Path
    hf: Any  # the transformers model whose weights were saved to `dir`


BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, tie_word_embeddings=False)

LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)
LINEAR_ROPE = dict(rope_type="linear", rope_theta=500.0, factor=4.0)
DEFAULT_ROPE_1E6 = dict(rope_type="default", rope_theta=1e6)

# name -> (config class name, overrides of BASE, save_pretrained kwargs)
CASES: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "llama_gqa_untied": ("LlamaConfig", {}, {}),
    "llama_mha_tied": ("LlamaConfig", dict(num_key_value_heads=4, tie_word_embeddings=True), {}),
    "llama_rope_linear": ("LlamaConfig", dict(rope_parameters=LINEAR_ROPE), {}),
    "llama_rope_llama3": ("LlamaConfig", dict(rope_parameters=LLAMA3_ROPE), {}),
    "llama_head_dim_32": ("LlamaConfig", dict(head_dim=32), {}),  # q/k/v width 128 != hidden 64
    "llama_attention_bias": ("LlamaConfig", dict(attention_bias=True), {}),  # bias on q, k, v and o_proj
    "llama_sharded": ("LlamaConfig", dict(num_key_value_heads=1), dict(max_shard_size="40KB")),
    "mistral_sliding_window": ("MistralConfig", dict(sliding_window=8, rope_parameters=DEFAULT_ROPE_1E6), {}),
    "qwen2_qkv_bias_tied": ("Qwen2Config", dict(tie_word_embeddings=True), {}),
    "qwen2_sliding_layers": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1), {}),
}


def build_tiny(out: Path, config_cls: str, overrides: dict[str, Any], save_kwargs: dict[str, Any],
               seed: int = 0) -> Tiny:
    import transformers

    cfg = getattr(transformers, config_cls)(**{**BASE, **overrides})
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    randomize(hf, seed)
    hf.save_pretrained(out, **save_kwargs)
    save_tokenizer(out, VOCAB)
    return Tiny(out, hf)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Tiny]:
    """Each case's checkpoint, built once per module."""
    root = tmp_path_factory.mktemp("tiny")
    built: dict[str, Tiny] = {}

    def get(case: str) -> Tiny:
        if case not in built:
            cls, overrides, save_kwargs = CASES[case]
            built[case] = build_tiny(root / case, cls, overrides, save_kwargs)
        return built[case]

    return get


def variant(src: Path, dst: Path, edit_config: Callable[[dict[str, Any]], None] | None = None,
            skip: tuple[str, ...] = ()) -> Path:
    """`dst`: links to `src`'s files (minus `skip`), with config.json rewritten by `edit_config`."""
    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        if f.name not in skip and f.name != "config.json":
            (dst / f.name).symlink_to(f)
    cfg = json.loads((src / "config.json").read_text())
    if edit_config is not None:
        edit_config(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def engine(model_dir: Path, **kw: Any) -> LLM:
    kw = {"dtype": "float32", "enable_lora": False, "kv_cache_memory": 4 << 20, "max_model_len": 128,
          "block_size": 8, **kw}
    return LLM(str(model_dir), **kw)


def prompt_ids(seed: int = 1, n: int = PROMPT_LEN) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def hf_logits(hf: Any, ids: list[int]) -> torch.Tensor:
    return hf(torch.tensor([ids])).logits[0].float()


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    # The tolerance means something only if the logits are far from uniform.
    assert ref.std() > 1.0, "reference logits are too flat for the comparison to be meaningful"
    err = (ours - ref).abs().max().item()
    assert err < ATOL, f"max |ours - transformers| = {err:.3g}"


@dataclass
class Run:
    tokens: list[int]
    logits: torch.Tensor  # [NEW_TOKENS, V]: the logits each token was sampled from
    forwards: int  # forward passes the engine ran


def greedy_run(llm: LLM, ids: list[int], n: int = NEW_TOKENS) -> Run:
    """Greedy-generate n tokens (EOS banned, as with transformers' min_new_tokens), capturing the sampled logits."""
    model = llm.engine.runner.model
    rows: list[torch.Tensor] = []
    calls = 0

    def hook(_m: torch.nn.Module, _a: Any, out: torch.Tensor) -> None:
        nonlocal calls
        calls += 1
        rows.append(out.detach().clone())  # before sampling bans EOS in place

    handle = model.register_forward_hook(hook)
    try:
        out = llm.generate([ids], SamplingParams(max_tokens=n, min_tokens=n, temperature=0))[0]
    finally:
        handle.remove()
    return Run(out.outputs[0].token_ids, torch.cat(rows), calls)


def hf_greedy(hf: Any, ids: list[int], n: int = NEW_TOKENS) -> list[int]:
    x = torch.tensor([ids])
    out = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                      do_sample=False)
    return out[0, len(ids):].tolist()


# ---- logits parity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_prompt_logits_match_transformers(case: str, tiny: Callable[[str], Tiny]) -> None:
    """One full prefill: our logits at every prompt position equal transformers' within 1e-4."""
    t = tiny(case)
    ids = prompt_ids()
    ours = engine(t.dir).engine.prompt_logits(ids)
    assert_close(ours, hf_logits(t.hf, ids))


@pytest.mark.parametrize("case", list(CASES))
def test_decode_steps_match_transformers(case: str, tiny: Callable[[str], Tiny]) -> None:
    """Prefill then decode through the paged KV cache: each step's logits equal transformers' full forward
    over the same tokens, and the greedy tokens are transformers' generate(do_sample=False)."""
    t = tiny(case)
    ids = prompt_ids(seed=2)
    run = greedy_run(engine(t.dir), ids)
    assert run.forwards == NEW_TOKENS  # one prefill, then one forward per decoded token
    ref = hf_logits(t.hf, ids + run.tokens[:-1])[len(ids) - 1 :]
    assert_close(run.logits, ref)
    assert run.tokens == hf_greedy(t.hf, ids)


@pytest.mark.parametrize("case", ["llama_gqa_untied", "mistral_sliding_window", "qwen2_sliding_layers"])
@pytest.mark.parametrize("budget", [16, 7])
def test_chunked_prefill_matches_whole_prefill(case: str, budget: int, tiny: Callable[[str], Tiny]) -> None:
    """A prompt prefilled in chunks (max_num_batched_tokens < prompt, chunks not block-aligned for 7) gives the
    same tokens as one whole prefill, and logits equal to it and to transformers."""
    t = tiny(case)
    ids = prompt_ids(seed=3)
    whole = greedy_run(engine(t.dir), ids)
    chunked = greedy_run(engine(t.dir, max_num_batched_tokens=budget), ids)
    assert chunked.forwards == math.ceil(len(ids) / budget) + NEW_TOKENS - 1  # it really was chunked
    assert chunked.tokens == whole.tokens
    assert (chunked.logits - whole.logits).abs().max().item() < 1e-5
    assert_close(chunked.logits, hf_logits(t.hf, ids + chunked.tokens[:-1])[len(ids) - 1 :])


def test_batched_prompts_of_different_lengths_match_transformers(tiny: Callable[[str], Tiny]) -> None:
    """Several prompts of different lengths decoded in one batch (padded attention groups) each get
    transformers' greedy tokens."""
    t = tiny("mistral_sliding_window")
    prompts = [prompt_ids(seed=10 + i, n=n) for i, n in enumerate([5, 40, 17, 9])]
    params = SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0)
    outs = engine(t.dir, max_num_batched_tokens=32).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(t.hf, p) for p in prompts]


# ---- the features the cases cover really matter ------------------------------------------------------


def test_checkpoint_is_sharded(tiny: Callable[[str], Tiny]) -> None:
    """The sharded case really is split over several safetensors files listed by an index."""
    d = tiny("llama_sharded").dir
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (d / "model.safetensors").exists()


@pytest.mark.parametrize("case", ["mistral_sliding_window", "qwen2_sliding_layers"])
def test_sliding_window_changes_logits(case: str, tiny: Callable[[str], Tiny], tmp_path: Path) -> None:
    """Dropping the window from the config changes our logits beyond the window (only there), so the parity
    tests of the sliding-window cases do check the window."""
    def full_attention(cfg: dict[str, Any]) -> None:
        cfg["sliding_window"], cfg["use_sliding_window"] = None, False
        cfg.pop("layer_types", None)

    t = tiny(case)
    ids = prompt_ids()
    windowed = engine(t.dir).engine.prompt_logits(ids)
    full = engine(variant(t.dir, tmp_path / "full", full_attention)).engine.prompt_logits(ids)
    assert torch.equal(windowed[:8], full[:8])
    assert (windowed[8:] - full[8:]).abs().max() > 100 * ATOL


@pytest.mark.parametrize("case", ["llama_rope_linear", "llama_rope_llama3"])
def test_rope_scaling_changes_logits(case: str, tiny: Callable[[str], Tiny], tmp_path: Path) -> None:
    """Unscaled RoPE on the same weights gives logits far from the scaled ones, so the parity tests of the
    scaled cases do check the scaling."""
    def unscaled(cfg: dict[str, Any]) -> None:
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg["rope_parameters"]["rope_theta"]}

    t = tiny(case)
    ids = prompt_ids()
    scaled = engine(t.dir).engine.prompt_logits(ids)
    plain = engine(variant(t.dir, tmp_path / "plain", unscaled)).engine.prompt_logits(ids)
    assert (scaled - plain).abs().max() > 100 * ATOL


@pytest.mark.parametrize("rope_type", ["linear", "llama3"])
def test_legacy_rope_scaling_config(rope_type: str, tiny: Callable[[str], Tiny], tmp_path: Path) -> None:
    """A pre-transformers-5 config.json (top-level rope_theta, `rope_scaling` with "type") loads to the same logits."""
    def legacy(cfg: dict[str, Any]) -> None:
        params = dict(cfg.pop("rope_parameters"))
        cfg["rope_theta"] = params.pop("rope_theta")
        params["type"] = params.pop("rope_type")
        cfg["rope_scaling"] = params

    t = tiny(f"llama_rope_{rope_type}")
    ids = prompt_ids()
    assert_close(engine(variant(t.dir, tmp_path / "legacy", legacy)).engine.prompt_logits(ids), hf_logits(t.hf, ids))


# ---- refusals -------------------------------------------------------------------------------------------


def test_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    """A GPT-2 checkpoint raises UnsupportedModelError naming it and every supported architecture."""
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": VOCAB, "n_embd": 64}))
    with pytest.raises(UnsupportedModelError) as e:
        engine(tmp_path)
    assert "GPT2LMHeadModel" in str(e.value)
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        assert arch in SUPPORTED_ARCHITECTURES and arch in str(e.value)


@pytest.mark.parametrize("style", ["rope_parameters", "rope_scaling"])
def test_unsupported_rope_type_is_refused(style: str, tmp_path: Path) -> None:
    """A YaRN-scaled config (new or legacy style) raises UnsupportedModelError naming the type."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(**BASE).to_dict()
    cfg.pop("rope_parameters", None)
    yarn = {"factor": 4.0, "original_max_position_embeddings": 64}
    if style == "rope_parameters":
        cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, **yarn}
    else:
        cfg["rope_theta"], cfg["rope_scaling"] = 10000.0, {"type": "yarn", **yarn}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="'yarn'"):
        engine(tmp_path)


def test_checkpoint_missing_a_tensor_is_refused(tiny: Callable[[str], Tiny], tmp_path: Path) -> None:
    """An untied model whose checkpoint lacks lm_head.weight fails to load instead of serving uninitialised memory."""
    from safetensors.torch import load_file, save_file

    src = tiny("llama_gqa_untied").dir
    state = load_file(str(src / "model.safetensors"))
    del state["lm_head.weight"]
    dst = variant(src, tmp_path / "no_lm_head", skip=("model.safetensors",))
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="lm_head"):
        engine(dst)


def test_generation_config_eos_ids_stop_generation(tiny: Callable[[str], Tiny], tmp_path: Path) -> None:
    """EOS ids listed only in generation_config.json (as Llama 3's are) stop generation, as in transformers."""
    src = tiny("llama_gqa_untied")
    ids = prompt_ids(seed=2)
    first = hf_greedy(src.hf, ids, 1)[0]
    dst = variant(src.dir, tmp_path / "gen_eos", skip=("generation_config.json",))
    (dst / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, first]}))
    llm = engine(dst)
    assert first in llm.engine.model_config.eos_token_ids
    out = llm.generate([ids], SamplingParams(max_tokens=NEW_TOKENS, temperature=0))[0].outputs[0]
    assert (out.token_ids, out.finish_reason) == ([first], "stop")


# ---- the embedded default model -----------------------------------------------------------------------

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "List three prime numbers."}],
    [{"role": "user", "content": "Explain what a hash table is in one sentence."}],
]
CHAT_TOKENS = 24


@pytest.fixture(scope="module")
def default_llm() -> Iterator[LLM]:
    yield LLM(dtype="float32")


@pytest.fixture(scope="module")
def default_hf(default_llm: LLM) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_llm.engine.facts.model_dir, dtype=torch.float32).eval()


def test_default_model_greedy_equals_transformers(default_llm: LLM, default_hf: Any) -> None:
    """SmolLM2-135M-Instruct in fp32, four chat prompts batched together: our greedy tokens are transformers'
    generate(do_sample=False), token for token, EOS included (both stop at EOS or after 24 tokens).

    transformers generates the four left-padded in one batch (per prompt it gives the same tokens, only slower)."""
    prompts = [default_llm.apply_chat_template(c) for c in CHATS]
    outs = default_llm.generate(prompts, SamplingParams(max_tokens=CHAT_TOKENS, temperature=0))
    pad = default_hf.generation_config.pad_token_id
    width = max(map(len, prompts))
    x = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    gen = default_hf.generate(input_ids=x, attention_mask=mask, max_new_tokens=CHAT_TOKENS, do_sample=False,
                              pad_token_id=pad)[:, width:].tolist()
    eos = default_hf.generation_config.eos_token_id
    for prompt, out, row in zip(prompts, outs, gen):
        ref = row[: row.index(eos) + 1] if eos in row else row  # finished rows are padded after their EOS
        assert out.outputs[0].token_ids == ref, default_llm.tokenizer.decode(prompt)
    assert sum(len(o.outputs[0].token_ids) for o in outs) > 2 * CHAT_TOKENS  # real answers, not instant EOS


def test_default_model_prompt_logits_match_transformers(default_llm: LLM, default_hf: Any) -> None:
    """SmolLM2 in fp32: our logits at every position of a chat prompt equal transformers' within 1e-3 (~1e-4 seen)."""
    ids = default_llm.apply_chat_template(CHATS[0])
    ours = default_llm.engine.prompt_logits(ids)
    ref = hf_logits(default_hf, ids)
    assert (ours - ref).abs().max().item() < 1e-3
