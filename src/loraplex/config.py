"""EngineConfig and ServerConfig: what the engine and the HTTP server run with, as frozen data validated on
creation (the CLI builds them from flags; Python users build them directly). No torch."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.errors import InvalidRequestError

DTYPES = ("auto", "bfloat16", "float16", "float32")
FAIR_STEPS = ("auto", "on", "off")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
ORIGIN_FORM = re.compile(r"https?://[^/\s]+")  # a web origin: scheme, host and port, no path
DEVICE_FORM = re.compile(r"auto|cpu|cuda(:\d+)?")  # auto: a GPU where torch sees one (hardware.resolve_device)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str | None = None  # None = the embedded default model
    dtype: str = "auto"  # auto: resolved from the hardware (hardware.resolve_dtype)
    device: str = "cpu"  # cpu, cuda, cuda:N, or auto (a GPU where there is one)
    max_model_len: int | None = None  # None = min(model's max_position_embeddings, 4096)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # per-step token budget; longer prompts are prefilled in chunks
    block_size: int = 16
    kv_cache_memory: int = 1 << 30  # bytes for K and V of all layers
    # On a GPU: the share of its memory this engine may fill (weights, slots, KV cache), which then sizes the KV
    # cache in place of kv_cache_memory (vLLM's --gpu-memory-utilization); the rest is left to activations.
    gpu_memory_utilization: float | None = None
    enable_prefix_caching: bool = True  # reuse the K/V of full prompt blocks, per adapter version (block_manager.py)
    # None (model dtype), "nf4", "fp4" or "int8": the base linears, by bitsandbytes; "gguf": a GGUF model's own blocks
    quantization: str | None = None
    double_quant: bool = False  # 4-bit only: quantize the block scales too (~0.4 bit/weight saved)
    adapter_memory: int | None = None  # bytes allowed for the device adapter slots; None = what max_loras needs
    enable_lora: bool = True
    max_loras: int = 8  # device slots: distinct adapters in one step
    max_lora_rank: int = 16
    lora_modules: tuple[tuple[str, str], ...] = field(default=())  # (name, path) registered at start
    adapter_dir: str | None = None  # <dir>/<name>/ or <dir>/<name>/<version>/, loaded just in time
    max_cpu_loras: int = 32  # host-memory tier (LRU) of validated adapters
    registry_file: str | None = None  # run-time registrations, promotions and pins survive restarts here
    allow_pickle_adapters: bool = False
    max_skips: int = 16  # fairness: how often a waiting request may be passed over by later ones
    # Steps shaped for tenants below their share (engine/scheduler.py _express, _chunk): "auto" is on for a CPU, where
    # a step's time grows with its tokens, off for a GPU, where a small step costs about a whole one.
    fair_steps: str = "auto"
    # The cap on one request's templating, tokenization and grammar compilation (engine/prepare.py); over it: 400.
    max_prepare_seconds: float = 5.0
    chat_template: str | None = None  # a Jinja chat template in place of the tokenizer's own (vLLM's --chat-template)
    seed: int = 0
    # A row's result never depends on the other rows of its step (models/cpu_gemm.py's row tiles); costs prefill time.
    batch_invariant: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}"),
            (DEVICE_FORM.fullmatch(self.device) is not None,
             f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}"),
            (self.max_num_seqs >= 1, "max_num_seqs must be >= 1"),
            (self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be >= 1"),
            (self.block_size >= 1, "block_size must be >= 1"),
            (self.kv_cache_memory > 0, "kv_cache_memory must be > 0"),
            (self.gpu_memory_utilization is None or 0 < self.gpu_memory_utilization <= 1,
             f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"),
            (self.max_loras >= 1, "max_loras must be >= 1"),
            (self.max_lora_rank >= 1, "max_lora_rank must be >= 1"),
            (self.max_cpu_loras >= 1, "max_cpu_loras must be >= 1"),
            (self.max_skips >= 0, "max_skips must be >= 0"),
            (self.fair_steps in FAIR_STEPS,
             f"fair_steps must be one of {', '.join(FAIR_STEPS)}, got {self.fair_steps!r}"),
            (self.max_prepare_seconds > 0, f"max_prepare_seconds must be > 0, got {self.max_prepare_seconds}"),
            (self.max_model_len is None or self.max_model_len >= 2, "max_model_len must be >= 2"),
            (self.quantization in (None, "nf4", "fp4", "int8", "gguf"),
             f"quantization must be nf4, fp4, int8 or gguf, got {self.quantization!r}"),
            (not self.double_quant or self.quantization in ("nf4", "fp4"),
             "double_quant applies to 4-bit quantization only: use it with quantization nf4 (or fp4)"),
            (self.adapter_memory is None or self.adapter_memory > 0, "adapter_memory must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(message)


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, IPv6 with or without brackets) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # None = the model's own name
    api_keys: Path | None = None  # JSON file mapping API keys to their adapters; None = an open server
    admin_keys: tuple[str, ...] = field(default=(), repr=False)  # keys with full access (vLLM's --api-key); secret
    max_queue: int = 256  # waiting requests beyond the engine's max_num_seqs before 503
    drain_timeout: int = 30  # seconds to finish requests in flight on SIGTERM
    torch_threads: int | None = None  # CPU threads for the model; None = every core
    max_metric_labels: int = 256  # adapters with their own /metrics series; the rest share model="other"
    insecure_no_api_keys: bool = False  # allow a keyless server on a non-loopback address (anyone is admin)
    allowed_hosts: tuple[str, ...] = ()  # Host header names answered to besides the bound address ('*': any)
    allowed_adapter_roots: tuple[Path, ...] = ()  # runtime loads may read here, besides the engine's adapter_dir
    # vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING=True: runtime loads may read any path the server can (admin keys only,
    # or an open server on loopback only)
    any_adapter_path: bool = False
    max_body_size: int = 4 << 20  # bytes of request body; more is a 413
    body_timeout: float = 30.0  # seconds for a request body to arrive; slower is a 408
    header_timeout: float = 10.0  # seconds for a request's line and headers to arrive; slower is a 408
    limit_concurrency: int = 1024  # open connections and requests at once; more get uvicorn's 503
    timeout_keep_alive: int = 5  # seconds an idle keep-alive connection is held
    log_level: str = "info"  # loraplex's and uvicorn's
    root_path: str = ""  # the path prefix a proxy serves this under and strips before forwarding (ASGI root_path)
    allowed_origins: tuple[str, ...] = ()  # CORS: web origins whose pages may call the API; none by default
    # A keyless server's tenants are its adapters (the base model one): their weights and each one's caps. With
    # keys, the keys file sets them per key.
    tenant_weights: tuple[tuple[str, float], ...] = ()
    tenant_max_in_flight: int | None = None
    tenant_requests_per_minute: int | None = None
    tenant_tokens_per_minute: int | None = None

    @property
    def keyed(self) -> bool:
        """Whether requests need a key (a keys file or --api-key); else the server is open, as admin."""
        return self.api_keys is not None or bool(self.admin_keys)

    def __post_init__(self) -> None:
        open_off_loopback = not self.keyed and not is_loopback(self.host)  # anyone who reaches it is admin
        if open_off_loopback and not self.insecure_no_api_keys:
            raise InvalidRequestError(
                f"refusing to serve {self.host} without --api-keys: every client that reaches it could load adapters "
                "from the server's disk and read every tenant's traffic. Give --api-keys FILE (or --api-key KEY), "
                "bind a loopback address (--host 127.0.0.1), or pass --insecure-no-api-keys to allow it anyway")
        tenant_flags = self.tenant_weights or any(v is not None for v in (
            self.tenant_max_in_flight, self.tenant_requests_per_minute, self.tenant_tokens_per_minute))
        if tenant_flags and self.keyed:
            raise InvalidRequestError("--tenant-* flags set a keyless server's tenants (its adapters); with API keys "
                                      "each key is a tenant: set its weight and caps in the keys file")
        for name, weight in self.tenant_weights:
            if not 0 < weight <= 1000:
                raise InvalidRequestError(f"--tenant-weight {name}={weight:g}: a weight is in (0, 1000]")
        for flag, cap in (("--tenant-max-in-flight", self.tenant_max_in_flight),
                          ("--tenant-requests-per-minute", self.tenant_requests_per_minute),
                          ("--tenant-tokens-per-minute", self.tenant_tokens_per_minute)):
            if cap is not None and cap < 1:
                raise InvalidRequestError(f"{flag} {cap}: a cap is at least 1")
        if self.any_adapter_path and open_off_loopback:
            raise InvalidRequestError(
                f"refusing VLLM_ALLOW_RUNTIME_LORA_UPDATING on {self.host} without API keys: anyone who reaches the "
                "server could make it read any file it can. Give --api-keys FILE (or --api-key KEY), or bind a "
                "loopback address")
        if "*" in self.allowed_origins and not self.keyed:
            raise InvalidRequestError(
                "refusing --allowed-origins '*' without API keys: any web page its visitors open could use this "
                "server as admin. Give --api-keys FILE (or --api-key KEY), or name the origins you trust")
        checks = [
            (0 <= self.port < 65536, f"port must be in [0, 65535], got {self.port}"),
            (self.max_queue >= 0, "max_queue must be >= 0"),
            (self.drain_timeout >= 0, "drain_timeout must be >= 0"),
            (self.torch_threads is None or self.torch_threads >= 1, "torch_threads must be >= 1"),
            (self.max_metric_labels >= 1, "max_metric_labels must be >= 1"),
            (self.max_body_size >= 1024, "max_body_size must be >= 1024 bytes"),
            (self.body_timeout > 0, "body_timeout must be > 0"),
            (self.header_timeout > 0, "header_timeout must be > 0"),
            (self.limit_concurrency >= 1, "limit_concurrency must be >= 1"),
            (self.timeout_keep_alive >= 1, "timeout_keep_alive must be >= 1"),
            (all(k.strip() for k in self.admin_keys), "an --api-key is empty"),
            (self.root_path == "" or (self.root_path.startswith("/") and not self.root_path.endswith("/")),
             f"root_path must start with '/' and not end with one (e.g. /api), got {self.root_path!r}"),
            (all(o == "*" or ORIGIN_FORM.fullmatch(o) for o in self.allowed_origins),
             f"each allowed origin is '*' or scheme://host[:port], got {list(self.allowed_origins)}"),
            (self.log_level in LOG_LEVELS, f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(message)
