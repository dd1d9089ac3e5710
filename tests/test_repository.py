"""The repository carries what it needs: no tracked file (docs aside) reads a path outside the clone.

A user's clone has nothing beside it, so a reference to a sibling folder (`../workshop/...`, `REPO.parent / "x"`,
`Path(__file__).parents[N]` above the root) or to a developer machine's absolute path works on our machines
and fails everywhere else.
"""
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = (".md",)  # prose may mention the workshop; it is never read by code
RECORDS = ("reports", "docs", "bench/results")  # logs and results of past runs, as they were printed
DEV_PATHS = re.compile(r"/work/(?:shared|main)\b|/check/work\b")
RELATIVE = re.compile(r"(?<![\w./-])((?:\.\./)+)([\w.-]+)")
UP_FROM_ROOT = re.compile(r"\b(?:REPO|ROOT|REPO_ROOT)\.parent\b")
PARENTS = re.compile(r"Path\(__file__\)(?:\.resolve\(\))?\.parents\[(\d+)\]")
PARENT_CHAIN = re.compile(r"Path\(__file__\)(?:\.resolve\(\))?((?:\.parent)+)")


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
    return [REPO / p for p in out.stdout.decode().split("\0") if p]


def outside_references(rel: Path, text: str) -> list[str]:
    """Each place in `text` (the file `rel`, relative to the repo) that points outside the repository."""
    found = []
    depth = len(rel.parts) - 1  # folders between the repo root and the file
    for n, line in enumerate(text.splitlines(), 1):
        where = f"{rel}:{n}"
        if DEV_PATHS.search(line):
            found.append(f"{where}: a developer machine's path: {line.strip()[:120]}")
        if UP_FROM_ROOT.search(line):
            found.append(f"{where}: a folder beside the repository: {line.strip()[:120]}")
        for m in RELATIVE.finditer(line):
            target = (REPO / rel.parent / m.group(1) / m.group(2)).resolve()
            if not target.is_relative_to(REPO):
                found.append(f"{where}: {m.group(0)} resolves outside the repository ({target})")
        for m in PARENTS.finditer(line):
            if int(m.group(1)) > depth:
                found.append(f"{where}: parents[{m.group(1)}] of a file {depth} folder(s) deep is outside it")
        for m in PARENT_CHAIN.finditer(line):
            if m.group(1).count(".parent") - 1 > depth:
                found.append(f"{where}: {m.group(0)} climbs above the repository")
    return found


def test_the_checker_catches_each_kind_of_outside_reference():
    assert outside_references(Path("tests/k8s/x.py"), 'd = REPO.parent / "workshop" / "k8s-schemas"')
    assert outside_references(Path("cluster/x.py"), 'open("../../workshop/INFRA-NOTES.md")')
    assert outside_references(Path("x.py"), "see ../workshop/examples/serve_celery_consumer.py")
    assert outside_references(Path("Makefile"), "\tcp -r /work/shared/k8s-schemas k8s/")
    assert outside_references(Path("tests/a/t.py"), "ROOT = Path(__file__).resolve().parents[3]")
    assert outside_references(Path("cluster/x.py"), "Path(__file__).resolve().parent.parent.parent")
    # references that stay inside are fine
    assert not outside_references(Path("k8s/overlays/small/kustomization.yaml"), "- ../../examples/production")
    assert not outside_references(Path("tests/a/t.py"), "ROOT = Path(__file__).resolve().parents[2]")
    assert not outside_references(Path("cluster/x.py"), 'Path(__file__).resolve().parent.parent / "monitoring"')
    assert not outside_references(Path("tests/t.py"), 'get(f"{base}/v1/jobs/../etc/passwd")')


def test_no_tracked_file_reads_outside_the_repository():
    problems = []
    for path in tracked_files():
        rel = path.relative_to(REPO)
        if (path.suffix in DOCS or any(rel.is_relative_to(r) for r in RECORDS) or not path.is_file()
                or rel == Path(__file__).relative_to(REPO)):
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue  # binary files (weights, images)
        problems += outside_references(rel, text)
    assert not problems, "the clone must carry what it needs (vendor it):\n" + "\n".join(problems)
