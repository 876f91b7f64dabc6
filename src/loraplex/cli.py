"""Command line: `loraplex serve | cluster | generate | train | merge | demo | info`."""

from __future__ import annotations

import os

# libgomp reads this once, when torch loads it: OpenMP threads spin this many iterations after a parallel
# region, then sleep. The default (300k) keeps both cores of a 2-core machine spinning between decode steps,
# starving the HTTP event loop; 10k keeps a step as fast (ops follow each other within microseconds) and frees
# the cores between steps. Set before anything imports torch; a value in the environment wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

import loraplex  # noqa: E402
from loraplex.units import parse_bytes  # noqa: E402
from loraplex.cli_forms import (CommandLineError, LoraModule, any_adapter_path, api_keys_from,  # noqa: E402
                                apply_config_file, chat_template_text, check_lineage, parse_lora_modules)
from loraplex.cli_vllm import split_vllm_flags  # noqa: E402
from loraplex.vllm_flag_rules import apply_vllm_flags  # noqa: E402
from loraplex.cluster.config import CLAIM_POLICIES  # noqa: E402
from loraplex.config import FAIR_STEPS, LOG_LEVELS  # noqa: E402
from loraplex.errors import LoraplexError  # noqa: E402

if TYPE_CHECKING:
    from loraplex.config import EngineConfig, ServerConfig


def _size(text: str) -> int:
    try:
        return parse_bytes(text)
    except LoraplexError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


QUANTIZATIONS = ["nf4", "fp4", "int8", "gguf"]
# vLLM's --quantization names for what loraplex does: bitsandbytes' in-flight quantization is 4-bit NF4 there too.
QUANTIZATION_ALIASES = {"bitsandbytes": "nf4"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every flag's default, as vLLM's does (each flag has a help text: tests/test_cli_vllm.py checks),
    unless its help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _engine_args(p: argparse.ArgumentParser, with_model: bool = True) -> None:
    if with_model:
        p.add_argument("--model", default=None, help="HF model directory, .gguf file, or omitted for the embedded default")
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda[:N]",
                   help="where the model runs; auto: the first CUDA GPU where torch sees one, else the CPU")
    p.add_argument("--enable-lora", action="store_true",
                   help="accepted for vLLM's command lines: LoRA is always on here (every request may name an adapter)")
    p.add_argument("--lora-modules", nargs="+", action="extend", default=[], metavar="NAME=PATH|JSON",
                   help="adapters to register at start: NAME=PATH, or vLLM's JSON "
                        "'{\"name\": ..., \"path\": ..., \"base_model_name\": ...}'")
    p.add_argument("--max-loras", type=int, default=8, help="device adapter slots: distinct adapters in one step")
    p.add_argument("--max-lora-rank", type=int, default=16, help="the largest adapter rank served; higher is refused")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="model dtype; auto: bf16 where the hardware multiplies it natively, else fp32 (fp16 on older GPUs)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context length (prompt + output); default: the model's, at most 4096")
    p.add_argument("--allow-pickle-adapters", action="store_true", help="accept adapter_model.bin (weights_only)")
    p.add_argument("--quantize", "--quantization", "-q", dest="quantize", default=None,
                   choices=QUANTIZATIONS + list(QUANTIZATION_ALIASES),
                   help="store the base linear layers 4-bit (nf4/fp4) or 8-bit by bitsandbytes, or serve a GGUF "
                        "model's linears on the blocks it ships (gguf: Q4_0/Q4_1/Q8_0, CPU); LoRA runs in --dtype "
                        "(vLLM's --quantization bitsandbytes: nf4)")
    p.add_argument("--double-quant", action="store_true", help="with --quantize nf4/fp4: quantize the block scales too")
    p.add_argument("--kv-cache-memory", type=_size, default=1 << 30, help="KV cache budget, e.g. 1GiB")
    p.add_argument("--adapter-memory", type=_size, default=None,
                   help="budget for the device adapter slots, e.g. 256MiB; start-up fails if --max-loras does not fit")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the K/V of prompt prefixes, never across adapters, versions or cache salts")
    p.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=None,
                   help="a request's output never depends on what else shares its batch (the base linears in fixed "
                        "row tiles; prefill costs more, see docs/serving.md); default: on with --api-keys, or when "
                        "VLLM_BATCH_INVARIANT=1")
    p.add_argument("--max-prepare-seconds", type=float, default=5.0,
                   help="cap on one request's chat templating, tokenization and grammar compilation; over it: 400")
    p.add_argument("--chat-template", default=None, metavar="FILE|TEMPLATE",
                   help="a Jinja chat template (a file, or the template text) in place of the model's own")


