"""Counts over an Inductor wrapper's ``call`` function and, with graph
partitions (CUDA graphs), its ``partition_N`` functions: how many buffer names,
buffer reuses, ``out=`` calls and allocations (P2P and plain) they have.

Shared by both tiers of LoweringTest and by benchmarks/bench_symm_mem.py; it
reads generated code only, so importing it costs nothing.
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class CodeStats:
    buffer_names: int
    reuses: int
    out_calls: int
    p2p_allocs: int
    plain_allocs: int

    @classmethod
    def of(cls, code: str) -> CodeStats:
        # The partition functions precede `call` and hold the kernels; only
        # kernel sources (no buffer names) come before the first of them.
        first = code.find("def partition_0(args):")
        body = code[first if first >= 0 else code.index("def call(self, args):") :]
        return cls(
            buffer_names=len(set(re.findall(r"\bbuf\d+\b", body))),
            reuses=len(re.findall(r"# reuse\b", body)),
            out_calls=len(re.findall(r"\bout=buf\d+", body)),
            p2p_allocs=len(re.findall(r"= empty_strided_p2p\(", body)),
            plain_allocs=len(re.findall(r"= empty_strided_cuda\(", body)),
        )
