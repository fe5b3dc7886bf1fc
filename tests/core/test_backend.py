"""ssm_core.ops.backend: the op -> kernel table is complete, resolvable and the only way ops reach kernels."""

import ast
from pathlib import Path

import pytest
import torch

import ssm_core
from ssm_core.ops import backend
from ssm_core.ops.backend import KERNELS, fast_path, load_kernel

SSM_CORE = Path(ssm_core.__file__).resolve().parent


def _fast_path_ops() -> dict[str, list[str]]:
    """Every ``fast_path(backend, device, "op")`` call in ssm_core: op name -> where ("file:line")."""
    found: dict[str, list[str]] = {}
    for path in sorted(SSM_CORE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None))
                    == "fast_path"):
                continue
            arg = node.args[2] if len(node.args) > 2 else next(k.value for k in node.keywords if k.arg == "op")
            where = f"{path.relative_to(SSM_CORE)}:{node.lineno}"
            assert isinstance(arg, ast.Constant), f"{where}: fast_path's op must be a literal name"
            found.setdefault(arg.value, []).append(where)
    return found


def test_every_fast_path_call_site_names_a_table_entry_and_every_entry_is_used():
    ops = _fast_path_ops()
    assert len(ops) >= 5, ops  # scan, decode step, SSD, conv, conv step
    unknown = {op: where for op, where in ops.items() if op not in KERNELS}
    assert not unknown, f"fast_path call sites naming no KERNELS entry: {unknown}"
    assert set(KERNELS) == set(ops), f"KERNELS entries no op dispatches to: {set(KERNELS) - set(ops)}"


def test_table_names_only_cpu_and_triton_kernels_in_module_function_form():
    for op, per_backend in KERNELS.items():
        assert set(per_backend) <= {"cpu", "triton"}, op
        for name, target in per_backend.items():
            module, sep, attr = target.partition(":")
            assert sep and module == f"kernels.{name}" and attr, (op, target)


@pytest.mark.parametrize("name", ["cpu", "triton"])
def test_every_table_entry_resolves_to_a_callable(name):
    """Where the backend loads here (cpu: a compiler; triton: CUDA or TRITON_INTERPRET=1, set by conftest)."""
    ok, reason = backend._probe(name)
    if not ok:
        pytest.skip(f"kernels.{name} unavailable here: {reason}")
    for op, per_backend in KERNELS.items():
        if name in per_backend:
            assert callable(load_kernel(op, name)), (op, per_backend[name])


def test_unknown_op_is_an_error_on_every_backend():
    with pytest.raises(KeyError, match="selective_scna"):
        fast_path("ref", torch.device("cpu"), "selective_scna")


def test_ref_backend_takes_no_fast_path():
    assert all(fast_path("ref", torch.device("cpu"), op) is None for op in KERNELS)
