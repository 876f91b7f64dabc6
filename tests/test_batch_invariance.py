"""Batch-invariant serving (issue 41): with `batch_invariant`, a request's logits have the bits they have when it
runs alone, whatever else shares its steps: base-model requests and several adapters mixed, prefills beside
decodes, and prompts whose prefix comes from the prefix cache. Compared through the log-probabilities of every
prompt and sampled token (log_softmax of the fp32 logits row: one bit of a logit changes them), in float32 and
bfloat16, on the C++ kernels and on their torch twins (a machine without a C++ compiler), and wherever a chunked
prefill splits a prompt."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from conftest import ALL, ATTN, MLP
from loraplex import LLM, EngineConfig, SamplingParams
from loraplex.engine import build
from loraplex.engine.build import batch_invariance
from loraplex.engine.facts import BatchInvariance
from loraplex.engine.outputs import RequestOutput
from loraplex.hardware import DtypeChoice
from loraplex.lora import cpu_kernel
from loraplex.models import cpu_attention, cpu_fused, cpu_gemm

Job = tuple[str, str | None, list[int], int]  # request id, adapter (None: the base model), prompt, max_tokens
SHARED = [5, 17, 99, 1000, 23, 7, 300, 41] * 4  # two full KV blocks: a prefix the cache can hold


def engine(dtype: str, adapter_factory: Callable[..., Path], **kw: object) -> LLM:
    mods = {"attn": adapter_factory("inv-attn", r=4, alpha=8, targets=ATTN, seed=71),
            "mlp": adapter_factory("inv-mlp", r=8, alpha=16, targets=MLP, seed=72),
            "all": adapter_factory("inv-all", r=16, alpha=16, targets=ALL, seed=73)}
    llm = LLM(dtype=dtype, lora_modules={k: str(v) for k, v in mods.items()}, max_loras=4, max_model_len=256,
              batch_invariant=True, **kw)  # type: ignore[arg-type]
    inv = llm.engine.facts.batch_invariance
    if not inv.enabled:
        pytest.skip(inv.detail)
    return llm


COMBOS = [("float32", "native"), ("bfloat16", "native"), pytest.param(("float32", "torch"), marks=pytest.mark.slow),
          pytest.param(("bfloat16", "torch"), marks=pytest.mark.slow)]


def torch_kernels(mp: pytest.MonkeyPatch) -> None:
    """The torch path: as on a machine where no C++ kernel is built."""
    mp.setattr(cpu_attention, "supported", lambda dtype, device: False)
    mp.setattr(cpu_kernel, "supported", lambda dtype, device: False)
    mp.setattr(cpu_fused, "supported", lambda x: False)


@pytest.fixture(scope="module", params=COMBOS, ids=["float32-native", "bfloat16-native", "float32-torch", "bfloat16-torch"])
def llm(request: pytest.FixtureRequest, adapter_factory: Callable[..., Path]) -> Iterator[LLM]:
    dtype, kernels = request.param
    with pytest.MonkeyPatch.context() as mp:
        if kernels == "torch":
            torch_kernels(mp)
        llm = engine(dtype, adapter_factory)
        assert llm.engine.runner.per_query_attention
        detail = llm.engine.facts.batch_invariance.detail
        native = kernels == "native"
        assert detail.count("through the C++ kernel") == (2 if native else 0), detail
        assert llm.engine.runner.lora_kernel == (None if native else "tokenwise")
        yield llm


def sampling(n: int, prompt: bool, seed: int | None = None) -> SamplingParams:
    """Greedy, with the log-probabilities of the sampled tokens and, with `prompt`, of the prompt's (a request
    that asks for those computes its whole prompt: it never reads the prefix cache). With `seed`: sampled at
    temperature 0.9 with top-k 40 and top-p 0.95 from that seed."""
    if seed is not None:
        return SamplingParams(max_tokens=n, temperature=0.9, top_k=40, top_p=0.95, seed=seed, ignore_eos=True,
                              logprobs=3, prompt_logprobs=3 if prompt else None)
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=3,
                          prompt_logprobs=3 if prompt else None)


def drain(llm: LLM, final: dict[str, RequestOutput]) -> None:
    while llm.engine.has_unfinished_requests():
        final.update({o.request_id: o for o in llm.engine.step() if o.finished})


def bits(out: RequestOutput) -> tuple[object, ...]:
    c = out.outputs[0]
    assert out.error is None
    return c.token_ids, c.logprobs, out.prompt_logprobs


def alone(llm: LLM, jobs: list[Job], keep_cache: bool, prompt: bool = True, seeded: bool = False
          ) -> dict[str, tuple[object, ...]]:
    solo = {}
    for rid, adapter, tokens, n in jobs:
        final: dict[str, RequestOutput] = {}
        llm.engine.add_request(tokens, sampling(n, prompt, int(rid[1:]) if seeded else None), adapter, rid)
        drain(llm, final)
        solo[rid] = bits(final[rid])
        if not keep_cache:
            llm.reset_prefix_cache()
    return solo


def together(llm: LLM, jobs: list[Job], every: int, cached: dict[str, int] | None = None, prompt: bool = True,
             seeded: bool = False) -> dict[str, tuple[object, ...]]:
    """The jobs added `every` at a time with a step between, so prefills run beside other requests' decodes.
    `cached` gets each job's prompt tokens read from the prefix cache."""
    final: dict[str, RequestOutput] = {}
    for k, (rid, adapter, tokens, n) in enumerate(jobs):
        llm.engine.add_request(tokens, sampling(n, prompt, int(rid[1:]) if seeded else None), adapter, rid + "+")
        if k % every == every - 1:
            final.update({o.request_id: o for o in llm.engine.step() if o.finished})
    drain(llm, final)
    if cached is not None:
        cached.update({rid: final[rid + "+"].num_cached_tokens for rid, _, _, _ in jobs})
    return {rid: bits(final[rid + "+"]) for rid, _, _, _ in jobs}


