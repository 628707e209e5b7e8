"""The shape of the package, checked from its source: no import cycles (imports inside functions
included), imports only downward (FLOORS), no backend named outside ftcore/backends/, the batching
mode asked of Batches.mode (never guessed from the arrays nor compared as a string), no module
over 300 lines, no line over 100 columns, no function with more than 6 parameters or over 60
lines, no two modules of one file name (but the ftcore/torch/ <-> ftcore/mlx/ mirror), nothing that
cites a document outside the repository, and every parity tolerance in ftcore/tolerances.py (none
defined in a test or bench file; each one used)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from ftcore.backends import BACKENDS
from ftcore.config import BATCHINGS

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ftcore"
MAX_LINES = 300
MAX_PARAMS = 6  # self / cls not counted; *args and **kwargs count one each
MAX_FUNCTION_LINES = 60  # a backend's loop is the shared one (ftcore.backends.loop)
LINE_LIMIT = 100  # columns (characters), ruff's line-length
LINE_LIMIT_EXEMPT: tuple[str, ...] = ()
# functions whose source text is part of the shipped preset's fingerprint
# (ftcore.inputs.pretrain.recipe_inputs): rewrapping one would orphan the shipped weights
LINE_LIMIT_KEEP = {"ftcore/inputs/pretrain.py": ("pretrain",)}
# the one deliberate mirror: a module in each of these folders with one name does one job per framework
MIRROR = ("torch", "mlx")


def source_modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package folder `package`."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of `known` that module `name` (file `path`) imports anywhere in its body (top level,
    functions, classes). `from pkg import x` counts as importing pkg.x when that is a module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m in known}


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    known = set(modules)
    return {name: imported_modules(name, path, known) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles_in_ftcore() -> None:
    graph = import_graph(source_modules())
    assert "ftcore.run.backend_process" in graph and "ftcore.report.comparison" in graph["ftcore.report"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_sees_a_cycle_made_by_an_import_inside_a_function(tmp_path: Path) -> None:
    pkg = tmp_path / "ftcore"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from ftcore.b import g\n")
    (pkg / "b.py").write_text("def g():\n    from ftcore import a\n")
    assert find_cycle(import_graph(source_modules(pkg))) == ["ftcore.a", "ftcore.b", "ftcore.a"]


# The floors of the package, lowest first: a module imports its own floor and those below, never
# one above (ftcore.process is the child side of a run, which backends/, torch/ and mlx/ use;
# ftcore.run the parent side). A module belongs to the floor of its longest listed prefix.
FLOORS = (
    ("ftcore.config", "ftcore.config_choices", "ftcore.config_checks", "ftcore.config_flags", "ftcore.result", "ftcore.files", "ftcore.cache_dir", "ftcore.lora_targets", "ftcore.tolerances"),
    ("ftcore.process",),
    ("ftcore.inputs", "ftcore.measure"),
    ("ftcore.torch", "ftcore.mlx"),
    ("ftcore.backends",),
    ("ftcore.report",),
    ("ftcore.run",),
    ("ftcore", "ftcore.cli", "ftcore.cli_args", "ftcore.__main__"),
)


def floor_of(module: str) -> int:
    owners = [(len(p), i) for i, f in enumerate(FLOORS) for p in f if module == p or module.startswith(p + ".")]
    return max(owners)[1]


def imports_up(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a module on a higher floor: "importer -> imported"."""
    return [f"{m} -> {d}" for m, deps in sorted(graph.items()) for d in sorted(deps) if floor_of(d) > floor_of(m)]


def test_imports_go_only_downward() -> None:
    graph = import_graph(source_modules())
    assert {floor_of(m) for m in graph} == set(range(len(FLOORS)))  # every floor holds a module
    assert imports_up(graph) == []


def test_floor_check_sees_an_import_back_up(tmp_path: Path) -> None:
    pkg = tmp_path / "ftcore"
    for sub in ("backends", "run"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "run" / "ranks.py").write_text("")
    (pkg / "backends" / "torch.py").write_text("def f():\n    from ftcore.run.ranks import shard\n")
    assert imports_up(import_graph(source_modules(pkg))) == ["ftcore.backends.torch -> ftcore.run.ranks"]


# The input pipeline's stages, in order: each module may import an earlier stage, never a later one.
PIPELINE = (
    ("ftcore.inputs.records",),
    ("ftcore.inputs.token_rows",),
    ("ftcore.inputs.batching", "ftcore.inputs.batch_checks"),
    ("ftcore.inputs.batches",),
)


