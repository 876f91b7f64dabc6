"""Non-finite values never cross a request boundary, and one failing request fails alone.

Kernels: NaN planted in stale KV rows (freed blocks, the tail of a partial block, block-table padding) and in
the slots and rows a step does not use leaves the paged attention (torch path and C++ kernel) and the LoRA
kernels (grouped torch path and C++ fused kernel) equal to their references. Loading: an adapter whose
effective weights (B * lora_alpha/r) overflow or exceed the bound is refused naming the layer and the value.
Engine, in float32 and bfloat16, on the C++ (batch-invariant) and the torch paths: a request whose activations
become NaN or inf (weights that overflow on its input; NaN appearing mid-sequence) ends with NonFiniteOutputError,
every other request in its batch gets its solo tokens, and so does every later request, on the freed KV blocks
and the same device slot. A bug in one request's step work fails that request only.
"""

from __future__ import annotations

import json
import math
import shutil
from typing import Any
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from conftest import ALL, ATTN, kernel_case
from loraplex import LLM, EngineConfig, SamplingParams
from loraplex.adapters import peft_format
from loraplex.adapters.peft_format import MAX_EFFECTIVE_WEIGHT, load_peft_adapter
from loraplex.engine import detokenizer
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.outputs import RequestOutput
from loraplex.errors import AdapterFormatError, NonFiniteOutputError
from loraplex.lora import cpu_kernel
from loraplex.lora.mapping import build_mapping
from loraplex.lora.ops import lora_fused, lora_grouped, lora_reference
from loraplex.models import cpu_attention, cpu_fused
from loraplex.models.attention import PagedAttention
from loraplex.models.batch import AttentionGroup

BS = 4  # attention unit tests: small blocks, so sequences end inside partial blocks


# ---- attention: stale KV rows ------------------------------------------------------------------------------

