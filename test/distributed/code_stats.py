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
            p2p_allocs=len(re.findall(r"= empty_strided_p2p\(", body)),
            plain_allocs=len(re.findall(r"= empty_strided_cuda\(", body)),
        )


# What the checks count in generated wrapper code.
TRITON_KERNEL = "@triton.jit"  # one per generated Triton kernel (identity copies too)
P2P_ALLOC = "= empty_strided_p2p("  # one per P2P allocation
# The end of a P2P allocation line (see p2p_alloc_lines) of static size: one
# persistent allocation per graph and buffer.
PERSISTENT_ALLOC_ID = r"alloc_id=\d+\)$"
# ... and of symbolic size (series level 2 and up): one persistent allocation
# per concrete size, its alloc_id hashed at run time from the buffer's id and
# its sizes and strides.
PER_SIZE_ALLOC_ID = r"alloc_id=hash\(\(\d+, \(.*\), \(.*\)\)\) % 2\*\*64\)$"


def p2p_alloc_lines(code: str) -> list[str]:
    "Every P2P allocation line of ``code``, stripped"
    return [ln.strip() for ln in code.splitlines() if P2P_ALLOC in ln]


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
