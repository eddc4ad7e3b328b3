"""stack.py import, export and check-series on the synthetic series."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tooling_helpers import TARGET, commit, edit_series, git, stack


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def import_series(base: Path, series: Path, branch: str, *extra: str) -> str:
    proc = stack(
        "import",
        "--base-dir",
        base,
        "--series-dir",
        series,
        "--branch",
        branch,
        *extra,
    )
    return (
        proc.stderr
        if proc.returncode == 0
        else f"exit {proc.returncode}: " + (proc.stderr)
    )


def branches(base: Path) -> set[str]:
    return set(
        git(base, "for-each-ref", "--format=%(refname:short)", "refs/heads").split()
    )


def test_export_import_round_trip_is_byte_for_byte(
    stack_base: Path, stack_series: Path, tmp_path: Path
) -> None:
    out = import_series(stack_base, stack_series, "round-trip")
    assert not out.startswith("exit"), out
    assert git(
        stack_base, "log", "--format=%s", "pin-base..round-trip"
    ).splitlines() == [
        "[inductor] comment the one-shot lowering, bump the mark",
        "[inductor] add the tooling mark",
    ]
    again = tmp_path / "again"
    proc = stack(
        "export", "--base-dir", stack_base, "--branch", "round-trip", "--out", again
    )
    assert proc.returncode == 0, proc.stderr
    assert snapshot(again) == snapshot(stack_series)
    names = [n for n in (again / "series").read_text().splitlines() if n[:1] != "#"]
    assert names == sorted(p.name for p in again.glob("*.patch"))
    assert names[0].startswith("0001-inductor-")
    text = (again / names[1]).read_text()
    assert "Subject: [PATCH 2/2] [inductor] comment the one-shot lowering" in text
    assert text.startswith("From 0000000000000000000000000000000000000000 ")


def test_export_replaces_the_series_and_drops_stale_patches(
    stack_base: Path, stack_series: Path, tmp_path: Path
) -> None:
    out = tmp_path / "patches"
    out.mkdir()
    (out / "0009-inductor-old.patch").write_text("stale")
    (out / "series").write_text("0009-inductor-old.patch\n")
    (out / "README.md").write_text("kept")
    proc = stack(
        "export", "--base-dir", stack_base, "--branch", "synthetic", "--out", out
    )
    assert proc.returncode == 0, proc.stderr
    assert "removed stale 0009-inductor-old.patch" in proc.stderr
    assert (out / "README.md").read_text() == "kept"
    assert sorted(snapshot(out)) == sorted([*snapshot(stack_series), "README.md"])
    assert [p for p in tmp_path.iterdir() if p.name != "patches"] == []


def test_export_refuses_a_commit_without_the_required_message(
    stack_base: Path, tmp_path: Path
) -> None:
    git(stack_base, "checkout", "-q", "-b", "sloppy", "synthetic")
    try:
        path = stack_base / TARGET
        path.write_text(path.read_text() + "# sloppy\n")
        commit(stack_base, "quick fix\n\nno sections here")
    finally:
        git(stack_base, "checkout", "-q", "base")
    out = tmp_path / "patches"
    out.mkdir()
    (out / "series").write_text("# untouched\n")
    proc = stack("export", "--base-dir", stack_base, "--branch", "sloppy", "--out", out)
    assert proc.returncode == 2
    assert "does not start with '[inductor] '" in proc.stderr
    assert "'Summary:'" in proc.stderr and "'Test Plan:'" in proc.stderr
    assert snapshot(out) == {"series": b"# untouched\n"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patches"]


def test_import_refuses_an_existing_branch(
    stack_base: Path, stack_series: Path
) -> None:
    before = git(stack_base, "rev-parse", "synthetic")
    out = import_series(stack_base, stack_series, "synthetic")
    assert out.startswith("exit 2"), out
    assert "already exists" in out
    assert git(stack_base, "rev-parse", "synthetic") == before


def test_import_failure_leaves_no_branch(stack_base: Path, bad_series: Path) -> None:
    head = git(stack_base, "symbolic-ref", "HEAD")
    out = import_series(stack_base, bad_series, "half")
    assert out.startswith("exit 2"), out
    assert "patch 2 does not apply" in out
    assert "0002-inductor-comment-the-one-shot" in out
    assert f"{TARGET} hunk 2/2" in out
    assert "half" not in branches(stack_base)
    assert git(stack_base, "symbolic-ref", "HEAD") == head
    assert git(stack_base, "status", "--porcelain") == ""


def test_import_force_replaces_only_on_success(
    stack_base: Path, stack_series: Path, bad_series: Path
) -> None:
    assert not import_series(stack_base, stack_series, "forced").startswith("exit")
    tip = git(stack_base, "rev-parse", "forced")
    out = import_series(stack_base, bad_series, "forced", "--force")
    assert out.startswith("exit 2"), out
    assert git(stack_base, "rev-parse", "forced") == tip
    out = import_series(stack_base, stack_series, "forced", "--force", "--upto", "1")
    assert not out.startswith("exit"), out
    assert git(stack_base, "rev-list", "--count", "pin-base..forced").strip() == "1"


def test_import_reports_hunks_for_files_the_base_lacks(
    stack_base: Path, stack_series: Path, tmp_path: Path
) -> None:
    extra = (
        "diff --git a/torch/csrc/Missing.cpp b/torch/csrc/Missing.cpp\n"
        "index 1111111..2222222 100644\n"
        "--- a/torch/csrc/Missing.cpp\n"
        "+++ b/torch/csrc/Missing.cpp\n"
        "@@ -1,2 +1,2 @@\n"
        " int a;\n"
        "-int b;\n"
        "+int c;\n"
        "@@ -10,2 +10,2 @@\n"
        " int x;\n"
        "-int y;\n"
        "+int z;\n"
    )

    def add_missing(name: str, text: str) -> str:
        return text + extra if name.startswith("0001-") else text

    series = edit_series(stack_series, tmp_path / "cpp", add_missing)
    out = import_series(stack_base, series, "with-cpp")
    assert not out.startswith("exit"), out
    assert "excluded torch/csrc/Missing.cpp (2 hunk(s))" in out
    assert "0001-inductor-add-the-tooling-mark" in out
    proc = stack(
        "export",
        "--base-dir",
        stack_base,
        "--branch",
        "with-cpp",
        "--out",
        tmp_path / "o",
    )
    assert proc.returncode == 2
    assert "torch/csrc/Missing.cpp" in proc.stderr and "drop" in proc.stderr
    assert not (tmp_path / "o").exists()
    check = stack("check-series", "--base-dir", stack_base, "--series-dir", series)
    assert check.returncode == 0, check.stderr
    assert "torch/csrc/Missing.cpp (2 hunk(s)) not checked" in check.stderr


def test_check_series_accepts_the_synthetic_series(
    stack_base: Path, stack_series: Path
) -> None:
    proc = stack("check-series", "--base-dir", stack_base, "--series-dir", stack_series)
    assert proc.returncode == 0, proc.stderr
    assert "series incomplete: 2 of SERIES_LENGTH" in proc.stderr
    assert "differs from what" not in proc.stderr
    assert git(stack_base, "worktree", "list").count("\n") == 1


def broken(stack_series: Path, tmp_path: Path, how: str) -> tuple[Path, list[str]]:
    """A copy of the synthetic series broken in one way, and what must be said."""
    series = tmp_path / how
    shutil.copytree(stack_series, series)
    first, second = sorted(p.name for p in series.glob("*.patch"))
    listing = series / "series"
    if how == "missing-patch":
        (series / second).unlink()
        return series, [f"series lists {second}, which is not in"]
    if how == "unlisted-patch":
        listing.write_text(listing.read_text().replace(f"{second}\n", ""))
        return series, [f"{second} is in", "but not in series"]
    if how == "duplicate":
        listing.write_text(listing.read_text() + f"{first}\n")
        return series, [f"series lists {first} 2 times"]
    if how == "wrong-number":
        text = (
            listing.read_text()
            .replace(f"{first}\n", "")
            .replace(f"{second}\n", f"{second}\n{first}\n")
        )
        listing.write_text(text)
        return series, [
            f"{second}: Subject says [PATCH 2/2]; "
            "its place in series needs [PATCH 1/2]",
            "patch 1 does not apply",
        ]
    if how == "no-summary":
        path = series / first
        path.write_text(path.read_text().replace("Summary:", "Overview:"))
        return series, [f"{first}: message has no 'Summary:' section"]
    if how == "no-summary-not-canonical":
        # the canonical-form check still runs on a patch with a bad message
        path = series / first
        text = path.read_text().replace("Summary:", "Overview:")
        path.write_text(text.replace("Date: Wed, 1 Jan 2025", "Date: Thu, 2 Jan 2025"))
        return series, [
            f"{first}: message has no 'Summary:' section",
            f"{first}: differs from what",
        ]
    if how == "no-prefix":
        path = series / first
        path.write_text(
            path.read_text().replace("[PATCH 1/2] [inductor] ", "[PATCH 1/2] ")
        )
        return series, [f"{first}: Subject 'add the tooling mark' does not start"]
    if how == "does-not-apply":
        path = series / second
        path.write_text(
            path.read_text().replace(
                "-SYMM_STACK_TOOLING_MARK = 1\n", "-SYMM_STACK_TOOLING_MARK = 7\n"
            )
        )
        return series, [
            "patch 2 does not apply after patches 1..1",
            f"{second}: {TARGET} hunk 2/2 @@",
        ]
    if how == "whitespace":
        path = series / second
        path.write_text(
            path.read_text().replace(
                "+SYMM_STACK_TOOLING_MARK = 2\n", "+SYMM_STACK_TOOLING_MARK = 2  \n"
            )
        )
        return series, [f"whitespace error: {second}: {TARGET} hunk 2/2", "trailing"]
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "missing-patch",
        "unlisted-patch",
        "duplicate",
        "wrong-number",
        "no-summary",
        "no-summary-not-canonical",
        "no-prefix",
        "does-not-apply",
        "whitespace",
    ],
)
def test_check_series_names_each_problem(
    stack_base: Path, stack_series: Path, tmp_path: Path, how: str
) -> None:
    series, expected = broken(stack_series, tmp_path, how)
    proc = stack("check-series", "--base-dir", stack_base, "--series-dir", series)
    assert proc.returncode == 1, proc.stderr
    for text in expected:
        assert text in proc.stderr, proc.stderr
    assert git(stack_base, "worktree", "list").count("\n") == 1


def hand_edited(
    stack_base: Path, stack_series: Path, tmp_path: Path, how: str
) -> tuple[Path, str, list[str]]:
    """The synthetic series with one patch edited by hand (not through export):
    the series, the name of the edited patch, what check-series must say."""
    series = tmp_path / how
    shutil.copytree(stack_series, series)
    first, second = sorted(series.glob("*.patch"))
    if how == "code-line":
        text = second.read_text()
        second.write_text(
            text.replace("tooling test: patch 2\n", "tooling test: two\n")
        )
        return (
            series,
            second.name,
            [
                "line 21: has '+    # symm-stack tooling test: two'; "
                "export wrote '+    # symm-stack tooling test: patch 2' "
                f"({TARGET} line 174)"
            ],
        )
    if how in ("earlier-patch", "context-lines"):
        # a hunk added at the top of the file: patch 2 still applies, 1 line
        # lower, so its index and @@ lines are no longer what export wrote
        top = [f" {line}\n" for line in (stack_base / TARGET).read_text().split("\n")]
        if how == "earlier-patch":  # shaped as git writes it: 3 lines of context
            hunk = f"@@ -1,4 +1,5 @@\n{top[0]}+# hand edit\n{''.join(top[1:4])}"
        else:  # 2 lines of context after it, where git writes 3
            hunk = f"@@ -1,3 +1,4 @@\n{top[0]}+# hand edit\n{''.join(top[1:3])}"
        text = first.read_text()
        text = text.replace("@@ -755,3 +755,5 @@", hunk + "@@ -755,3 +756,5 @@")
        first.write_text(text)
        if how == "context-lines":
            return (
                series,
                first.name,
                ["line 22: has '@@ -755,3 +756,5 @@", "export writes ' "],
            )
        return (
            series,
            first.name,
            [
                "line 19: has '+# hand edit'; export wrote nothing there",
                f"({TARGET} line 2)",
            ],
        )
    if how == "index-line":
        text = second.read_text()
        second.write_text(text.replace("index e16440e84f", "index 1111111111"))
        return (
            series,
            second.name,
            ["its index line says the file before it is blob 1111111111"],
        )
    if how == "hunk-header":
        text = second.read_text()
        second.write_text(text.replace("@@ -171,6 +171,7 @@", "@@ -170,6 +170,7 @@"))
        return (
            series,
            second.name,
            [
                "line 17: has '@@ -170,6 +170,7 @@ def _should_lower_as_one_shot",
                "export writes '@@ -171,6 +171,7 @@",
            ],
        )
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    ["code-line", "earlier-patch", "context-lines", "index-line", "hunk-header"],
)
def test_check_series_fails_on_a_hand_edited_patch_and_names_only_it(
    stack_base: Path, stack_series: Path, tmp_path: Path, how: str
) -> None:
    series, edited, expected = hand_edited(stack_base, stack_series, tmp_path, how)
    proc = stack("check-series", "--base-dir", stack_base, "--series-dir", series)
    assert proc.returncode == 1, proc.stderr
    failures = [line for line in proc.stderr.splitlines() if "FAIL" in line]
    assert len(failures) == 1, proc.stderr
    assert (
        f"FAIL: {edited}: differs from what `scripts/stack.py export` writes"
        in (failures[0])
    )
    for text in expected:
        assert text in failures[0], failures[0]


def test_check_series_names_the_file_when_the_line_cannot_be_known(
    stack_series: Path, tmp_path: Path
) -> None:
    """A fresh base (as in CI) lacks the blob export wrote: file and blobs only."""
    fresh = tmp_path / "base"
    assert stack("base", "--out", fresh).returncode == 0
    series, edited, _ = hand_edited(fresh, stack_series, tmp_path, "code-line")
    proc = stack("check-series", "--base-dir", fresh, "--series-dir", series)
    assert proc.returncode == 1, proc.stderr
    failures = [line for line in proc.stderr.splitlines() if "FAIL" in line]
    assert len(failures) == 1 and edited in failures[0], proc.stderr
    assert f"{TARGET}: applying its hunks gives blob" in failures[0]
    assert "its index line says export wrote 271e085c4827" in failures[0]
    assert "cannot be read back" in failures[0]
