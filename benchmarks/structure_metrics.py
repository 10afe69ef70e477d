"""Structure figures for a restructuring note: the biggest classes (lines, methods) and counts of
string-typed roles, message kinds, policies and transports in the code (tests and benchmarks left out).

Usage: python benchmarks/structure_metrics.py [REPO]   (issue 16 before/after: run at two commits)
"""
import ast, pathlib, subprocess, sys
root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".")
rows = []
for p in root.glob("*/**/*.py"):
    if any(part in {".venv", "tests", "build", "benchmarks", ".export"} for part in p.parts): continue
    try: tree = ast.parse(p.read_text())
    except Exception: continue
    for n in ast.walk(tree):
        if isinstance(n, ast.ClassDef):
            meths = [m for m in n.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))]
            rows.append((n.end_lineno - n.lineno + 1, len(meths), f"{p.relative_to(root)}:{n.name}"))
rows.sort(reverse=True)
print("lines methods class")
for r in rows[:10]: print(*r)
def g(pat):
    out = subprocess.run(["git", "grep", "-c", "-E", pat, "--", "*.py", ":!tests", ":!benchmarks"], cwd=root, capture_output=True, text=True).stdout
    return sum(int(l.rsplit(":", 1)[1]) for l in out.splitlines() if l)
print("string roles ('prefill'/'decode'/'worker'/'aggregated' literals):", g(r"""["'](prefill|decode|worker|aggregated)["']"""))
print("kind == dispatch:", g(r"kind ==|kind in \("))
print("policy strings ('abort'/'retry'/'recompute'):", g(r"""["'](abort|retry|recompute|requeue|fail)["']"""))
print("transport strings ('nccl'/'gloo'/'ipc'/'cuda_ipc'/'local'):", g(r"""["'](nccl|gloo|cuda_ipc|ipc|tcp)["']"""))