def pipeline_back_calls(graph: dict[str, set[str]]) -> list[str]:
    stage = {m: i for i, names in enumerate(PIPELINE) for m in names}
    return [f"{m} -> {d}" for m, deps in sorted(graph.items()) if m in stage
            for d in sorted(deps) if d in stage and stage[d] > stage[m]]  # fmt: skip


def test_the_input_pipeline_runs_one_way() -> None:
    graph = import_graph(source_modules())
    assert all(m in graph for names in PIPELINE for m in names)
    assert pipeline_back_calls(graph) == []


def test_pipeline_check_sees_a_stage_calling_a_later_one() -> None:
    graph = {"ftcore.inputs.token_rows": {"ftcore.inputs.batching"}, "ftcore.inputs.batches": {"ftcore.inputs.records"}}
    assert pipeline_back_calls(graph) == ["ftcore.inputs.token_rows -> ftcore.inputs.batching"]


def compares_with(node: ast.Compare, is_const) -> bool:
    """Whether `node` compares something with a constant `is_const` accepts: `x == "mlx"`,
    `x is not C`, `x in ("torch", ...)`; not `"mlx" in path` (a substring test)."""
    sides = [node.left, *node.comparators]
    for op, left, right in zip(node.ops, sides[:-1], sides[1:], strict=True):
        if isinstance(op, ast.Eq | ast.NotEq | ast.Is | ast.IsNot) and (is_const(left) or is_const(right)):
            return True
        if (isinstance(op, ast.In | ast.NotIn) and isinstance(right, ast.Tuple | ast.List | ast.Set)
                and any(map(is_const, right.elts))):
            return True
    return False


def backend_name_uses(path: Path, root: Path = ROOT) -> list[str]:
    """Places in `path` that compare something with a backend's name (or a prefix of one):
    `x == "mlx"`, `x in ("torch", ...)`, `x.startswith("mlx")`."""
    names = set(BACKENDS)

    def is_name(node: ast.AST) -> bool:
        return isinstance(node, ast.Constant) and node.value in names

    def is_prefix(node: ast.AST) -> bool:
        return (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value != ""
                and any(n.startswith(node.value) for n in names))

    hits = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Compare) and compares_with(node, is_name) or (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("startswith", "endswith") and any(map(is_prefix, node.args))):
            hits.append(f"{path.relative_to(root)}:{node.lineno}")
    return hits


def test_no_backend_name_is_compared_outside_the_backends_package() -> None:
    files = [p for p in [*PACKAGE.rglob("*.py"), *(ROOT / "bench").rglob("*.py")]
             if PACKAGE / "backends" not in p.parents]
    assert [hit for p in files for hit in backend_name_uses(p)] == []


def test_backend_name_check_sees_comparisons(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text('def f(b, path):\n    if b == "mlx":\n        pass\n'
                     '    ok = b in ("torch", "x") and "mlx" in path\n    return b.startswith("mlx")\n')
    assert sorted(backend_name_uses(probe, tmp_path)) == ["probe.py:2", "probe.py:4", "probe.py:5"]


def mode_sniffs(path: Path, root: Path = ROOT) -> list[str]:
    """Places in `path` that decide the batching mode other than by Batching / Batches.mode: from
    the arrays (`"position_ids" in batch`, `not in`, `batch.get("position_ids")`) or by a mode's
    string (`cfg.batching == "packed"`, `x in ("padded", ...)`)."""

    def is_positions(node: ast.AST) -> bool:
        return isinstance(node, ast.Constant) and node.value == "position_ids"

    def is_mode(node: ast.AST) -> bool:
        return isinstance(node, ast.Constant) and node.value in BATCHINGS

    def sniffs(node: ast.Compare) -> bool:
        arrays = any(isinstance(op, ast.In | ast.NotIn) and is_positions(left)
                     for op, left in zip(node.ops, [node.left, *node.comparators], strict=False))
        return arrays or compares_with(node, is_mode)

    hits = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Compare) and sniffs(node) or (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "get" and node.args and is_positions(node.args[0])):
            hits.append(f"{path.relative_to(root)}:{node.lineno}")
    return hits