def random_jobs(seed: int, count: int, prefix: list[int] | None = None) -> list[Job]:
    rng = random.Random(seed)
    adapters = [None, "attn", "mlp", "all"]
    return [(f"j{i}", rng.choice(adapters),
             (prefix if prefix is not None and i % 2 else []) + [rng.randrange(100, 40000)
                                                                  for _ in range(rng.randrange(1, 40))],
             rng.randrange(1, 6)) for i in range(count)]


@pytest.mark.parametrize("seed", [0, 1])
def test_every_rows_bits_are_its_own_whatever_shares_the_batch(llm: LLM, seed: int) -> None:
    """Random requests (base and three adapters of different targets and ranks; prompts of 1 to 39 tokens; 1 to 5
    tokens each) alone, then together in steps of 2 to 150 rows that mix prefill and decode: every prompt and
    sampled token's log-probabilities are equal, bit for bit."""
    llm.reset_prefix_cache()
    jobs = random_jobs(seed, 16)
    solo = alone(llm, jobs, keep_cache=False)
    assert together(llm, jobs, every=3 + seed) == solo


def test_seeded_sampling_draws_the_same_tokens_whatever_shares_the_batch(llm: LLM) -> None:
    """Seeded requests sampled with temperature, top-k and top-p (each from its own generator, over its own logits
    row): alone and together, the same tokens and log-probabilities, bit for bit."""
    llm.reset_prefix_cache()
    jobs = random_jobs(6, 10)
    solo = alone(llm, jobs, keep_cache=False, seeded=True)
    assert together(llm, jobs, every=3, seeded=True) == solo


def test_a_cached_prefix_gives_the_bits_of_the_requests_own_prefill(llm: LLM) -> None:
    """Half the requests share a two-block prefix. Alone, each computes its prefix itself (the cache emptied before
    each); together, after a request per adapter has left the prefix in the cache, they read it from there: the
    bits are the same."""
    llm.reset_prefix_cache()
    jobs = random_jobs(2, 12, SHARED)
    solo = alone(llm, jobs, keep_cache=False, prompt=False)
    alone(llm, [(f"warm-{a}", a, SHARED + [1], 1) for a in (None, "attn", "mlp", "all")], keep_cache=True)
    cached: dict[str, int] = {}
    assert together(llm, jobs, every=2, cached=cached, prompt=False) == solo
    assert sum(n >= len(SHARED) for n in cached.values()) >= 3, cached


def test_where_a_chunked_prefill_splits_changes_no_bit(llm: LLM, adapter_factory: Callable[..., Path]) -> None:
    """An engine whose steps hold 24 tokens splits every prompt longer than that, at places that depend on what
    else is queued; its answers equal, bit for bit, the unsplit solo answers of the engine with 512-token steps
    (prompt queries and decode queries all attend through one kernel, per query, in key order)."""
    llm.reset_prefix_cache()
    jobs = random_jobs(3, 12, SHARED)
    solo = alone(llm, jobs, keep_cache=False)
    chunked = engine(str(llm.engine.facts.dtype), adapter_factory, max_num_batched_tokens=24,
                     enable_prefix_caching=False)
    assert max(len(prompt) for _, _, prompt, _ in jobs) > 2 * 24
    assert together(chunked, jobs, every=2) == solo


