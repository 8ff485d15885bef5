"""Cross-check shitu.weights' Paddle-free readers against Paddle itself (run with the Paddle venv).

    .venv-paddle/bin/python tests/parity/check_readers.py tests/fixtures/paddle .work/parity

For every model folder under the given roots:

- ``.pdparams``: ``load_pdparams`` == ``paddle.load`` (keys, order, values);
- legacy ``inference.pdmodel``: our hand-written protobuf reader == Paddle's ``framework_pb2`` (op types, input
  and output slots, every attribute value, persistable dense-tensor vars with shapes/dtypes);
- PIR ``inference.json`` and both ``inference.pdiparams``: our reader == what Paddle's
  ``paddle.static.load_inference_model`` puts in the scope (each parameter by name), and the op sequence
  equals the program Paddle deserialises (PIR exports only, by op name).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import paddle  # noqa: E402
from paddle.base.proto import framework_pb2  # noqa: E402

from shitu.weights import load_inference_model, load_pdparams  # noqa: E402

_ATTR_FIELDS = {
    0: "i",
    1: "f",
    2: "s",
    3: "ints",
    4: "floats",
    5: "strings",
    6: "b",
    7: "bools",
    8: "block_idx",
    9: "l",
    10: "blocks_idx",
    11: "longs",
    12: "float64s",
    13: "var_name",
    14: "vars_name",
    15: "float64",
}


def same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=0, abs_tol=0)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def check_legacy_program(file: Path) -> int:
    desc = framework_pb2.ProgramDesc()
    desc.ParseFromString(file.read_bytes())
    ours = load_inference_model(file)
    block = desc.blocks[0]
    assert len(block.ops) == len(ours.ops), (len(block.ops), len(ours.ops))
    checked = 0
    for ref, op in zip(block.ops, ours.ops, strict=True):
        assert ref.type == op.type
        assert {v.parameter: list(v.arguments) for v in ref.inputs} == op.inputs, op.type
        assert {v.parameter: list(v.arguments) for v in ref.outputs} == op.outputs, op.type
        for attr in ref.attrs:
            if attr.type in (16, 17):
                continue  # scalar(s): not used by these programs
            value = getattr(attr, _ATTR_FIELDS[attr.type])
            value = list(value) if not isinstance(value, (int, float, str, bool)) else value
            assert same(value, op.attrs[attr.name]), (op.type, attr.name, value, op.attrs[attr.name])
            checked += 1
    dense = {
        v.name: (tuple(v.type.dense_tensor.tensor.dims), v.type.dense_tensor.tensor.data_type)
        for v in block.vars
        if v.persistable and v.type.type == framework_pb2.VarType.DENSE_TENSOR
    }
    assert dense.keys() == ours.vars.keys()
    for name, (dims, _) in dense.items():
        assert ours.vars[name].shape == dims
    return checked


def check_params_against_paddle(folder: Path, program: str) -> None:
    ours = load_inference_model(folder / program)
    paddle.enable_static()
    try:
        exe = paddle.static.Executor(paddle.CPUPlace())
        scope = paddle.static.Scope()
        with paddle.static.scope_guard(scope):
            prog, _, _ = paddle.static.load_inference_model(str(folder / "inference"), exe)
            for name, value in ours.params.items():
                ref = np.array(scope.find_var(name).get_tensor())
                assert ref.shape == value.shape and np.array_equal(ref, value), name
            if program.endswith(".json"):
                ref_ops = [op.name() for op in prog.global_block().ops]
                our_ops = [op.type for op in ours.ops]
                ref_ops = [n for n in ref_ops if n != "builtin.parameter"]
                assert ref_ops == our_ops, (ref_ops[:10], our_ops[:10])
    finally:
        paddle.disable_static()


def main(roots: list[str]) -> None:
    for root in map(Path, roots):
        for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            name = model_dir.name
            for pd in sorted(model_dir.glob("*.pdparams")):
                ref = paddle.load(str(pd))
                ref.pop("StructuredToParameterName@@", None)
                ours = load_pdparams(pd)
                assert list(ours) == list(ref), pd
                assert all(np.array_equal(ours[k], np.asarray(ref[k])) for k in ours), pd
                print(f"ok {pd.relative_to(root)}: {len(ours)} keys")
            for sub in ("inference", "inference_unfused", "inference_paddle30"):
                if (model_dir / sub / "inference.json").is_file():
                    check_params_against_paddle(model_dir / sub, "inference.json")
                    n = len(load_inference_model(model_dir / sub).params)
                    print(f"ok {name}/{sub}: PIR ops and {n} parameters == Paddle's")
            legacy = model_dir / "inference_legacy" / "inference.pdmodel"
            if legacy.is_file():
                checked = check_legacy_program(legacy)
                print(f"ok {name}/inference_legacy: ProgramDesc == framework_pb2 ({checked} attributes)")
                # Paddle 3.3 loads a legacy program only with the PIR API off, which must be set at start-up
                env = dict(os.environ, FLAGS_enable_pir_api="0")
                cmd = [sys.executable, __file__, "--legacy-params", str(model_dir / "inference_legacy")]
                result = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if result.returncode != 0:
                    raise SystemExit(f"{name}/inference_legacy: {result.stderr[-2000:]}")
                print(f"ok {name}/inference_legacy: parameters == Paddle's")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--legacy-params"]:
        check_params_against_paddle(Path(sys.argv[2]), "inference.pdmodel")
    else:
        main(sys.argv[1:] or [str(REPO / "tests" / "fixtures" / "paddle")])