def engine_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """EngineConfig fields from the flags `_engine_args` adds (shared by generate, serve and demo)."""
    if args.enable_lora:
        logging.getLogger(__name__).info("--enable-lora: LoRA is always on in loraplex")
    return {"device": args.device, "max_loras": args.max_loras, "max_lora_rank": args.max_lora_rank,
            "dtype": args.dtype, "max_model_len": args.max_model_len, "allow_pickle_adapters": args.allow_pickle_adapters,
            "quantization": QUANTIZATION_ALIASES.get(args.quantize, args.quantize), "double_quant": args.double_quant,
            "kv_cache_memory": args.kv_cache_memory, "adapter_memory": args.adapter_memory,
            "enable_prefix_caching": args.enable_prefix_caching, "max_prepare_seconds": args.max_prepare_seconds,
            "chat_template": chat_template_text(args.chat_template), "batch_invariant": batch_invariant(args)}


def batch_invariant(args: argparse.Namespace) -> bool:
    """--batch-invariant as given; unset: on where tenants hold keys (--api-keys), or as vLLM's VLLM_BATCH_INVARIANT."""
    if args.batch_invariant is not None:
        return bool(args.batch_invariant)
    return getattr(args, "api_keys", None) is not None or os.environ.get("VLLM_BATCH_INVARIANT", "0") == "1"


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set of this mass")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0: all")
    p.add_argument("--seed", type=int, default=None, help="a per-request seed, for reproducible sampling")
    p.add_argument("--stop", nargs="*", default=[], help="strings that end the generation")


def _modules(args: argparse.Namespace) -> dict[str, str]:
    """--lora-modules as name -> path (a later module of the same name wins), its lineage checked."""
    modules: list[LoraModule] = parse_lora_modules(args.lora_modules)
    model = getattr(args, "model", None)
    if any(m.base_model_name for m in modules):
        from loraplex.models.loader import DEFAULT_MODEL

        names = (model or DEFAULT_MODEL, Path(model).name if model else None, getattr(args, "served_model_name", None))
        check_lineage(modules, {n for n in names if n})
    return {m.name: m.path for m in modules}