def test_the_batching_mode_is_asked_never_guessed() -> None:
    """Whether rows are packed is Batches.mode's to say (every backend asks `batches.packed`), and a
    mode is a Batching member, not a string compared in place."""
    assert [hit for p in PACKAGE.rglob("*.py") for hit in mode_sniffs(p)] == []


def test_mode_check_sees_a_guess(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text('def f(batch, cfg, keys):\n    if "position_ids" in batch:\n        pass\n'
                     '    p = batch.get("position_ids")\n    q = "position_ids" not in keys\n'
                     '    return cfg.batching == "packed" or cfg.batching in ("padded", "x") or p or q\n')
    assert sorted(mode_sniffs(probe, tmp_path)) == ["probe.py:2", "probe.py:4", "probe.py:5", "probe.py:6", "probe.py:6"]


def long_modules(package: Path = PACKAGE, limit: int = MAX_LINES) -> dict[str, int]:
    """Modules of `package` over `limit` lines: {path relative to its parent: lines}."""
    sizes = {str(p.relative_to(package.parent)): len(p.read_text().splitlines()) for p in package.rglob("*.py")}
    return {k: n for k, n in sizes.items() if n > limit}


def test_every_module_is_at_most_300_lines() -> None:
    assert long_modules() == {}


def test_size_check_sees_a_long_module(tmp_path: Path) -> None:
    pkg = tmp_path / "ftcore"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "sub" / "ok.py").write_text("x = 1\n" * MAX_LINES)
    (pkg / "sub" / "long.py").write_text("x = 1\n" * (MAX_LINES + 1))
    assert long_modules(pkg) == {"ftcore/sub/long.py": MAX_LINES + 1}


def long_lines(package: Path = PACKAGE, limit: int = LINE_LIMIT) -> list[str]:
    """Lines of `package`'s modules (LINE_LIMIT_EXEMPT aside) over `limit` characters:
    ["path:line (length)"]."""
    out = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).as_posix()
        if rel.startswith(LINE_LIMIT_EXEMPT):
            continue
        text = path.read_text()
        kept = {i for node in ast.parse(text).body
                if isinstance(node, ast.FunctionDef) and node.name in LINE_LIMIT_KEEP.get(rel, ())
                for i in range(node.lineno, node.end_lineno + 1)}  # fmt: skip
        for i, line in enumerate(text.splitlines(), 1):
            if len(line) > limit and i not in kept:
                out.append(f"{rel}:{i} ({len(line)})")
    return out


def test_every_line_is_at_most_100_columns() -> None:
    assert long_lines() == []


def test_line_check_sees_a_long_line(tmp_path: Path) -> None:
    pkg = tmp_path / "ftcore"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "sub" / "ok.py").write_text("x = 1\n" + "# " + "é" * (LINE_LIMIT - 2) + "\n")
    (pkg / "sub" / "wide.py").write_text("x = 1\n" + "y = '" + "a" * (LINE_LIMIT - 5) + "'\n")
    (pkg / "inputs").mkdir()
    long_def = "    return 1  # " + "c" * LINE_LIMIT + "\n"
    (pkg / "inputs" / "pretrain.py").write_text(
        f"def pretrain():\n{long_def}\n\ndef other():\n{long_def}")
    assert long_lines(pkg) == [f"ftcore/inputs/pretrain.py:6 ({len(long_def) - 1})",
                               f"ftcore/sub/wide.py:2 ({LINE_LIMIT + 1})"]