def test_the_batch_invariant_path_computes_the_same_logits(adapter_factory: Callable[..., Path]) -> None:
    """Per-query attention and tiled linears are another order of the same sums: the logits at every prompt
    position equal the default path's to float32 rounding, for the base model and an adapter."""
    tiled = engine("float32", adapter_factory)
    default = LLM(dtype="float32", lora_modules={"all": str(adapter_factory("inv-all"))}, max_model_len=256)
    prompt = random_jobs(4, 1, SHARED)[0][2] * 2
    for adapter in (None, "all"):
        ours, ref = tiled.engine.prompt_logits(prompt, adapter), default.engine.prompt_logits(prompt, adapter)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_float16_serves_batch_invariant_through_the_torch_twins(adapter_factory: Callable[..., Path]) -> None:
    """The C++ kernels do not take float16, so their torch twins serve it (and F.linear, in tiles of one row on this
    CPU): random mixed batches get their solo bits."""
    llm = engine("float16", adapter_factory)
    assert llm.engine.runner.per_query_attention and llm.engine.runner.lora_kernel == "tokenwise"
    jobs = random_jobs(7, 12)
    solo = alone(llm, jobs, keep_cache=False)
    assert together(llm, jobs, every=3) == solo


@pytest.mark.slow
@pytest.mark.parametrize("base", ["plain", "nf4", "int8", "gguf", "bf16-weights"])
def test_plain_and_quantized_base_linears_run_in_their_own_row_tiles(base: str, adapter_factory: Callable[..., Path],
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      request: pytest.FixtureRequest) -> None:
    """Without oneDNN's packed linear (bf16 on an AVX2 CPU), F.linear runs in the row tiles probed for it; a quantized
    base through its kernel: nf4's fused kernel (a fixed order per row, calls never cut), int8 in bf16 torch's
    weight-only int8 kernel in its probed tiles, the GGUF file's own Q4_1 blocks (bf16) through the fused GGUF
    kernel, a bf16 checkpoint's weights kept in bf16 in an fp32 model (auto on a CPU without native bf16) through the
    kernel that widens them. Random mixed batches get their solo bits there too."""
    if base == "plain":
        monkeypatch.setattr(cpu_gemm, "supported", lambda weight: False)
    if base == "bf16-weights":
        fp32 = DtypeChoice(torch.float32, "auto", "this CPU has no native bf16 (AVX2)", True)
        monkeypatch.setattr(build, "resolve_dtype", lambda name, device: fp32)
        llm = engine("auto", adapter_factory, model=str(request.getfixturevalue("bf16_checkpoint")))
        assert llm.engine.facts.memory.quantization == "bf16-weights"
    else:
        llm = engine("bfloat16" if base in ("int8", "gguf") else "float32", adapter_factory,
                     **({} if base == "plain" else {"quantization": base}))
    model = llm.engine.runner.model
    assert all(t is not None for t in model.linear_tilings())
    # The tied head is oneDNN-packed wherever its dtype packs here (not bf16 on AVX2); else it too runs in tiles.
    # A GGUF base's head is the file's blocks, a bf16 checkpoint's its bf16 rows, through the kernel.
    packs = base not in ("plain", "gguf", "bf16-weights") and cpu_gemm.supported(model.embed_tokens.weight)
    assert (model.head_packed is not None) == packs
    jobs = random_jobs(5, 12)
    solo = alone(llm, jobs, keep_cache=False)
    assert together(llm, jobs, every=3) == solo


def test_on_a_gpu_it_is_off_and_says_why() -> None:
    """On a GPU the base linears' libraries pick their summation order by the number of rows: asked for, batch
    invariance is reported off, naming why (the engine then serves without it)."""
    model = LLM(dtype="float32", max_model_len=128, batch_invariant=True).engine.runner.model
    inv = batch_invariance(model, EngineConfig(batch_invariant=True), torch.device("cuda"))
    assert not inv.enabled and inv.detail == ("requested but not available on a GPU (its GEMM libraries pick their "
                                              "summation order by the number of rows)")
    assert batch_invariance(model, EngineConfig(), torch.device("cpu")) == BatchInvariance(
        False, "off (--batch-invariant turns it on)")