def cmd_generate(args: argparse.Namespace) -> None:
    from loraplex.llm import LLM
    from loraplex.sampling import SamplingParams

    modules = _modules(args)
    adapter = args.adapter
    if adapter is not None and adapter not in modules:
        if not Path(adapter).is_dir():
            raise SystemExit(f"--adapter {adapter!r} is neither a --lora-modules name nor an adapter directory")
        modules[Path(adapter).name] = adapter
        adapter = Path(adapter).name
    llm = LLM(args.model, lora_modules=modules, **engine_kwargs(args))
    prompt = llm.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=args.stop)
    engine = llm.engine
    engine.add_request(prompt, params, adapter)
    while engine.has_unfinished_requests():  # stream tokens as they are produced
        for out in engine.step():
            sys.stdout.write(out.outputs[0].delta_text)
            sys.stdout.flush()
    sys.stdout.write("\n")


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_arg", nargs="?", default=None, metavar="model",
                   help="HF model directory or .gguf file (default: the embedded model); or --model")
    p.add_argument("--model", default=None, help="the same as the positional model (vLLM takes either)")
    p.add_argument("--config", type=Path, default=None, metavar="FILE.yaml",
                   help="flags from a YAML file, vLLM's format ('port: 8000', 'enable-lora: true'); the command "
                        "line's own flags win")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; not loopback: needs --api-keys or --api-key")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--served-model-name", default=None, help="the base model's name in the API (default: its own)")
    p.add_argument("--api-keys", type=Path, default=None, help="JSON file mapping API keys to their adapters")
    p.add_argument("--api-key", nargs="+", action="extend", default=None, metavar="KEY",
                   help="keys with full access (every adapter, admin, metrics), as vLLM's --api-key; default: "
                        "$LORAPLEX_API_KEY, else $VLLM_API_KEY")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="loraplex's and uvicorn's log level")
    p.add_argument("--root-path", default="", metavar="/PREFIX",
                   help="the path prefix a reverse proxy serves this under (and strips before forwarding)")
    p.add_argument("--allowed-origins", nargs="+", default=[], metavar="ORIGIN",
                   help="CORS: web origins (https://host[:port]) whose pages may call the API; default: none, CORS off;"
                        " '*' needs API keys")
    p.add_argument("--version", action="version", version=f"loraplex {loraplex.__version__}")
    p.add_argument("--tenant-weight", nargs="+", default=[], type=_tenant_weight, metavar="NAME=WEIGHT",
                   help="without API keys, each adapter (and the base model, by its served name) is a tenant: its "
                        "weight in the fair share of the batch (default 1)")
    p.add_argument("--tenant-max-in-flight", type=int, default=None, metavar="N",
                   help="without API keys: requests each tenant may have in flight (default: --max-num-seqs plus "
                        "half of --max-queue); more is a 429")
    p.add_argument("--tenant-requests-per-minute", type=int, default=None, metavar="N",
                   help="without API keys: each tenant's requests per minute; more is a 429 (default: no limit)")
    p.add_argument("--tenant-tokens-per-minute", type=int, default=None, metavar="N",
                   help="without API keys: each tenant's prompt + max_tokens per minute; more is a 429 (default: "
                        "no limit)")
    p.add_argument("--insecure-no-api-keys", action="store_true",
                   help="allow a server without --api-keys on a non-loopback --host (anyone reaching it is admin)")
    p.add_argument("--allowed-hosts", nargs="+", default=[], metavar="NAME",
                   help="Host header names to answer besides the bound address (DNS names behind a proxy; '*': any)")
    p.add_argument("--allowed-adapter-roots", nargs="+", type=Path, default=[], metavar="DIR",
                   help="directories /v1/load_lora_adapter may read from, besides --adapter-dir (other paths: 403)")
    p.add_argument("--max-body-size", type=int, default=4 << 20, help="bytes of request body; more is a 413")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds for a request body to arrive; slower is a 408")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds for a request's line and headers to arrive (from connecting); slower is a 408")
    p.add_argument("--limit-concurrency", type=int, default=1024,
                   help="open connections and requests at once; more get a 503 (uvicorn)")
    p.add_argument("--adapter-dir", default=None,
                   help="serve every adapter directory under it (<dir>/<name>/), loaded on its first request")
    p.add_argument("--registry-file", default=None, help="where run-time adapter registrations persist")
    p.add_argument("--max-cpu-loras", type=int, default=32, help="adapters kept in host memory (LRU)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests decoding at once")
    p.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="tokens in one step; longer prompts are prefilled in chunks")
    p.add_argument("--fair-steps", choices=FAIR_STEPS, default="auto",
                   help="while requests outnumber the batch's places, steps are shaped for tenants below their fair"
                        " share: a first token far under its share gets a step of its own prompt (never two in a"
                        " row), and a tenant over its share adds at most --max-num-seqs prompt tokens to a step;"
                        " auto: on a CPU, where a step's time grows with its tokens, off on a GPU")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond --max-num-seqs before 503")
    p.add_argument("--max-metric-labels", type=int, default=256,
                   help="adapters with their own series on /metrics; later ones are counted under model=\"other\"")
    p.add_argument("--drain-timeout", type=int, default=30, help="seconds to finish requests in flight on SIGTERM")
    p.add_argument("--demo-adapters", action="store_true", help="also register the demo tenants' adapters")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="CPU threads for the model (default: every core; OpenMP threads sleep between steps)")


