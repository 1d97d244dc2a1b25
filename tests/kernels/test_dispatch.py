"""The backend switch of userllm.kernels: environment variable, use_backend, automatic choice, errors."""

import pytest
import torch

import userllm.kernels as kernels
from precision import assert_within_reference_error
from userllm.kernels import dispatch, reference

CPU = torch.device("cpu")
OPS = ("embedding_concat", "latent_cross_attention", "cached_cross_attention")


@pytest.fixture(autouse=True)
def _clean_switch(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    with kernels.use_backend(None):
        yield


def test_public_api():
    assert set(kernels.__all__) == {*OPS, "use_backend", "get_backend", "select_backend"}
    for name in OPS:
        assert callable(getattr(kernels, name))
    # importing the Triton modules (named like the ops) must not replace the public ops
    from userllm.kernels.ops import cached_cross_attention, embedding_concat, latent_cross_attention  # noqa: F401
    for name in OPS:
        assert getattr(kernels, name) is getattr(dispatch, name)


def test_environment_variable_and_use_backend(monkeypatch):
    assert kernels.get_backend() == "auto"
    monkeypatch.setenv(dispatch.ENV_VAR, " Reference ")
    assert kernels.get_backend() == "reference"
    with kernels.use_backend("triton"):
        assert kernels.get_backend() == "triton"
        with kernels.use_backend("native"):
            assert kernels.get_backend() == "native"
        assert kernels.get_backend() == "triton"
    assert kernels.get_backend() == "reference"
    kernels.use_backend("triton")  # plain call: a setter
    assert kernels.get_backend() == "triton"
    kernels.use_backend(None)
    assert kernels.get_backend() == "reference"


def test_unknown_backend_raises(monkeypatch):
    with pytest.raises(ValueError, match="unknown kernel backend"):
        kernels.use_backend("cuda")
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        kernels.get_backend()


@pytest.mark.parametrize("native", [True, False], ids=["native_built", "no_native"])
def test_auto_on_cpu(monkeypatch, native):
    monkeypatch.setattr(dispatch, "native_available", lambda device_type="cpu": native)
    assert dispatch.resolve("embedding_concat", CPU) == ("native" if native else "reference")
    assert dispatch.resolve("latent_cross_attention", CPU) == "sdpa"
    assert dispatch.resolve("cached_cross_attention", CPU) == "sdpa"
    # few keys: the reference is faster on CPU (measured; see dispatch.SDPA_MIN_KEYS)
    assert dispatch.resolve("cached_cross_attention", CPU, dispatch.SDPA_MIN_KEYS - 1) == "reference"
    assert dispatch.resolve("latent_cross_attention", CPU, dispatch.SDPA_MIN_KEYS) == "sdpa"
    assert dispatch.resolve("cached_cross_attention", torch.device("cuda")) == "triton"


def test_forced_backends(monkeypatch):
    monkeypatch.setattr(dispatch, "native_available", lambda device_type="cpu": False)
    monkeypatch.setattr(dispatch, "_warned", set())
    with kernels.use_backend("reference"):
        assert dispatch.resolve("embedding_concat", torch.device("cuda")) == "reference"
    with kernels.use_backend("native"):
        with pytest.warns(RuntimeWarning, match="native kernel library"):
            assert dispatch.resolve("embedding_concat", CPU) == "reference"
        assert dispatch.resolve("cached_cross_attention", CPU) == "sdpa"  # no native attention: auto
    with kernels.use_backend("sdpa"):
        assert dispatch.resolve("cached_cross_attention", torch.device("cuda")) == "sdpa"
        assert dispatch.resolve("embedding_concat", CPU) == "reference"  # no SDPA embedding: auto
    with kernels.use_backend("triton"):
        monkeypatch.setattr(dispatch, "triton_interpreted", lambda: False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            dispatch.resolve("embedding_concat", CPU)
        assert dispatch.resolve("embedding_concat", torch.device("cuda")) == "triton"


def test_calls_reach_the_selected_implementation(monkeypatch):
    calls = []
    real = reference.cached_cross_attention

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(reference, "cached_cross_attention", spy)
    q, kv = torch.randn(2, 1, 4, 16), torch.randn(2, 3, 2, 16)
    lens = torch.tensor([3, 1])
    with kernels.use_backend("reference"):
        kernels.cached_cross_attention(q, kv, kv, lens)
    assert len(calls) == 1
    if torch.cuda.is_available() or dispatch.triton_interpreted():
        # Compiled Triton takes CUDA tensors only (seen on an H200: CPU tensors failed here); the interpreter, CPU ones.
        device = "cpu" if dispatch.triton_interpreted() else "cuda"
        q, kv, lens = q.to(device), kv.to(device), lens.to(device)
        with kernels.use_backend("triton"):
            out = kernels.cached_cross_attention(q, kv, kv, lens)
        assert len(calls) == 1  # the Triton op, not the reference
        exact = real(q.double(), kv.double(), kv.double(), lens)
        assert_within_reference_error(["out"], [out], [real(q, kv, kv, lens)], [exact], q.dtype)


@pytest.mark.parametrize("case", ["reference", "cuda_triton", "cuda_no_triton", "cpu_native", "cpu_no_native"])
def test_select_backend_sets_the_switch_and_names_the_path(monkeypatch, case):
    """The run-level choice of --fused-kernels: what it sets and the line it returns."""
    monkeypatch.setattr(dispatch, "_triton_importable", lambda: case != "cuda_no_triton")
    monkeypatch.setattr(dispatch, "native_available", lambda device_type="cpu": case == "cpu_native")
    device = torch.device("cuda" if case.startswith("cuda") else "cpu")
    line = kernels.select_backend(case != "reference", device)
    want = {"reference": ("reference", "PyTorch reference ops"), "cuda_triton": ("triton", "fused Triton"),
            "cuda_no_triton": ("reference", "not installed"), "cpu_native": ("native", "native C++"),
            "cpu_no_native": ("sdpa", "not built")}[case]
    assert kernels.get_backend() == want[0]
    assert line.startswith("kernels: ") and want[1] in line and "\n" not in line


def test_no_import_circle_inside_kernels():
    """The modules of kernels/ import each other without a cycle (an op module must not import the
    dispatcher that imports it); read from the source with ast, lazy imports inside functions included
    (edges to an enclosing package are left out: it is always mid-import when its submodule runs)."""
    import ast
    from pathlib import Path

    root = Path(dispatch.__file__).resolve().parent
    modules, packages = {}, {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
            packages[".".join(parts)] = parts
        else:
            packages[".".join(parts)] = parts[:-1]
        modules[".".join(parts)] = path
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = packages[name][:len(packages[name]) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                for c in [target] + [f"{target}.{a.name}".lstrip(".") for a in node.names]:
                    # an enclosing package is already being imported when its submodule runs: no edge
                    if c in modules and c != name and not name.startswith(f"{c}.") and c != "":
                        deps.add(c)
        graph[name] = deps
    # the parse sees the edges (the lazy op imports of dispatch too)
    assert "dispatch" in graph[""] and {"env", "ops.cached_cross_attention"} <= graph["dispatch"], graph
    assert graph["ops.cached_cross_attention"] == {"ops.attention", "reference"} and "env" in graph["ops.attention"], graph
    state: dict[str, int] = {}

    def visit(node, trail):
        if state.get(node) == 1:
            raise AssertionError("import circle: " + " -> ".join(trail + [node]))
        if state.get(node) != 2:
            state[node] = 1
            for dep in sorted(graph[node]):
                visit(dep, trail + [node])
            state[node] = 2

    for name in sorted(graph):
        visit(name, [])
    assert "dispatch" not in set().union(*(graph[m] for m in graph if m.startswith("ops")))
