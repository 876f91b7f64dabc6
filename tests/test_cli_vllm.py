"""vLLM's serve command line, taken as vLLM users write it: --model, --enable-lora, JSON --lora-modules,
--quantization, --api-key (and its environment variables), --config FILE.yaml, --device, --chat-template, --version,
and --help with every default. Parsing tests build the configs without loading a model; one test serves."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import httpx
import openai
import pytest

from loraplex.cli import _server_configs, build_parser, main, parse
from loraplex.config import EngineConfig, ServerConfig
from loraplex.errors import InvalidRequestError
from server_util import dies_with_this_process, free_port, stop, wait_up

REPO = Path(__file__).resolve().parents[1]


def configs(*argv: str) -> tuple[EngineConfig, ServerConfig]:
    return _server_configs(parse(["serve", *argv]))


def refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The one-line error of a refused command line (exit status 2)."""
    with pytest.raises(SystemExit) as exc:
        main(["serve", *argv])
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_batch_invariance_is_on_where_tenants_hold_keys(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--batch-invariant defaults to on with --api-keys (tenants who do not trust each other) and off without;
    vLLM's VLLM_BATCH_INVARIANT=1 turns it on; the flag, either way, wins."""
    keys = str(tmp_path / "keys.json")
    monkeypatch.delenv("VLLM_BATCH_INVARIANT", raising=False)
    assert not configs()[0].batch_invariant and configs("--api-keys", keys)[0].batch_invariant
    assert configs("--batch-invariant")[0].batch_invariant
    assert not configs("--api-keys", keys, "--no-batch-invariant")[0].batch_invariant
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "1")
    assert configs()[0].batch_invariant and not configs("--no-batch-invariant")[0].batch_invariant


def test_vllms_lora_command_line_is_taken() -> None:
    engine, server = configs(
        "--model", "base-dir", "--enable-lora", "--max-lora-rank", "64", "--quantization", "bitsandbytes",
        "--lora-modules", '{"name": "a", "path": "/ad/a", "base_model_name": "base-dir"}', "b=/ad/b",
        "--lora-modules", '{"name": "c", "path": "/ad/c"}', "--api-key", "k1", "k2", "--device", "cpu")
    assert engine.model == "base-dir" and engine.max_lora_rank == 64 and engine.quantization == "nf4"
    assert configs("--model", "m.gguf", "--quantization", "gguf")[0].quantization == "gguf"  # the file's own blocks
    assert engine.lora_modules == (("a", "/ad/a"), ("b", "/ad/b"), ("c", "/ad/c"))
    assert engine.device == "cpu" and engine.enable_lora
    assert server.admin_keys == ("k1", "k2") and server.api_keys is None and server.keyed
    assert "k1" not in repr(server)  # keys are secrets: never in a logged config


def test_the_positional_model_and_model_flag_are_one_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert configs("dir-a")[0].model == "dir-a"
    assert configs("--model", "dir-a", "dir-a")[0].model == "dir-a"
    assert "the model is given twice" in refused(capsys, "dir-a", "--model", "dir-b")


def test_api_key_is_not_read_as_api_keys(capsys: pytest.CaptureFixture[str]) -> None:
    """Flags are taken only as written: --api-key is its own flag, and a shortened flag is refused."""
    _, server = configs("--api-key", "secret")
    assert server.admin_keys == ("secret",) and server.api_keys is None
    assert "unrecognized arguments: --api-ke" in refused(capsys, "--api-ke", "secret")


def test_api_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_API_KEY", "from-vllm")
    assert configs()[1].admin_keys == ("from-vllm",)
    monkeypatch.setenv("LORAPLEX_API_KEY", "from-loraplex")
    assert configs()[1].admin_keys == ("from-loraplex", "from-vllm")
    assert configs("--api-key", "flag")[1].admin_keys == ("flag",)  # the flag wins over the environment