def wide_functions(package: Path = PACKAGE, limit: int = MAX_PARAMS) -> dict[str, int]:
    """Functions and methods (lambdas aside) of `package` with more than `limit` parameters:
    {"path:line name": count}. A method's first parameter (self / cls) is not counted."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        methods = {id(f) for c in ast.walk(tree) if isinstance(c, ast.ClassDef) for f in c.body}
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            a = node.args
            names = [x.arg for x in (*a.posonlyargs, *a.args)]
            static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in node.decorator_list)
            if id(node) in methods and not static and names and names[0] in ("self", "cls"):
                names = names[1:]
            count = len(names) + len(a.kwonlyargs) + (a.vararg is not None) + (a.kwarg is not None)
            if count > limit:
                out[f"{path.relative_to(package.parent)}:{node.lineno} {node.name}"] = count
    return out


def test_no_function_takes_more_than_6_parameters() -> None:
    assert wide_functions() == {}


def test_parameter_check_sees_a_wide_function(tmp_path: Path) -> None:
    pkg = tmp_path / "ftcore"
    pkg.mkdir()
    (pkg / "a.py").write_text(
        "def six(a, b, c, d, e, f):\n    pass\n"
        "def seven(a, b, c, d, e, *, f=1, g=2):\n    pass\n"
        "def star(a, b, c, d, e, *args, **kwargs):\n    pass\n"
        "class K:\n"
        "    def method(self, a, b, c, d, e, f):\n        pass\n"
        "    def wide(self, a, b, c, d, e, f, g):\n        pass\n"
    )
    assert wide_functions(pkg) == {"ftcore/a.py:3 seven": 7, "ftcore/a.py:5 star": 7, "ftcore/a.py:10 wide": 7}


def long_functions(folder: Path = PACKAGE / "backends", limit: int = MAX_FUNCTION_LINES) -> dict[str, int]:
    """Functions and methods of the modules in `folder` over `limit` lines, decorators and
    docstring included: {"path:line name": lines}."""
    out = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if (lines := node.end_lineno - first + 1) > limit:
                    out[f"{path.relative_to(folder.parent)}:{node.lineno} {node.name}"] = lines
    return out


def test_no_function_is_over_60_lines() -> None:
    """Anywhere in the package: a backend writes its Recipe (ftcore.backends.loop), not a loop of
    its own, and a long function is parts with names."""
    assert long_functions(PACKAGE) == {}


def test_function_length_check_sees_a_long_function(tmp_path: Path) -> None:
    folder = tmp_path / "backends"
    folder.mkdir()
    (folder / "b.py").write_text(  # 60 lines, then 61 with its decorator
        "def ok():\n" + "    x = 1\n" * (MAX_FUNCTION_LINES - 1)
        + "class R:\n    @staticmethod\n    def long():\n" + "        x = 1\n" * (MAX_FUNCTION_LINES - 1)
    )
    assert long_functions(folder) == {"backends/b.py:63 long": MAX_FUNCTION_LINES + 1}


def repeated_module_names(package: Path = PACKAGE) -> dict[str, list[str]]:
    """File names used by more than one module of `package` ({name: [paths]}), except __init__.py
    and a name used once in each mirror folder (`package`/torch and `package`/mlx) and nowhere else."""
    where: dict[str, list[Path]] = {}
    for p in sorted(package.rglob("*.py")):
        if p.name != "__init__.py":
            where.setdefault(p.name, []).append(p.parent)
    mirror = sorted(package / m for m in MIRROR)
    return {name: [str((d / name).relative_to(package.parent)) for d in dirs]
            for name, dirs in where.items() if len(dirs) > 1 and sorted(dirs) != mirror}


def test_module_names_are_unique_but_the_framework_mirror() -> None:
    assert repeated_module_names() == {}
    assert (PACKAGE / "torch" / "loss.py").is_file() and (PACKAGE / "mlx" / "loss.py").is_file()


def test_name_check_sees_a_repeated_module_name(tmp_path: Path) -> None:
    pkg = tmp_path / "ftcore"
    for folder in ("torch", "mlx", "inputs", "run"):
        (pkg / folder).mkdir(parents=True)
    for path in ("torch/loss.py", "mlx/loss.py", "torch/only.py", "inputs/data.py", "run/data.py", "mlx/env.py",
                 "run/env.py"):
        (pkg / path).write_text("")
    assert repeated_module_names(pkg) == {"data.py": ["ftcore/inputs/data.py", "ftcore/run/data.py"],
                                          "env.py": ["ftcore/mlx/env.py", "ftcore/run/env.py"]}


def test_the_repository_cites_no_document_outside_it() -> None:
    # every file of the project as it lies (a clone, a source tarball or a copied folder alike),
    # not git's list: without .git the check still runs
    skip = {".git", ".venv", "runs", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis",
            ".benchmarks", "build", "dist"}
    tracked = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
               if not skip.intersection(p.relative_to(ROOT).parts) and not p.name.endswith(".egg-info")
               and not any(part.endswith(".egg-info") for part in p.relative_to(ROOT).parts)]
    assert "README.md" in tracked and "ftcore/cli.py" in tracked
    outside = ("DESIGN" + ".md", "write" + "-up", "../" + "shared", "STYLE" + ".md")
    hits = []
    for name in tracked:
        path = ROOT / name
        if path.suffix not in (".py", ".md", ".toml", ".sh", ".txt", ".cfg", "") or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        hits += [f"{name}: {word}" for word in outside if word in text]
    assert hits == []


# ----------------------------------------------------------------------------- parity tolerances

TOLERANCES = PACKAGE / "tolerances.py"
TOL_NAME = re.compile(r"(^|_)[A-Z]?TOL(_|$)")  # a name with a word TOL, ATOL, RTOL, GTOL: LOGITS_ATOL


def is_number(node: ast.AST) -> bool:
    """A number written out: 1e-4, -3, 2.0**-7, 3 * 1e-5."""
    if isinstance(node, ast.UnaryOp):
        return is_number(node.operand)
    if isinstance(node, ast.BinOp):
        return is_number(node.left) and is_number(node.right)
    return isinstance(node, ast.Constant) and type(node.value) in (int, float)


def own_tolerances(files: list[Path], root: Path = ROOT) -> list[str]:
    """Module-level names like *TOL* / *ATOL* / *RTOL* given a number in `files`: "path:line NAME"."""
    hits = []
    for path in files:
        for node in ast.parse(path.read_text(), filename=str(path)).body:
            pairs = ([(t, node.value) for t in node.targets] if isinstance(node, ast.Assign)
                     else [(node.target, node.value)] if isinstance(node, ast.AnnAssign) and node.value else [])
            hits += [f"{path.relative_to(root)}:{node.lineno} {t.id}" for t, v in pairs
                     if isinstance(t, ast.Name) and TOL_NAME.search(t.id) and is_number(v)]
    return hits


def test_no_test_or_bench_file_defines_its_own_parity_tolerance() -> None:
    files = sorted([*(ROOT / "tests").rglob("*.py"), *(ROOT / "bench").rglob("*.py")])
    assert len(files) > 40 and ROOT / "bench" / "test_finetune_bench.py" in files
    assert own_tolerances(files) == [], "parity tolerances live in ftcore/tolerances.py"


def test_tolerance_check_sees_a_test_s_own_tolerance(tmp_path: Path) -> None:
    probe = tmp_path / "test_probe.py"
    probe.write_text("LOGITS_ATOL = 1e-4\nGRAD_RTOL: float = -2.0**-7\nTOLERANCE_EXAMPLES = 30\n"
                     "NAME_ATOL = FP32_LOGITS_ATOL\n\ndef f():\n    LOCAL_TOL = 1e-3\n")
    assert own_tolerances([probe], tmp_path) == ["test_probe.py:1 LOGITS_ATOL", "test_probe.py:2 GRAD_RTOL"]


def unused_tolerances(module: Path, files: list[Path]) -> list[str]:
    """Module-level constants of `module` that no file of `files` reads (a name or an attribute;
    an import alone or a comment does not count)."""
    names = [t.id for node in ast.parse(module.read_text()).body if isinstance(node, ast.Assign)
             for t in node.targets if isinstance(t, ast.Name) and t.id.isupper()]
    read = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Name):
                read.add(node.id)
            elif isinstance(node, ast.Attribute):
                read.add(node.attr)
    return [n for n in names if n not in read]


def test_every_parity_tolerance_is_used() -> None:
    files = [p for p in [*PACKAGE.rglob("*.py"), *(ROOT / "tests").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]
             if p != TOLERANCES]
    assert len(ast.parse(TOLERANCES.read_text()).body) > 20
    assert unused_tolerances(TOLERANCES, files) == []


def test_unused_tolerance_check_sees_one(tmp_path: Path) -> None:
    (tmp_path / "tolerances.py").write_text("A_ATOL = 1e-4\nB_RTOL = 1e-3\nC_ATOL = 1e-5\n")
    (tmp_path / "test_a.py").write_text("from tolerances import A_ATOL, C_ATOL\nimport tolerances\n"
                                        "# B_RTOL\nassert 0 < A_ATOL < tolerances.B_RTOL\n")
    assert unused_tolerances(tmp_path / "tolerances.py", [tmp_path / "test_a.py"]) == ["C_ATOL"]


def test_an_mlx_backend_process_does_not_import_scipy() -> None:
    """The child that trains a backend measures its own peak RSS: importing SciPy there (the
    compare's statistics) added ~50 MB to MLX's 105 MB and moved the memory verdict from 4.7x to
    2.8x. The child's modules import numpy only; the statistics run in the parent."""
    import subprocess
    import sys

    code = ("import sys, ftcore.run.child, ftcore.backends.mlx, ftcore.backends.result_fields; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'scipy')[:3])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