def stale_case(lens: list[int], q_lens: list[int], dtype: torch.dtype, seed: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Caches [S, 3, 16] full of NaN except each sequence's positions [0, len); q [sum(q_lens), 9, 16] for the
    last q_len positions of each; block tables [B, NB] (scattered blocks, padding 0: a block of another
    sequence); and the same caches clean (random in place of NaN) for the reference."""
    g = torch.Generator().manual_seed(seed)
    nb = max(-(-n // BS) for n in lens)
    blocks = torch.randperm(2 * len(lens) * nb, generator=g)[: len(lens) * nb].view(len(lens), nb)
    for i, n in enumerate(lens):
        blocks[i, -(-n // BS):] = 0
    slots = 2 * len(lens) * nb * BS
    k_clean, v_clean = (torch.randn(slots, 3, 16, generator=g).to(dtype) for _ in range(2))
    k, v = torch.full_like(k_clean, float("nan")), torch.full_like(v_clean, float("nan"))
    for i, n in enumerate(lens):
        pos = torch.arange(n)
        rows = blocks[i, pos // BS] * BS + pos % BS
        k[rows], v[rows] = k_clean[rows], v_clean[rows]
    q = torch.randn(sum(q_lens), 9, 16, generator=g).to(dtype)
    return q, k, v, k_clean, v_clean, blocks


def attend_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: torch.Tensor, lens: list[int],
                     q_lens: list[int]) -> torch.Tensor:
    """Per sequence and query, in fp32, over its own keys [0, position] only: softmax(q k^T / 4) v."""
    out, row = torch.empty(q.shape), 0
    for i, (n, ql) in enumerate(zip(lens, q_lens)):
        for p in range(n - ql, n):
            pos = torch.arange(p + 1)
            slots = tables[i, pos // BS] * BS + pos % BS
            kk = k[slots].float().repeat_interleave(3, dim=1)  # [P, H, D]
            vv = v[slots].float().repeat_interleave(3, dim=1)
            scores = torch.einsum("hd,nhd->hn", q[row].float(), kk) / 4
            out[row] = torch.einsum("hn,nhd->hd", scores.softmax(-1), vv)
            row += 1
    return out


def torch_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: torch.Tensor, lens: list[int],
                 q_lens: list[int]) -> torch.Tensor:
    """PagedAttention's torch path over one padded group, with masks and indices laid out as the runner does."""
    b, q_max, nb = len(lens), max(q_lens), tables.shape[1]
    attn = PagedAttention(9, 3, 16, None)
    attn.k_cache, attn.v_cache, attn.block_size = k, v, BS
    qpos = torch.zeros(b, q_max, dtype=torch.long)
    token_index = torch.zeros(b, q_max, dtype=torch.long)
    start = 0
    for i, (n, ql) in enumerate(zip(lens, q_lens)):
        qpos[i, :ql] = torch.arange(n - ql, n)
        token_index[i, :ql] = torch.arange(start, start + ql)
        start += ql
    valid = torch.arange(q_max)[None, :] < torch.tensor(q_lens)[:, None]
    masked = torch.arange(nb * BS)[None, None, :] > qpos[:, :, None]
    uniform = all(n == q_max for n in q_lens)
    group = AttentionGroup(token_index=None if uniform else token_index, start=0, num_seqs=b, q_len=q_max,
                           block_tables=tables, masks={None: masked[:, None, None]},
                           valid=None if uniform else valid, context_lens=torch.tensor(lens))
    out = torch.zeros_like(q)
    attn._attend_group(q, out, group)
    return out


def close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    tol = 1e-5 if ours.dtype == torch.float32 else 2e-2
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours.float(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("lens", "q_lens"), [([5, 9, 2], [1, 1, 1]), ([7, 12, 3], [7, 4, 1])],
                         ids=["decode", "prefill"])
def test_torch_attention_never_reads_stale_nan_rows(dtype: torch.dtype, lens: list[int], q_lens: list[int]) -> None:
    """NaN in every cache row outside the sequences' own positions (their partial blocks' tails, other blocks, the
    padding block): the torch path, decode and prefill (chunks of different lengths, padded queries), equals the
    reference computed on clean caches."""
    q, k, v, k_clean, v_clean, tables = stale_case(lens, q_lens, dtype)
    close(torch_attend(q, k, v, tables, lens, q_lens), attend_reference(q, k_clean, v_clean, tables, lens, q_lens))


@pytest.mark.skipif(cpu_attention.library() is None, reason="no C++ compiler to build the kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_decode_kernel_never_reads_stale_nan_rows(dtype: torch.dtype) -> None:
    """The C++ paged decode kernel reads each sequence's keys up to its context length only: NaN everywhere else
    leaves it equal to the reference and to the torch path."""
    lens = [5, 9, 2, 16]
    q, k, v, k_clean, v_clean, tables = stale_case(lens, [1] * 4, dtype, seed=1)
    out = torch.empty_like(q)
    cpu_attention.paged_decode(q, k, v, tables, torch.tensor(lens), BS, None, 0.25, out)
    ref = attend_reference(q, k_clean, v_clean, tables, lens, [1] * 4)
    close(out, ref)
    close(torch_attend(q, k, v, tables, lens, [1] * 4), ref)


# ---- LoRA kernels: unused slots and padded rows ------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_lora_never_adds_a_padded_row(dtype: torch.dtype) -> None:
    """Slots [0, 1, 2, 4] are read as the range 0..4: slot 3, unused, holds NaN, and token 0 (a base-model
    token, the padding rows' gather source) holds NaN activations. No real token's output changes, and the base
    token's LoRA term is exactly 0."""
    slots = [-1, 0, 1, 2, 4, 4, 0]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(len(slots), 64, generator=g)
    a, b = torch.randn(5, 8, 64, generator=g) / 8, torch.randn(5, 8, 48, generator=g) / 3
    ref = lora_reference(x, a, b, torch.tensor(slots)).float()
    x[0], a[3], b[3] = float("nan"), float("nan"), float("nan")
    m = build_mapping(slots, dtype, kernel="grouped")
    assert m is not None and m.span == slice(0, 5) and m.grouped is not None and m.grouped.rows is not None
    y = lora_grouped(x.to(dtype), a.to(dtype), b.to(dtype), m).float()
    assert torch.all(y[0] == 0)
    close(y[1:].to(dtype), ref[1:])


@pytest.mark.skipif(cpu_kernel.library() is None, reason="no C++ compiler to build the kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cpu_lora_reads_only_slots_and_rows_in_use(dtype: torch.dtype) -> None:
    """The C++ fused kernel reads the slots in use, their ranks and their tokens only: NaN in an unused slot, in
    rank rows past a slot's rank and in base tokens' activations changes nothing."""
    x, a, b, layout, slots = kernel_case("qkv", "with_base", 9, torch.float32)
    ref = lora_reference(x, a, b, torch.tensor(slots)).float()
    base = [i for i, s in enumerate(slots) if s < 0]
    assert base
    a, b = torch.cat([a, torch.full_like(a[:1], float("nan"))]), torch.cat([b, torch.full_like(b[:1], float("nan"))])
    x[base] = float("nan")
    shape = layout.shape
    shape.a_part(a[1], 0)[5:] = float("nan")  # slot 1 has rank 5 of max_rank 8: rows 5.. are never read
    layout = type(layout).on(shape, 4, "cpu", torch.cat([layout.ranks, torch.zeros(1, 3, dtype=torch.int32)]))
    m = build_mapping(slots, dtype, kernel="fused")
    out = lora_fused(x.to(dtype), a.to(dtype), shape.to_compact(b).to(dtype), m, layout).float()  # type: ignore[arg-type]
    assert torch.all(out[base] == 0)
    real = [i for i, s in enumerate(slots) if s >= 0]
    close(out[real].to(dtype), ref[real])


# ---- loading: effective weights ----------------------------------------------------------------------------

def crafted(src: Path, dst: Path, config: dict[str, object] | None = None,
            tensors: Callable[[dict[str, torch.Tensor]], None] | None = None) -> Path:
    """A copy of adapter `src` with adapter_config.json keys replaced and its tensors edited in place."""
    from safetensors.torch import load_file, save_file

    if dst.exists():
        return dst
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(config or {})
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        data = load_file(str(dst / "adapter_model.safetensors"))
        tensors(data)
        save_file(data, str(dst / "adapter_model.safetensors"))
    return dst


def fill(a: float, b: float) -> Callable[[dict[str, torch.Tensor]], None]:
    """Every lora_A element = a and every lora_B element = b: finite, the same sign everywhere, so they add up."""
    def edit(data: dict[str, torch.Tensor]) -> None:
        for key, t in data.items():
            t.fill_(a if "lora_A" in key else b)
    return edit


def first(data: dict[str, torch.Tensor], part: str) -> str:
    return sorted(k for k in data if part in k)[0]


@pytest.fixture(scope="module")
def good(adapter_factory: Callable[..., Path]) -> Path:
    return adapter_factory("iso-good", r=8, alpha=16, targets=ALL, seed=51)


@pytest.fixture(scope="module")
def shapes(good: Path) -> dict[tuple[int, str], tuple[int, int]]:
    cfg = EngineConfig(dtype="float32")
    from loraplex.engine.build import build_model

    return build_model(cfg).lora_shapes


BAD_CONFIGS: list[tuple[str, dict[str, object], Callable[[dict[str, torch.Tensor]], None] | None, str]] = [
    ("huge_alpha", {"lora_alpha": 1e300}, None,
     r"layer 0 \w+_proj: lora_alpha/r scale 1.25e\+299 makes B\*scale infinite in float32"),
    ("huge_b", {}, lambda d: d[first(d, "lora_B")].fill_(1e4),
     r"layer 0 down_proj: \|lora_B \* lora_alpha/r\| reaches 2e\+04, above the 10000 bound"),
    ("huge_a", {}, lambda d: d[first(d, "lora_A")].__setitem__((0, 0), 3e5),
     r"layer 0 down_proj: \|lora_A\| reaches 3e\+05, above the 10000 bound"),
    ("rank0", {}, lambda d: d.__setitem__(first(d, "lora_A"), torch.zeros(0, 576)),
     r"layer 0 down_proj has lora_A \(0, 576\).*rank r >= 1"),
    ("scalar", {}, lambda d: d.__setitem__(first(d, "lora_A"), torch.tensor(1.0)),
     r"layer 0 down_proj has lora_A \(\).*2-D matrices"),
    ("bad_regex", {"alpha_pattern": {"q_proj(": 8}}, None, r"alpha_pattern key 'q_proj\(' is not a valid regular"),
    ("bad_rank_regex", {"rank_pattern": {"*": 8}}, None, r"rank_pattern key '\*' is not a valid regular"),
    ("text_alpha", {"lora_alpha": "sixteen"}, None, r"lora_alpha must be a number, got 'sixteen'"),
    ("nan_alpha", {"lora_alpha": float("nan")}, None, r"scale nan makes B\*scale infinite"),
]


@pytest.mark.parametrize(("case", "config", "edit", "message"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_effective_weights_and_config_mistakes_are_refused_at_load(
        good: Path, shapes: dict[tuple[int, str], tuple[int, int]], tmp_path_factory: pytest.TempPathFactory,
        case: str, config: dict[str, object], edit: Callable[[dict[str, torch.Tensor]], None] | None,
        message: str) -> None:
    """Each is an AdapterFormatError (HTTP 400) naming the layer, part and value, never a crash (500)."""
    path = crafted(good, tmp_path_factory.mktemp("bad") / case, config, edit)
    with pytest.raises(AdapterFormatError, match=message):
        load_peft_adapter(case, path, shapes, 16)


@pytest.mark.slow
def test_real_adapters_sit_far_below_the_bound(adapter_factory: Callable[..., Path],
                                               shapes: dict[tuple[int, str], tuple[int, int]]) -> None:
    """The bound leaves room: the test suite's PEFT adapters (rank 4-64, rsLoRA, alpha_pattern) peak at under a
    thousandth of it, and it sits below float16's finite range so a cast to the serving dtype stays finite."""
    assert MAX_EFFECTIVE_WEIGHT * 4 < torch.finfo(torch.float16).max
    specs = [dict(r=64, alpha=128, targets=ALL, seed=3, strength=1.0), dict(r=8, alpha=16, targets=ALL, seed=4,
             use_rslora=True), dict(r=8, alpha=16, targets=ALL, seed=6, alpha_pattern={"down_proj": 64})]
    for i, spec in enumerate(specs):
        w = load_peft_adapter(f"real{i}", adapter_factory(f"iso-real{i}", **spec), shapes, 64)
        peak = max(max(p.a.abs().max().item(), p.b.abs().max().item() * p.scale) for p in w.parts.values())
        assert peak < MAX_EFFECTIVE_WEIGHT / 1000, (spec, peak)


def test_engine_refuses_a_huge_scale_on_every_route(good: Path, tmp_path: Path) -> None:
    """Start-up modules and runtime registration both go through the one load path (discovery and cluster
    replicas call the same engine loader)."""
    bad = crafted(good, tmp_path / "huge", {"lora_alpha": 1e300})
    with pytest.raises(AdapterFormatError, match=r"scale 1.25e\+299 makes B\*scale infinite"):
        LLMEngine(EngineConfig(dtype="float32", lora_modules=(("huge", str(bad)),)))


# ---- the engine: a poisoned request fails alone ------------------------------------------------------------

@dataclass
class Engine:
    llm: LLM
    prompts: dict[str, list[int]]  # job name -> prompt token ids
    solo: dict[str, list[int]]  # job name -> its tokens alone
    max_tokens: int


JOBS = {"good": "good", "base": None, "other": "other"}  # job -> adapter (None: the base model)
TEXTS = {"poison": "Write a long story about a dragon who guards a library of ancient books in the mountains, "
                   "and a child who visits every winter.",
         "good": "What is the capital of France?", "base": "Name three colours, please.",
         "other": "Who wrote Hamlet? Say it."}
# (dtype, kernels, batch-invariant): the C++ kernels batch-invariant, as a keyed server runs; the torch path in
# fp32 as a keyless server without a compiler runs it (grouped LoRA, attention by matmuls), in bf16 batch-invariant
# (its torch twins: tokenwise LoRA, attention per query), so that every engine path has a poisoned request fail alone.
COMBOS = [("float32", "native", True), ("float32", "torch", False), ("bfloat16", "native", True),
          ("bfloat16", "torch", True)]


@pytest.fixture(scope="module")
def overflow(good: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Finite weights, 1e18 everywhere: the products overflow float32 in the first layer. The load bound (1e4)
    refuses such a file; the tests lift it, as a float16 server with a within-bound adapter would overflow."""
    return crafted(good, tmp_path_factory.mktemp("ovf") / "overflow", None, fill(1e18, 1e18))


def run(llm: LLM, jobs: list[tuple[str, str | None, list[int], int]], watch: Callable[[LLMEngine], None] | None = None
        ) -> dict[str, RequestOutput]:
    """Queue (request id, adapter, prompt, max_tokens) jobs together, greedy; step to the end: final outputs."""
    engine = llm.engine
    for rid, adapter, prompt, n in jobs:
        engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), adapter, rid)
    final: dict[str, RequestOutput] = {}
    forward = engine.runner.execute

    def execute(seqs: list[Any]) -> Any:  # watch the batch as it enters the forward (a request may end in it)
        if watch is not None:
            watch(engine)
        return forward(seqs)

    engine.runner.execute = execute  # type: ignore[method-assign]
    try:
        while engine.has_unfinished_requests():
            outs = engine.step()
            final.update({o.request_id: o for o in outs if o.finished})
    finally:
        del engine.runner.execute  # back to the class's method
    return final


@pytest.fixture(scope="module", params=COMBOS, ids=[f"{d}-{k}{'-invariant' * i}" for d, k, i in COMBOS])
def engine(request: pytest.FixtureRequest, good: Path, overflow: Path,
           adapter_factory: Callable[..., Path]) -> Iterator[Engine]:
    dtype, kernels, invariant = request.param
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(peft_format, "MAX_EFFECTIVE_WEIGHT", 1e30)
        if kernels == "torch":  # the torch references of every C++ kernel
            mp.setattr(cpu_kernel, "supported", lambda dtype, device: False)
            mp.setattr(cpu_attention, "supported", lambda dtype, device: False)
            mp.setattr(cpu_fused, "supported", lambda x: False)
        mods = {"good": str(good), "poison": str(overflow),
                "other": str(adapter_factory("iso-other", r=4, alpha=8, targets=ATTN, seed=52)),
                "drift": str(adapter_factory("iso-drift", r=4, alpha=8, targets=ALL, seed=53))}
        llm = LLM(dtype=dtype, lora_modules=mods, max_loras=2, max_model_len=256, batch_invariant=invariant)
        enabled = llm.engine.facts.batch_invariance.enabled
        assert enabled == invariant
        assert llm.engine.runner.per_query_attention == (kernels == "native" or enabled)
        assert llm.engine.runner.lora_kernel == ("tokenwise" if kernels == "torch" and enabled else None)
        prompts = {k: llm.tokenizer.encode(t) for k, t in TEXTS.items()}
        assert all(len(p) % 16 for p in prompts.values())  # every prompt ends inside a partial block
        n = 4 if dtype == "float32" else 2  # bf16 is emulated on AVX2 CPUs: few tokens
        solo = {job: run(llm, [(job, a, prompts[job], n)])[job].outputs[0].token_ids for job, a in JOBS.items()}
        llm.reset_prefix_cache()
        yield Engine(llm, prompts, solo, n)


def held(engine: LLMEngine, rid: str, into: dict[str, object]) -> None:
    """Record the blocks and the slot of request `rid` while it runs."""
    req = engine.requests.get(rid)
    if req is not None and req.block_ids:
        into["blocks"], into["slot"] = list(req.block_ids), req.lora_slot


def assert_others_solo(e: Engine, final: dict[str, RequestOutput], jobs: list[str]) -> None:
    for job in jobs:
        out = final[job]
        assert out.error is None and out.outputs[0].token_ids == e.solo[job], job


def later_requests_equal_solo(e: Engine, poisoned: dict[str, object]) -> None:
    """After the poisoned request: the base model and `good` on the freed blocks (the stale tails of the
    poisoned request's NaN blocks in their partial blocks), then `other` on its device slot."""
    free = e.llm.engine.blocks._free  # the worst case: the next allocations take the poisoned blocks first
    for b in poisoned["blocks"]:  # type: ignore[attr-defined]
        free.remove(b)
        free.append(b)
    used: set[int] = set()

    def blocks_of_both(eng: LLMEngine) -> None:
        for rid in ("base", "good"):
            req = eng.requests.get(rid)
            used.update(req.block_ids if req is not None else ())

    final = run(e.llm, [("base", None, e.prompts["base"], e.max_tokens), ("good", "good", e.prompts["good"], e.max_tokens)],
                blocks_of_both)
    assert_others_solo(e, final, ["base", "good"])
    assert used & set(poisoned["blocks"])  # type: ignore[arg-type]
    seen: dict[str, object] = {}
    final = run(e.llm, [("other", "other", e.prompts["other"], e.max_tokens)], lambda eng: held(eng, "other", seen))
    assert_others_solo(e, final, ["other"])
    assert seen["slot"] == poisoned["slot"]


def assert_poisoned(e: Engine, final: dict[str, RequestOutput], adapter: str, poisoned: dict[str, object]) -> None:
    out = final["poison"]
    assert isinstance(out.error, NonFiniteOutputError) and out.finished
    assert f"adapter '{adapter}@1' produced non-finite activations" in str(out.error)
    kv = e.llm.engine.runner.kv_cache
    rows = torch.tensor([b * 16 + o for b in poisoned["blocks"] for o in range(16)])  # type: ignore[attr-defined]
    assert not torch.isfinite(kv[:, :, rows]).all()  # the freed blocks really hold non-finite K/V
    assert e.llm.engine.nonfinite_requests.get(adapter, 0) >= 1


@pytest.mark.slow
def test_overflowing_adapter_fails_alone(engine: Engine) -> None:
    """Weights that overflow on the request's input: that request ends with NonFiniteOutputError (no empty
    text), the base-model and `good` requests in its batch get their solo tokens, and so do later ones."""
    e, poisoned = engine, {}
    final = run(e.llm, [("poison", "poison", e.prompts["poison"], e.max_tokens),
                        ("good", "good", e.prompts["good"], e.max_tokens), ("base", None, e.prompts["base"], e.max_tokens)],
                lambda eng: held(eng, "poison", poisoned))
    assert_poisoned(e, final, "poison", poisoned)
    assert final["poison"].outputs[0].token_ids == []
    assert_others_solo(e, final, ["good", "base"])
    later_requests_equal_solo(e, poisoned)


def run_with_hook_on_poison(e: Engine, layer: tuple[int, str], act: Callable[[torch.Tensor, torch.Tensor], None]
                            ) -> tuple[dict[str, RequestOutput], dict[str, object], list[int]]:
    """`poison` (on the finite adapter `drift`), `good` and the base model run together, with `act(out, rows)` called
    by a forward hook on the LoRA target `layer` whenever the batch holds `poison`'s rows after its first token.
    Returns the final outputs, `poison`'s blocks and slot (`held`), and the row count of every forward of `layer`."""
    poisoned: dict[str, object] = {}
    batches: list[int] = []

    def hook(module: torch.nn.Module, args: tuple[object, ...], out: torch.Tensor) -> None:
        req = e.llm.engine.requests.get("poison")
        batch = args[1]
        batches.append(out.shape[0])
        if req is None or not req.output_token_ids or batch.lora is None:  # type: ignore[attr-defined]
            return
        rows = batch.lora.token_slots == req.lora_slot  # type: ignore[attr-defined]
        if rows.any():
            act(out, rows)

    handle = e.llm.engine.runner.lora_targets[layer].register_forward_hook(hook)
    try:
        final = run(e.llm, [("poison", "drift", e.prompts["poison"], e.max_tokens + 2),
                            ("good", "good", e.prompts["good"], e.max_tokens),
                            ("base", None, e.prompts["base"], e.max_tokens)], lambda eng: held(eng, "poison", poisoned))
    finally:
        handle.remove()
    return final, poisoned, batches


@pytest.mark.slow
def test_nan_appearing_mid_sequence_fails_alone(engine: Engine) -> None:
    """A finite adapter whose activations turn NaN after it has generated a token (planted by a forward hook
    on its tokens' rows of one layer): it fails then, with the token it had; the others are untouched."""
    e = engine

    def plant(out: torch.Tensor, rows: torch.Tensor) -> None:
        out[rows] = float("nan")

    final, poisoned, _ = run_with_hook_on_poison(e, (15, "v_proj"), plant)
    assert_poisoned(e, final, "drift", poisoned)
    assert len(final["poison"].outputs[0].token_ids) == 1
    assert_others_solo(e, final, ["good", "base"])
    later_requests_equal_solo(e, poisoned)


@pytest.mark.slow
def test_a_raising_step_fails_only_the_request_that_raises_alone(engine: Engine) -> None:
    """A layer that raises whenever one request's rows are in the batch (after its first token): the step is
    bisected and re-run, that request ends with the error and the token it had, the two beside it get their solo
    tokens, and later requests too."""
    e = engine

    def fault(out: torch.Tensor, rows: torch.Tensor) -> None:
        raise RuntimeError("a kernel fault on this request's rows")

    final, poisoned, batches = run_with_hook_on_poison(e, (3, "q_proj"), fault)
    out = final["poison"]
    assert isinstance(out.error, RuntimeError) and "kernel fault" in str(out.error) and out.finished
    assert len(out.outputs[0].token_ids) == 1
    assert_others_solo(e, final, ["good", "base"])
    assert 3 in batches and 1 in batches  # decode steps of all three raised, then their halves ran
    later_requests_equal_solo(e, poisoned)
