"""The layering the README promises, read from the source: dependencies point one way (server -> engine ->
models, lora, adapters, quant), no import cycle between modules, the server reaches adapters only through the
engine, models/ knows nothing of LoRA or adapters, and the modules that must load without torch do."""

from __future__ import annotations

import ast
import inspect
import pickle
import subprocess
import sys
from pathlib import Path

import loraplex

SRC = Path(loraplex.__file__).parent


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool) -> set[str]:
    """loraplex modules `path` imports (at module level only, or anywhere, functions included)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.If) and top_level_only:  # `if TYPE_CHECKING:` imports never run
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("loraplex"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("loraplex"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from loraplex.lora import kernel_choice`
    return found


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def resolved(names: set[str]) -> set[str]:
    return {n for n in names if n in MODULES}


def test_no_import_cycles() -> None:
    graph = {m: resolved(imports(p, top_level_only=True)) - {m} for m, p in MODULES.items()}
    # A package's __init__ importing its own submodules is not a cycle through the package.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_layers_point_one_way() -> None:
    """server/ talks to the engine, never to adapters/ directly; models/ never imports lora, adapters, quant,
    engine or server; the cluster (server and engine over Ray Serve) sits above the server, and only the CLI
    imports it; of adapters/ it sees the names and keys (adapters/key.py) only, the rest through the engine;
    nothing below the server imports it or the CLI."""
    for m, p in MODULES.items():
        used = imports(p, top_level_only=False)
        if m.startswith("loraplex.server"):
            assert not {u for u in used if u.startswith(("loraplex.adapters", "loraplex.cluster"))}, m
        if m.startswith("loraplex.models"):
            banned = ("loraplex.lora", "loraplex.adapters", "loraplex.quant", "loraplex.engine", "loraplex.server")
            assert not {u for u in used if u.startswith(banned)}, m
        if m.startswith("loraplex.cluster"):  # the engine's model code, kernels and adapter state only through it
            assert not {u for u in used if u.startswith(("loraplex.models", "loraplex.lora", "loraplex.quant"))}, m
            internals = {u for u in used if u.startswith("loraplex.adapters") and not u.startswith("loraplex.adapters.key")}
            assert not internals, (m, internals)  # adapter names and keys, never the registry, tiers or manager
        if not m.startswith(("loraplex.server", "loraplex.cli", "loraplex.cluster", "loraplex.entrypoints")):
            assert not {u for u in used if u.startswith(("loraplex.server", "loraplex.cli"))}, m
        if not m.startswith(("loraplex.cli", "loraplex.cluster")):
            assert not {u for u in used if u.startswith("loraplex.cluster")}, m


def test_ray_stays_in_the_cluster_package() -> None:
    """Ray is the cluster's dependency only: the engine and the single server run without it."""
    for m, p in MODULES.items():
        if not m.startswith("loraplex.cluster"):
            tree = ast.parse(p.read_text())
            names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            assert not {n for n in names if n == "ray" or n.startswith("ray.")}, m


