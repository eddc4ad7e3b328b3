"""Users who never touch symm_mem see stock Inductor, at every level: CPU tier.

Graphs without a symm_mem op are lowered twice on fake CUDA tensors
(inductor_harness.py): here, with the series' overlay on PYTHONPATH, and in a
child process without it, on the installed wheel (the pin).  The generated
code must be byte-identical, with CUDA graphs off and on and with and without
graph partitions: the hunks the series puts in paths every Inductor user
runs (the scheduler, ``Layout`` and ``FallbackKernel.create`` in ir.py, the
wrapper's prefix and header, ``GraphLowering``) change nothing for them.
A graph with a CUDA-graph-unsafe region is the one case patch 4 changes for
every user; with its flag
``graph_partition_hoist_region_allocations`` off it matches the pin too.
The benchmark rows beside level 0 are ``external reduce-overhead`` and
``region reduce-overhead`` in benchmarks/bench_inputs_and_memory.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unittest
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch._inductor import config


sys.path.insert(0, str(Path(__file__).parent))

import partition_ops  # noqa: E402
from inductor_harness import lower  # noqa: E402
from stack_level import LEVEL, levels  # noqa: E402


F32 = torch.float32
MM = [((64, 128), F32), ((128, 128), F32), ((128, 64), F32)]
HOIST_FLAG = "graph_partition_hoist_region_allocations"

CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "cudagraphs": {"triton.cudagraphs": True, "graph_partition": False},
    "graph_partition": {"triton.cudagraphs": True, "graph_partition": True},
}


def mm_relu_mm(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> Any:
    return torch.relu(x @ w1) @ w2


def pointwise_chain(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> Any:
    y = (x * 2 + 1).sin() @ w1
    return y.sum(0), y @ w2


def mm_unsafe_relu_mm(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> Any:
    return torch.relu(partition_ops.unsafe_scale(x @ w1)) @ w2


PLAIN: dict[str, Callable[..., Any]] = {
    "mm_relu_mm": mm_relu_mm,
    "pointwise_chain": pointwise_chain,
}


def cases() -> dict[str, tuple[Callable[..., Any], dict[str, Any]]]:
    "Every graph and config compared with the pin, by name"
    out: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {}
    for name, fn in PLAIN.items():
        for cfg, patches in CONFIGS.items():
            out[f"{name}/{cfg}"] = (fn, patches)
    region = dict(CONFIGS["graph_partition"])
    if hasattr(config, HOIST_FLAG):
        region[HOIST_FLAG] = False
    out["mm_unsafe_relu_mm/graph_partition/no_hoisting"] = (mm_unsafe_relu_mm, region)
    # a fallback kernel in the default mode: FallbackKernel.create, which
    # patch 1 gives its out-variant table, for an op not in that table
    out["mm_unsafe_relu_mm/default"] = (mm_unsafe_relu_mm, CONFIGS["default"])
    return out


def generated_code() -> dict[str, str]:
    "The wrapper code of every case, with this process's torch"
    codes = {}
    for name, (fn, patches) in cases().items():
        with config.patch(patches):
            code = lower(fn, MM).code
        assert code is not None
        codes[name] = code
    return codes


def pin_code() -> dict[str, str]:
    "`generated_code()` in a child process on the installed torch alone"
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the overlay
    env["SYMM_STACK_LEVEL"] = "0"
    script = (
        "import json, sys; sys.path.insert(0, sys.argv[1]);"
        "import test_symm_mem_stock_cpu as t;"
        "print(json.dumps(t.generated_code()))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(Path(__file__).parent)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"the pin's lowering failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


@levels(1)
class StockCodegenTest(unittest.TestCase):
    """The overlay's code for graphs without symm_mem equals the pin's."""

    pin: dict[str, str]

    @classmethod
    def setUpClass(cls) -> None:
        cls.pin = pin_code()

    def test_child_runs_the_pin(self) -> None:
        # the comparison means something only if the two sides differ in torch
        self.assertNotEqual(LEVEL, 0)
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        probe = (
            "import os, torch._inductor.runtime as r;print(os.path.dirname(r.__file__))"
        )
        child = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, text=True
        ).stdout.strip()
        ours = str(Path(torch._inductor.runtime.__file__).parent)
        self.assertNotEqual(child, ours)
        self.assertFalse(Path(child, "p2p_buffers.py").exists())
        self.assertTrue(Path(ours, "p2p_buffers.py").exists())

    def test_plain_graphs_generate_the_pins_code(self) -> None:
        ours = generated_code()
        self.assertEqual(sorted(ours), sorted(self.pin))
        for name, code in ours.items():
            with self.subTest(case=name):
                self.assertEqual(code, self.pin[name])


if __name__ == "__main__":
    unittest.main()
