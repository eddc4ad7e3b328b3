"""Counts over an Inductor wrapper's ``call`` function and, with graph
partitions (CUDA graphs), its ``partition_N`` functions: how many buffer names,
buffer reuses, ``out=`` calls and allocations (P2P and plain) they have; and
``check_counts``, the FileCheck form of "pattern occurs exactly n times".

Shared by both tiers and by benchmarks/bench_symm_mem.py; it reads generated
code only, and imports torch only when ``check_counts`` runs.
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
            p2p_allocs=len(re.findall(P2P_ALLOC_RE, body)),
            plain_allocs=len(re.findall(r"= empty_strided_cuda\(", body)),
        )


# What the checks count in generated wrapper code.
TRITON_KERNEL = "@triton.jit"  # one per generated Triton kernel (identity copies too)
# One per P2P allocation site: from patch 1/5 on, a site of the module's
# `p2p_buffers` (Note [P2P buffers of a compiled module]), of static or of
# symbolic size; at the pin, an `empty_strided_p2p` call with an alloc_id.
# From patch 5/5 on, a static-shape graph input of a symm_mem op is a site of
# its own, which passes the input through or copies it into the site's buffer
# (Note [Symmetric graph inputs]).
P2P_ALLOC = "= p2p_buffers."
P2P_STATIC = "= p2p_buffers.static("
P2P_DYNAMIC = "= p2p_buffers.dynamic("
P2P_GRAPH_INPUT = "= p2p_buffers.graph_input("
PIN_P2P_ALLOC = "= empty_strided_p2p("
P2P_ALLOC_RE = r"= (?:empty_strided_p2p|p2p_buffers\.(?:static|dynamic))\("


def p2p_alloc_lines(code: str) -> list[str]:
    "Every P2P allocation line of ``code``, stripped"
    return [ln.strip() for ln in code.splitlines() if re.search(P2P_ALLOC_RE, ln)]


def check_counts(code: str, counts: dict[str, int]) -> None:
    """FileCheck that each pattern occurs exactly ``n`` times in ``code``
    (``n == 0``: not at all).  Each pattern is checked over the whole code,
    independently of the others."""
    from torch.testing import FileCheck

    for pattern, n in counts.items():
        if n == 0:
            FileCheck().check_not(pattern).run(code)
        else:
            FileCheck().check_count(pattern, n, exactly=True).run(code)