def test_scheduler_and_flags_load_without_torch() -> None:
    """The scheduler and block manager (unit-tested in milliseconds), the adapter bookkeeping, the configs and
    `loraplex --help` import no torch."""
    code = ("import sys, loraplex, loraplex.config, loraplex.units, loraplex.engine.scheduler, "
            "loraplex.engine.block_manager, loraplex.adapters.slots, loraplex.adapters.registry, "
            "loraplex.adapters.host_cache, loraplex.adapters.residency, loraplex.adapters.key, loraplex.training.config, "
            "loraplex.cli\n"
            "try:\n    loraplex.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('loraplex'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_the_cluster_ingress_loads_without_torch(default_model_dir: Path, tmp_path: Path) -> None:
    """The Ray ingress (cluster/app.py: routes, keys, routing, the remote engine) runs on a CPU-only process
    without the model: importing it and the HTTP app, and unpickling a replica's facts and tokenizer as Ray hands
    them over, import no torch, so the ingress pays neither torch's start nor its memory."""
    from transformers import AutoTokenizer

    from loraplex.engine.facts import EngineFacts, MemoryPlan

    facts = EngineFacts("m", default_model_dir, 512, 16, 8, "float32", "auto", "cpu",
                        MemoryPlan("none", 1, 1, 1, 16, 512, 1, 1), 5.0)
    handed = tmp_path / "facts.pkl"
    handed.write_bytes(pickle.dumps((facts, AutoTokenizer.from_pretrained(default_model_dir))))
    code = ("import pickle, sys, loraplex.cluster.app, loraplex.cluster.remote_engine, loraplex.server.app\n"
            f"facts, tokenizer = pickle.loads(open({str(handed)!r}, 'rb').read())\n"
            "tokenizer.apply_chat_template([{'role': 'user', 'content': 'Hi'}], add_generation_prompt=True)\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('loraplex'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_adapter_state_lives_in_the_residency_table() -> None:
    """In adapters/, only the residency table keeps containers in its instances (state per adapter version); the
    catalog (the registry and its file) keeps its persisted entries, the metrics their counts per tier. The tiers are
    policies over the table, and the manager holds the table: no second map of users, pins, slots or weights to keep
    in step."""
    containers = {"dict", "set", "OrderedDict", "defaultdict", "Counter", "list"}
    allowed = {"loraplex.adapters.residency", "loraplex.adapters.registry", "loraplex.adapters.registry_file",
               "loraplex.adapters.metrics"}
    for m, p in MODULES.items():
        if not m.startswith("loraplex.adapters.") or m in allowed:
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                on_self = [t for t in targets if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                           and t.value.id == "self"]
                value = node.value
                made = isinstance(value, ast.Dict | ast.Set | ast.List | ast.DictComp | ast.SetComp | ast.ListComp) or (
                    isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id in containers)
                assert not (on_self and made), f"{m}:{node.lineno} keeps a container of its own"


def test_adapter_administration_is_declared_once() -> None:
    """Each administration operation (and each hook a cluster replica runs on its engine) is one message in
    engine/admin.py, run over the manager there; an engine offers them all through one method, `admin(op)`. No
    engine, replica or route declares an operation of its own (the relay of methods this replaced restated each one
    in up to five places). LLM.register_adapter stays: the offline API users call."""
    from loraplex.engine import admin

    relays = {"register_adapter", "unregister_adapter", "promote_adapter", "pin_adapter", "list_adapters",
              "prefetch_adapter", "is_resident", "sync_adapters", "readmit_adapters", "registry_version"}
    ops = {name for name, obj in vars(admin).items()
           if isinstance(obj, type) and issubclass(obj, admin.AdminOp) and not inspect.isabstract(obj)}
    assert ops == {"Register", "Unregister", "Promote", "Pin", "ListAdapters",  # the admin routes'
                   "Prefetch", "IsResident", "SyncRegistry", "Readmit", "RegistryVersion"}  # a replica's hooks
    for m, p in MODULES.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ClassDef) and m != "loraplex.engine.admin":
                bases = {b.value.id if isinstance(b, ast.Subscript) and isinstance(b.value, ast.Name) else
                         getattr(b, "id", None) for b in node.bases}
                assert not bases & {"AdminOp", "LocalOp"}, f"{m}: {node.name} declares an op outside engine/admin.py"
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in relays:
                assert (m, node.name) == ("loraplex.llm", "register_adapter"), f"{m}: {node.name} restates an op"
    admins = [m for m, p in MODULES.items() if "def admin(self, op: AdminOp" in p.read_text()]
    assert sorted(admins) == ["loraplex.cluster.remote_engine", "loraplex.cluster.replica",
                              "loraplex.engine.async_engine", "loraplex.engine.client", "loraplex.engine.llm_engine"]


def test_text_becomes_a_target_once_per_entry_point() -> None:
    """A request's adapter is text only where it enters: the server parses the `model` field after the key's check
    (ServerState.resolve_model); a Python caller's text goes through adapters/key.py's parse_target (LLMEngine's
    add_request and prompt_logits, AsyncLLMEngine.generate, Ray's model id in the Prefetch op). Below them a typed
    target is passed on. The engines behind the server take token ids: neither AsyncLLMEngine nor the cluster's
    engines call a tokenizer (the server tokenizes once, on its prepare workers)."""
    parses = {m for m, p in MODULES.items() if "AdapterSpec.parse(" in p.read_text()}
    assert parses == {"loraplex.adapters.key", "loraplex.server.state"}
    for m in ("loraplex.engine.async_engine", "loraplex.cluster.remote_engine", "loraplex.cluster.replica"):
        assert ".encode(" not in MODULES[m].read_text(), f"{m} tokenizes"
    for m, p in MODULES.items():
        calls = p.read_text().count("parse_target(")
        allowed = {"loraplex.adapters.key": 3, "loraplex.engine.llm_engine": 2, "loraplex.engine.async_engine": 1,
                   "loraplex.engine.admin": 1}.get(m, 0)
        assert calls <= allowed, f"{m} parses adapter text {calls} times"