def _tenant_weight(text: str) -> tuple[str, float]:
    """--tenant-weight's NAME=WEIGHT (its range is ServerConfig's check)."""
    name, _, weight = text.partition("=")
    try:
        if name:
            return name, float(weight)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected NAME=WEIGHT (an adapter, or the base model's served name), got {text!r}")


def _server_configs(args: argparse.Namespace, adapter_dir: str | None = None,
                    registry_file: str | None = None) -> tuple[EngineConfig, ServerConfig]:
    """The engine and server configs from `serve`'s flags (shared by serve and cluster)."""
    from loraplex.config import EngineConfig, ServerConfig

    if args.model and args.model_arg and args.model != args.model_arg:
        raise CommandLineError(f"the model is given twice, as {args.model_arg!r} and --model {args.model!r}")
    args.model = args.model or args.model_arg
    modules = _modules(args)
    if args.demo_adapters:
        from loraplex.demo import demo_adapters

        modules = {**demo_adapters(), **modules}
    engine_config = EngineConfig(
        model=args.model, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        fair_steps=args.fair_steps, max_cpu_loras=args.max_cpu_loras, lora_modules=tuple(modules.items()),
        adapter_dir=adapter_dir or args.adapter_dir, registry_file=registry_file or args.registry_file,
        **engine_kwargs(args), **_mapped_vllm_settings(args),  # type: ignore[arg-type]
    )
    server = ServerConfig(host=args.host, port=args.port, served_model_name=args.served_model_name,
                          api_keys=args.api_keys, admin_keys=api_keys_from(args.api_key), log_level=args.log_level,
                          root_path=args.root_path, allowed_origins=tuple(args.allowed_origins),
                          any_adapter_path=any_adapter_path(), max_queue=args.max_queue, drain_timeout=args.drain_timeout,
                          max_metric_labels=args.max_metric_labels,
                          torch_threads=args.torch_threads, insecure_no_api_keys=args.insecure_no_api_keys,
                          allowed_hosts=tuple(args.allowed_hosts),
                          allowed_adapter_roots=tuple(args.allowed_adapter_roots),
                          max_body_size=args.max_body_size, body_timeout=args.body_timeout,
                          header_timeout=args.header_timeout, limit_concurrency=args.limit_concurrency,
                          tenant_weights=tuple(args.tenant_weight), tenant_max_in_flight=args.tenant_max_in_flight,
                          tenant_requests_per_minute=args.tenant_requests_per_minute,
                          tenant_tokens_per_minute=args.tenant_tokens_per_minute)
    return engine_config, server


def _mapped_vllm_settings(args: argparse.Namespace) -> dict[str, object]:
    """EngineConfig fields that only vLLM's flags set (vllm_flag_rules.MAPPED: --seed, --block-size,
    --gpu-memory-utilization), where they were given."""
    given = {"seed": getattr(args, "engine_seed", None), "block_size": getattr(args, "block_size", None),
             "gpu_memory_utilization": getattr(args, "gpu_memory_utilization", None)}
    return {k: v for k, v in given.items() if v is not None}


def cmd_serve(args: argparse.Namespace) -> None:
    from loraplex.server.serve import serve

    serve(*_server_configs(args))


def _cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replicas", type=int, default=2, help="engine replicas (each one AsyncLLMEngine)")
    p.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (e.g. auto, or ray://head:10001); default: start Ray on this machine")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray num_cpus per replica (fractions allowed)")
    p.add_argument("--max-adapters-per-replica", type=int, default=None,
                   help="adapters a replica claims for routing (default: --max-cpu-loras)")
    p.add_argument("--hot-adapter-threshold", type=int, default=16,
                   help="requests in flight for one adapter per replica running it before it spreads to another")
    p.add_argument("--spill-margin", type=int, default=2,
                   help="requests in flight by which an adapter's least loaded holder may exceed the least loaded "
                        "replica before the adapter spreads to another")
    p.add_argument("--claim-policy", choices=CLAIM_POLICIES, default="frequency",
                   help="frequency: a replica claims an adapter only if it is requested more often than the claim it "
                        "would evict (a rarer one is served on a transient copy); lru: every request claims")
    p.add_argument("--popularity-half-life", type=float, default=120.0,
                   help="seconds in which an adapter's request count halves (claim admission, replication)")
    p.add_argument("--replicate-share", type=float, default=0.1,
                   help="share of the recent requests that earns an adapter one more replica holding it, so that its "
                        "requests are balanced between its holders (above 1: never)")


def cmd_cluster(args: argparse.Namespace) -> None:
    import tempfile

    from loraplex.cluster.app import run
    from loraplex.cluster.config import ClusterConfig
    from loraplex.server.auth import server_keys

    if args.adapter_dir is None and args.ray_address is not None:
        raise SystemExit("--adapter-dir is required with --ray-address: a directory every node mounts, the "
                         "cluster's shared adapter store")
    with tempfile.TemporaryDirectory(prefix="loraplex-store-") as scratch:
        adapter_dir = args.adapter_dir or scratch  # one machine: a local directory is a shared store
        registry = args.registry_file or str(Path(adapter_dir) / "registry.json")
        engine_config, server = _server_configs(args, adapter_dir, registry)
        cluster = ClusterConfig(replicas=args.replicas, ray_address=args.ray_address,
                                cpus_per_replica=args.cpus_per_replica,
                                max_adapters_per_replica=args.max_adapters_per_replica or args.max_cpu_loras,
                                hot_adapter_threshold=args.hot_adapter_threshold, spill_margin=args.spill_margin,
                                claim_policy=args.claim_policy, popularity_half_life_s=args.popularity_half_life,
                                replicate_share=args.replicate_share)
        logging.getLogger(__name__).info("adapter store: %s (registry %s)", adapter_dir, registry)
        run(engine_config, server, cluster, server_keys(server.api_keys, server.admin_keys))


def cmd_demo(args: argparse.Namespace) -> None:
    from loraplex.demo import run_demo

    run_demo(url=args.url, max_tokens=args.max_tokens)


def cmd_train(args: argparse.Namespace) -> None:
    from loraplex.training.config import TrainConfig
    from loraplex.training.trainer import train

    cfg = TrainConfig(data=args.data, output=args.output, base=args.base, rank=args.rank, alpha=args.alpha,
                      dropout=args.dropout, targets=tuple(args.targets),
                      layers=tuple(args.layers) if args.layers else None, qlora=args.qlora, epochs=args.epochs,
                      lr=args.lr, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
                      eval_data=args.eval_data, overwrite=args.overwrite)
    result = train(cfg)
    first, last = result.losses[0], result.losses[-1]
    print(f"wrote {result.output} in {result.seconds:.0f}s: loss {first:.3f} -> {last:.3f}"
          + (f", eval loss {result.eval_loss:.3f}" if result.eval_loss is not None else ""))


def cmd_info(args: argparse.Namespace) -> None:
    """What this machine runs: the CPU class, what dtype auto resolves to, and the C++ kernels (built now if
    they are not cached, so `make setup` runs this and the first request does not wait for a compiler)."""
    import torch

    from loraplex import hardware
    from loraplex.lora import cpu_kernel
    from loraplex.models import cpu_attention, cpu_fused
    from loraplex.quant import cpu_quant

    info = hardware.cpu()
    print(f"cpu: {info.describe()}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"ATen capability {info.capability}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{device}: {hardware.resolve_dtype('auto', device).describe()}")
    kernels = (("fused LoRA kernel", cpu_kernel.library()), ("paged decode attention", cpu_attention.library()),
               ("fused norm/rope/activation", cpu_fused.library()), ("fused quantized linears", cpu_quant.library()))
    for name, ready in kernels:
        print(f"{name}: {'ready' if ready is not None else 'unavailable, torch serves'}")


def cmd_merge(args: argparse.Namespace) -> None:
    from loraplex.training.merge import merge

    print(f"wrote {merge(args.adapter, args.output, args.base, args.overwrite)}")


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand and its flags, without running anything (tests/test_docs_cli.py checks the docs against it)."""
    # allow_abbrev=False: a flag is taken only as written (vLLM's --api-key must not be read as --api-keys).
    options = {"formatter_class": HelpFormatter, "allow_abbrev": False}
    parser = argparse.ArgumentParser(prog="loraplex", description="Multi-tenant LoRA inference", **options)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at info level (serve and cluster always do)")
    parser.add_argument("--version", action="version", version=f"loraplex {loraplex.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", **options, help="generate once, optionally with an adapter")
    gen.add_argument("--prompt", required=True, help="the user message (sent through the chat template)")
    gen.add_argument("--adapter", default=None, help="a --lora-modules name or a PEFT adapter directory")
    gen.add_argument("--no-chat", dest="chat", action="store_false", help="send the prompt raw, without the chat template")
    _engine_args(gen)
    _sampling_args(gen)
    gen.set_defaults(fn=cmd_generate)

    srv = sub.add_parser("serve", **options, help="the OpenAI-compatible HTTP server")
    _serve_args(srv)
    _engine_args(srv, with_model=False)
    srv.set_defaults(fn=cmd_serve)

    cl = sub.add_parser("cluster", **options, help="the same server over several engine replicas on Ray Serve")
    _serve_args(cl)
    _engine_args(cl, with_model=False)
    _cluster_args(cl)
    cl.set_defaults(fn=cmd_cluster)

    demo = sub.add_parser("demo", **options, help="the same questions to the base model and two trained tenants, side by side")
    demo.add_argument("--url", default="http://127.0.0.1:8000", help="a running `loraplex serve` (else offline)")
    demo.add_argument("--max-tokens", type=int, default=64, help="tokens per answer at most")
    demo.set_defaults(fn=cmd_demo)

    from loraplex.training.config import TARGETS

    tr = sub.add_parser("train", **options, help="train a LoRA (or QLoRA) adapter with PEFT")
    tr.add_argument("--data", type=Path, required=True, help="JSONL: messages, prompt+completion, or text")
    tr.add_argument("--output", type=Path, required=True, help="the adapter directory to write (PEFT's format)")
    tr.add_argument("--base", default=None, help="base model (default: the embedded model)")
    tr.add_argument("--rank", type=int, default=16, help="LoRA rank r")
    tr.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (the update is scaled by alpha / r)")
    tr.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    tr.add_argument("--targets", nargs="+", default=list(TARGETS), metavar="MODULE", help="the modules LoRA adapts")
    tr.add_argument("--layers", type=int, nargs="+", default=None, metavar="N",
                    help="LoRA on these decoder layers only (PEFT's layers_to_transform); default: every layer")
    tr.add_argument("--qlora", action="store_true", help="train on a 4-bit NF4 base (bitsandbytes)")
    tr.add_argument("--epochs", type=int, default=3, help="passes over the data")
    tr.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    tr.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step")
    tr.add_argument("--max-length", type=int, default=512, help="tokens per example; longer ones are cut")
    tr.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the data order")
    tr.add_argument("--eval-data", type=Path, default=None, help="JSONL scored after training (eval loss)")
    tr.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    tr.set_defaults(fn=cmd_train)

    mg = sub.add_parser("merge", **options, help="fold an adapter into its base: a standalone model directory")
    mg.add_argument("--adapter", type=Path, required=True, help="a PEFT LoRA directory")
    mg.add_argument("--output", type=Path, required=True, help="the merged model directory to write")
    mg.add_argument("--base", default=None, help="base model (default: the embedded model)")
    mg.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    mg.set_defaults(fn=cmd_merge)

    info = sub.add_parser("info", **options, help="this machine's CPU class, the dtype auto resolves to, the C++ kernels")
    info.set_defaults(fn=cmd_info)
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line. For serve and cluster: vLLM's flags that loraplex does not have are taken out first and
    accepted, mapped or refused (vllm_flag_rules.py), and a `--config FILE.yaml` is read in as the command's defaults (the
    flags given win)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = next((w for w in argv if w in subparsers.choices), None)
    sub = subparsers.choices[command] if command in ("serve", "cluster") else None
    if sub is None:
        return parser.parse_args(argv)
    ours = set(sub._option_string_actions) | set(parser._option_string_actions)
    argv, vllm = split_vllm_flags(argv, ours)
    args = parser.parse_args(argv)
    if args.config is not None:
        from_file = apply_config_file(sub, args.config)
        args = parser.parse_args(argv)
        vllm = from_file + vllm  # the command line's own come last: they win
    args.vllm_notes = apply_vllm_flags(vllm, lambda dest, value: setattr(args, dest, value))
    return args


def main(argv: list[str] | None = None) -> None:
    try:
        args = parse(argv)
        level = getattr(args, "log_level", None) or ("info" if args.verbose else "warning")
        logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        for note in getattr(args, "vllm_notes", []):  # each of vLLM's flags accepted or mapped, once
            logging.getLogger(__name__).info("%s", note)
        args.fn(args)
    except (LoraplexError, CommandLineError) as e:  # a user's mistake: say what and why, no stack trace
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