def test_api_keys_join_the_keys_file(tmp_path: Path) -> None:
    from loraplex.server.auth import server_keys

    keys_file = tmp_path / "keys.json"
    keys_file.write_text('{"keys": {"sk-tenant": {"adapters": ["a"]}}}')
    keys = server_keys(keys_file, ("sk-admin",))
    assert keys is not None and keys["sk-admin"].admin and keys["sk-admin"].may_use("anything")
    assert not keys["sk-tenant"].admin
    with pytest.raises(InvalidRequestError, match="also in the API keys file"):
        server_keys(keys_file, ("sk-tenant",))  # its scope would be ambiguous
    assert server_keys(None) is None


def test_a_keyed_server_may_bind_a_public_address() -> None:
    assert configs("--host", "0.0.0.0", "--api-key", "k")[1].host == "0.0.0.0"
    with pytest.raises(InvalidRequestError, match="--api-key KEY"):
        configs("--host", "0.0.0.0")


def test_vllms_runtime_lora_switch(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """VLLM_ALLOW_RUNTIME_LORA_UPDATING=True lets runtime loads read any path; without it they stay confined to
    --adapter-dir and --allowed-adapter-roots; an open server with it stays on loopback."""
    from loraplex.server.serve import adapter_roots

    engine, server = configs("--adapter-dir", "/srv/adapters")
    assert not server.any_adapter_path and adapter_roots(engine, server) == (Path("/srv/adapters"),)
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    engine, server = configs("--adapter-dir", "/srv/adapters")
    assert server.any_adapter_path and adapter_roots(engine, server) is None  # None: any path the server can read
    assert configs("--host", "0.0.0.0", "--api-key", "k")[1].any_adapter_path
    with pytest.raises(InvalidRequestError, match="refusing VLLM_ALLOW_RUNTIME_LORA_UPDATING on 0.0.0.0"):
        configs("--host", "0.0.0.0", "--insecure-no-api-keys")
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "false")
    assert not configs()[1].any_adapter_path
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "maybe")
    assert "set it to True or False" in refused(capsys)


def test_cors_and_root_path_forms(capsys: pytest.CaptureFixture[str]) -> None:
    _, server = configs("--root-path", "/api", "--allowed-origins", "https://ui.example", "http://localhost:3000")
    assert server.root_path == "/api" and server.allowed_origins == ("https://ui.example", "http://localhost:3000")
    assert configs("--allowed-origins", "*", "--api-key", "k")[1].allowed_origins == ("*",)
    with pytest.raises(InvalidRequestError, match="refusing --allowed-origins '\\*' without API keys"):
        configs("--allowed-origins", "*")  # any page a visitor opens could drive an open server as admin
    with pytest.raises(InvalidRequestError, match="root_path must start with '/'"):
        configs("--root-path", "api/")
    with pytest.raises(InvalidRequestError, match="scheme://host"):
        configs("--allowed-origins", "ui.example/path")


def test_the_dashboard_uses_relative_urls_only() -> None:
    """Behind a proxy's --root-path the page's own URLs must stay under the prefix."""
    static = REPO / "src" / "loraplex" / "server" / "static"
    for name in ("dashboard.html", "dashboard.js"):
        text = (static / name).read_text()
        assert '"/v1' not in text and '"/dashboard' not in text, name


@pytest.mark.parametrize("module, message", [
    ('{"name": "a"}', "needs a non-empty string 'path'"),
    ('{"name": "a", "path": "/p", "rank": 8}', "unknown field(s) rank"),
    ('{"name": "a", "path": ', "is not valid JSON"),
    ('["a", "/p"]', "NAME=PATH or a JSON object"),
    ("just-a-name", "NAME=PATH or a JSON object"),
    ('{"name": "a", "path": "/p", "base_model_name": 3}', "base_model_name must be a string"),
])
def test_a_bad_lora_module_names_itself(capsys: pytest.CaptureFixture[str], module: str, message: str) -> None:
    err = refused(capsys, "--lora-modules", module)
    assert message in err and "Traceback" not in err


def test_a_base_model_name_of_another_model_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    configs("--model", "my-base", "--lora-modules", '{"name": "a", "path": "/p", "base_model_name": "other-base"}')
    assert "base_model_name 'other-base'" in caplog.text


def test_config_file_sets_flags_and_the_command_line_wins(tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("model: from-file\nport: 9001\nhost: 127.0.0.1\nenable-lora: true\n"
                      "enable_prefix_caching: false\nmax-loras: 4\nlora-modules:\n  - a=/ad/a\n"
                      "  - {name: b, path: /ad/b, base_model_name: from-file}\n")
    engine, server = configs("--config", str(config), "--port", "9002")
    assert server.port == 9002  # the command line's own flag
    assert engine.model == "from-file" and engine.max_loras == 4 and not engine.enable_prefix_caching
    assert engine.lora_modules == (("a", "/ad/a"), ("b", "/ad/b"))
    engine, _ = configs("--config", str(config), "--lora-modules", "c=/ad/c")
    assert dict(engine.lora_modules) == {"a": "/ad/a", "b": "/ad/b", "c": "/ad/c"}  # both lists are registered


@pytest.mark.parametrize("text, message", [
    ("no-such-flag: 1\n", "unknown setting 'no-such-flag'"),
    ("port: [1, 2]\n", "port takes one value"),
    ("enable-lora: maybe\n", "enable-lora takes true or false"),
    ("- port\n", "must map flag names to values"),
    ("port: {\n", "is not valid YAML"),
])
def test_a_bad_config_file_names_the_setting(capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str,
                                             message: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    assert message in refused(capsys, "--config", str(config))


def test_a_missing_config_file_is_named(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert "cannot read it" in refused(capsys, "--config", str(tmp_path / "nope.yaml"))


def test_the_module_form_is_serve() -> None:
    """`python -m loraplex.entrypoints.openai.api_server` takes serve's flags and refuses as serve does."""
    module = [sys.executable, "-m", "loraplex.entrypoints.openai.api_server"]
    version = subprocess.run([*module, "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("loraplex ")
    bad = subprocess.run([*module, "--lora-modules", '{"name": "a"}'], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "needs a non-empty string 'path'" in bad.stderr


def test_vllms_flags_are_accepted_mapped_or_refused_never_dropped(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(["serve", "--enforce-eager", "-tp", "1", "--trust-remote-code", "--disable-log-requests", "my-model",
                  "--seed", "7", "--gpu-memory-utilization", "0.5", "--block-size", "32", "--max-num-seqs", "8",
                  "--max-cpu-loras", "4", "--uvicorn-log-level", "WARNING"])
    engine, server = _server_configs(args)
    assert engine.model == "my-model"  # "-tp 1" is vLLM's flag and its value, never the positional model
    assert (engine.seed, engine.gpu_memory_utilization, engine.block_size) == (7, 0.5, 32)
    assert engine.max_num_seqs == 8 and engine.max_cpu_loras == 4 and server.log_level == "warning"
    notes = "\n".join(args.vllm_notes)
    for logged in ("--enforce-eager: accepted", "--tensor-parallel-size 1: accepted", "--trust-remote-code: accepted",
                   "--disable-log-requests: accepted", "--seed 7: sets loraplex's engine_seed"):
        assert notes.count(logged) == 1, logged
    assert "never runs code from a model's repository" in notes
    for argv, reason in [(["--tensor-parallel-size", "2"], "loraplex cluster --replicas N"),
                         (["-pp=2"], "one engine on one device"),
                         (["--ssl-keyfile", "k.pem"], "terminate TLS in a reverse proxy"),
                         (["--limit-mm-per-prompt", "{}"], "text-only models"),
                         (["--no-enforce-eager"], "no CUDA graphs"),
                         (["--kv-cache-dtype", "fp8"], "model's dtype")]:
        err = refused(capsys, *argv)
        assert f"vLLM's {argv[0].split('=')[0].replace('-pp', '--pipeline-parallel-size')}" in err and reason in err
    assert "unrecognized arguments: --no-such-flag" in refused(capsys, "--no-such-flag")


def test_accepted_flags_are_in_the_servers_log() -> None:
    """The notes reach the log: here ahead of a refusal that stops the start before the model loads."""
    done = subprocess.run([sys.executable, "-m", "loraplex.cli", "serve", "--enforce-eager", "--host", "0.0.0.0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "refusing to serve 0.0.0.0" in done.stderr
    assert "vLLM's --enforce-eager: accepted, loraplex captures no CUDA graphs" in done.stderr


def test_vllms_flags_in_a_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "vllm.yaml"
    config.write_text("enforce-eager: true\ntensor-parallel-size: 1\ngpu-memory-utilization: 0.8\nseed: 3\n")
    engine, _ = configs("--config", str(config), "--seed", "4")
    assert engine.gpu_memory_utilization == 0.8 and engine.seed == 4  # the command line's own flag wins
    config.write_text("tensor-parallel-size: 2\n")
    assert "vLLM's --tensor-parallel-size 2 is refused" in refused(capsys, "--config", str(config))


def test_every_vllm_flag_has_one_documented_outcome() -> None:
    """docs/vllm_flags.md is the table cli_vllm.py makes (rerun `.venv/bin/python src/loraplex/cli_vllm.py`)."""
    from loraplex.cli_vllm import flag_doc
    from loraplex.vllm_flag_rules import CATALOG
    from loraplex.vllm_serve_flags import SERVE_FLAGS

    assert len(SERVE_FLAGS) > 300 and {"--enforce-eager", "-tp", "--gpu-memory-utilization"} <= set(CATALOG)
    assert (REPO / "docs" / "vllm_flags.md").read_text() == flag_doc()


def test_gpu_memory_utilization_sizes_the_kv_cache() -> None:
    from loraplex.engine.memory import utilization_budget

    gib = 1 << 30
    assert utilization_budget(0.9, 80 * gib, 10 * gib, 2 * gib) == int(0.9 * 80 * gib) - 12 * gib
    with pytest.raises(InvalidRequestError, match="nothing is left for the KV cache"):
        utilization_budget(0.1, 80 * gib, 10 * gib, 0)
    with pytest.raises(InvalidRequestError, match="gpu_memory_utilization must be in"):
        EngineConfig(gpu_memory_utilization=1.5)


def _every_action(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.Action]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += [(f"{name} {a.dest}", a) for _, a in _every_action(sub)]
        else:
            found.append((action.dest, action))
    return found


def test_every_flag_has_a_help_text_and_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    missing = [name for name, a in _every_action(build_parser()) if not a.help]
    assert not missing, f"flags without a help text (their default would not show in --help): {missing}"
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "TCP port (default: 8000)" in out and "(default: info)" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--version"], ["serve", "--version"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0 and capsys.readouterr().out.startswith("loraplex ")


def test_device_forms() -> None:
    from loraplex.hardware import resolve_device

    import torch

    assert EngineConfig(device="auto").device == "auto" and EngineConfig(device="cuda:1").device == "cuda:1"
    with pytest.raises(InvalidRequestError, match="device must be auto, cpu, cuda or cuda:N"):
        EngineConfig(device="gpu")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the CPU-only forms below do not apply")
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(InvalidRequestError, match="torch sees 0 CUDA device"):
        resolve_device("cuda")


def test_a_chat_template_that_cannot_render_is_refused(default_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from loraplex.engine.chat_template import use_chat_template

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    with pytest.raises(InvalidRequestError, match="chat template cannot render"):
        use_chat_template(tokenizer, "{% for m in messages %}{{ m.content ")
    use_chat_template(tokenizer, "{% for m in messages %}<<{{ m.content }}>>{% endfor %}")
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "<<x>>"


def test_chat_template_is_a_file_or_the_text(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    (tmp_path / "t.jinja").write_text(template)
    assert configs("--chat-template", str(tmp_path / "t.jinja"))[0].chat_template == template
    assert configs("--chat-template", template)[0].chat_template == template
    assert "cannot read it" in refused(capsys, "--chat-template", str(tmp_path / "missing.jinja"))


@pytest.mark.slow
def test_a_server_started_with_vllms_command_line(adapter_factory: Callable[..., Path], tmp_path: Path) -> None:
    """vLLM's LoRA command line, in vLLM's module form, from a --config file and flags, serves the openai client:
    the JSON module's adapter answers, lineage shows in /v1/models, the key is required, the chat template is the
    one given, the root path and CORS hold."""
    adapter = adapter_factory("vllm-cli", r=8, seed=5)
    (tmp_path / "serve.yaml").write_text(f"enable-lora: true\nmax-lora-rank: 64\nmax-model-len: 512\n"
                                         f"lora-modules:\n  - '{json.dumps({'name': 'tenant', 'path': str(adapter)})}'\n")
    (tmp_path / "chat.jinja").write_text("{% for m in messages %}User: {{ m.content }}\n{% endfor %}Assistant:")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "loraplex.entrypoints.openai.api_server", "--model", "SmolLM2-135M-Instruct",
         "--port", str(port),
         "--config", str(tmp_path / "serve.yaml"), "--enable-lora",
         "--chat-template", str(tmp_path / "chat.jinja"), "--dtype", "float32", "--log-level", "warning",
         "--root-path", "/api", "--allowed-origins", "https://ui.example", "--enforce-eager",
         "--tensor-parallel-size", "1", "--trust-remote-code", "--disable-log-requests",
         "--gpu-memory-utilization", "0.9"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=dies_with_this_process,
        env={**os.environ, "VLLM_API_KEY": "sk-vllm", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
             "PYTHONUNBUFFERED": "1"})
    try:
        wait_up(url, proc, within=120)
        client = openai.OpenAI(base_url=url + "/v1", api_key="sk-vllm")
        models = {m.id: m for m in client.models.list().data}
        assert models["tenant"].model_extra["parent"] == "SmolLM2-135M-Instruct"
        messages = [{"role": "user", "content": "Name a colour."}]
        for model in ("SmolLM2-135M-Instruct", "tenant"):
            out = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0)
            assert out.choices[0].message.content is not None and out.usage.completion_tokens > 0
        # The given template renders the prompt: the chat's prompt is the template's text, token for token.
        prompt = client.completions.create(model="tenant", prompt="User: Name a colour.\nAssistant:", max_tokens=1)
        chat = client.chat.completions.create(model="tenant", messages=messages, max_tokens=1)
        assert chat.usage.prompt_tokens == prompt.usage.prompt_tokens
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong").models.list()
        # vLLM's switch: a runtime load from a path under no adapter root (there is none) is allowed, for the admin.
        later = adapter_factory("vllm-cli-later", r=4, seed=6)
        loaded = httpx.post(url + "/v1/load_lora_adapter", headers={"Authorization": "Bearer sk-vllm"},
                            json={"lora_name": "later", "lora_path": str(later)}, timeout=60)
        assert loaded.status_code == 200, loaded.text
        out = client.chat.completions.create(model="later", messages=messages, max_tokens=2)
        assert out.usage.completion_tokens > 0
        # --root-path: the proxy strips /api before forwarding; /health stays public, the schema names the prefix.
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.get(url + "/openapi.json").json()["servers"] == [{"url": "/api"}]
        # --allowed-origins: a browser's preflight (no key) is answered for that origin only.
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
        ok = httpx.options(url + "/v1/chat/completions", headers={"Origin": "https://ui.example", **preflight})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://ui.example"
        other = httpx.options(url + "/v1/chat/completions", headers={"Origin": "https://evil.example", **preflight})
        assert "access-control-allow-origin" not in other.headers
        listed = httpx.get(url + "/v1/models", headers={"Origin": "https://ui.example",
                                                        "Authorization": "Bearer sk-vllm"})
        assert listed.status_code == 200 and listed.headers["access-control-allow-origin"] == "https://ui.example"
    finally:
        stop(proc)
