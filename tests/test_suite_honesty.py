"""Issue 29: checks that can fail. The suite's own rules, each with a test that it catches what it names:

- `vacuous_checks`: an AST scan of every tests/*.py and benchmarks/*.py for checks that cannot fail
  (`assert A and B or C`, which Python reads as `(A and B) or C`; an assert of a tuple, a non-empty
  string or an f-string; `x == x`; a comparison of constants; `x or True`; `len(x) >= 0`; an empty
  `pytest.raises` block; a comparison on its own line, its `assert` forgotten; a direct `pytest.skip` or
  `pytest.importorskip` instead of `helpers.require_tool` / `helpers.import_tool`, which fail in CI);
- `helpers.assert_one_message` fails on a command that prints a traceback and exits 2;
- `helpers.require_tool` fails in CI and skips elsewhere;
- `.ci/run` stops when Chromium cannot be installed.
"""

from __future__ import annotations

import ast
import os
import stat
import subprocess
import sys
import traceback
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from helpers import assert_one_message, import_tool, in_ci, require_tool

ROOT = Path(__file__).resolve().parents[1]
RAISES = {"raises", "warns", "deprecated_call"}
# Where a direct skip is the rule's own implementation.
SKIP_ALLOWED = {"helpers.py"}


def _dotted(node) -> str:
    """`pytest.raises` for an Attribute chain / Name, '' otherwise."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _has_call(node) -> bool:
    return any(isinstance(n, ast.Call | ast.Await | ast.Yield | ast.YieldFrom | ast.NamedExpr) for n in ast.walk(node))


def _literal(node):
    """(True, value) for a node that is a literal (a constant, or a tuple/list/set/dict of them)."""
    try:
        return True, ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None


def _always_true(node) -> str | None:
    """Why the expression is true whatever the values it reads, or None."""
    if isinstance(node, ast.Constant):
        return f"the constant {node.value!r}" if node.value else None
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return "a non-empty tuple/list/set (a message meant as `assert x, msg`?)" if node.elts else None
    if isinstance(node, ast.Dict):
        return "a non-empty dict" if node.keys else None
    if isinstance(node, ast.JoinedStr):
        if any(isinstance(v, ast.Constant) and v.value for v in node.values):
            return "an f-string (always non-empty)"
        return None
    if isinstance(node, ast.Lambda | ast.GeneratorExp):
        return "a function or generator object"
    if isinstance(node, ast.BoolOp):
        reasons = [_always_true(v) for v in node.values]
        if isinstance(node.op, ast.Or) and any(reasons):
            return f"`or` with an operand that is always true ({next(r for r in reasons if r)})"
        if isinstance(node.op, ast.And) and all(reasons):
            return "`and` of operands that are all always true"
        return None
    if isinstance(node, ast.Compare):
        return _compare_always_true(node)
    return None


def _compare_always_true(node: ast.Compare) -> str | None:
    operands = [node.left, *node.comparators]
    if all(_literal(o)[0] for o in operands):
        return "a comparison of constants (its result never changes)"
    if len(node.ops) == 1:
        op, left, right = node.ops[0], node.left, node.comparators[0]
        if isinstance(op, ast.Eq | ast.Is | ast.LtE | ast.GtE) and ast.dump(left) == ast.dump(right):
            if not _has_call(left):
                return "the same expression on both sides"
        if isinstance(op, ast.IsNot) and isinstance(right, ast.List | ast.Dict | ast.Set | ast.ListComp):
            return "`is not` a new object"

        def is_len(n):
            return isinstance(n, ast.Call) and _dotted(n.func) == "len"

        def is_num(n, values):
            ok, value = _literal(n)
            return ok and type(value) in (int, float) and value in values

        if is_len(left) and isinstance(op, ast.GtE) and is_num(right, (0,)):
            return "len() >= 0"
        if is_len(right) and isinstance(op, ast.LtE) and is_num(left, (0,)):
            return "0 <= len()"
        if is_len(left) and isinstance(op, ast.Gt) and is_num(right, (-1,)):
            return "len() > -1"
    return None


def _and_or(node) -> bool:
    """`A and B or C` at the top of an assert's test (through `not` and `and`/`or` chains)."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return _and_or(node.operand)
    if isinstance(node, ast.BoolOp):
        if isinstance(node.op, ast.Or) and any(isinstance(v, ast.BoolOp) and isinstance(v.op, ast.And)
                                               for v in node.values):  # fmt: skip
            return True
        return any(_and_or(v) for v in node.values)
    return False


def _is_raises(expr) -> bool:
    return isinstance(expr, ast.Call) and _dotted(expr.func).split(".")[-1] in RAISES


def _empty_body(body) -> bool:
    return all(isinstance(s, ast.Pass) or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
               for s in body)  # fmt: skip


def vacuous_checks(source: str, filename: str = "<string>") -> list[tuple[int, str]]:
    """(line, why) for every check in `source` that cannot fail, or that skips where it should fail in CI."""
    found: list[tuple[int, str]] = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert):
            if _and_or(node.test):
                found.append((node.lineno, "`A and B or C` in an assert is `(A and B) or C`: split it into asserts"))
            why = _always_true(node.test)
            if why:
                found.append((node.lineno, f"assert of {why}: it tests nothing"))
        elif isinstance(node, ast.With | ast.AsyncWith):
            if any(_is_raises(item.context_expr) for item in node.items) and _empty_body(node.body):
                found.append((node.lineno, "a pytest.raises/warns block with nothing in it"))
        elif isinstance(node, ast.Expr):
            if isinstance(node.value, ast.Compare):
                found.append((node.lineno, "a comparison on its own line (its `assert` forgotten?)"))
            elif _is_raises(node.value) and len(node.value.args) < 2:
                found.append((node.lineno, "pytest.raises(...) called with nothing to run: use `with`"))
        elif isinstance(node, ast.Call) and Path(filename).name not in SKIP_ALLOWED:
            name = _dotted(node.func)
            if name in ("pytest.skip", "pytest.importorskip"):
                found.append((node.lineno, f"{name}() skips even in CI: use helpers.require_tool / import_tool"))
    return sorted(found)


def _suite_files() -> list[Path]:
    return sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))


# --------------------------------------------------------------------------- the scan, on the suite


def test_no_check_in_the_suite_or_the_benchmarks_cannot_fail():
    files = _suite_files()
    assert len(files) > 40 and any(p.name == "test_suite_honesty.py" for p in files)
    hits = [
        f"{p.relative_to(ROOT)}:{line}: {why}"
        for p in files
        for line, why in vacuous_checks(p.read_text(encoding="utf-8"), str(p))
    ]
    assert hits == [], "\n".join(hits)


# --------------------------------------------------------------------------- the scan catches each pattern

CAUGHT = {
    "and-or": "assert res.exit_code == 2 and 'x' in out or isinstance(e, SystemExit)",
    "and-or under not": "assert not (a and b or c)",
    "and-or inside and": "assert ok and (a and b or c)",
    "and-or, parenthesised": "assert (a and b) or c",
    "tuple": 'assert (x == 1, "x should be 1")',
    "list": "assert [x]",
    "string": 'assert "never empty"',
    "f-string": 'assert f"{x} is set"',
    "true": "assert True",
    "number": "assert 1",
    "lambda": "assert lambda: x",
    "generator": "assert (v for v in xs)",
    "same both sides": "assert x == x",
    "same attribute both sides": "assert res.output <= res.output",
    "same, is": "assert a.b is a.b",
    "constant comparison": "assert 1 < 2",
    "constant comparison, strings": "assert 'a' in 'abc'",
    "constant comparison, false": "assert 2 == 3",
    "or True": "assert x or True",
    "or string": "assert x == 1 or 'why'",
    "and of constants": "assert 1 and 'a'",
    "len >= 0": "assert len(rows) >= 0",
    "0 <= len": "assert 0 <= len(rows)",
    "len > -1": "assert len(rows) > -1",
    "is not a new list": "assert x is not []",
    "empty raises": "with pytest.raises(ValueError):\n    pass",
    "raises with a docstring only": "with pytest.raises(ValueError, match='x'):\n    '''nothing'''",
    "bare raises(): ": "from pytest import raises\nwith raises(KeyError):\n    ...",
    "empty warns": "with pytest.warns(UserWarning):\n    pass",
    "raises called with nothing to run": "pytest.raises(ValueError)",
    "forgotten assert": "x == 1",
    "forgotten assert, in": "'a' in out",
    "skip": "def test():\n    pytest.skip('no chromium')",
    "importorskip": "ray = pytest.importorskip('ray')",
    "in a nested function": "def outer():\n    def inner():\n        assert (a, 'b')\n    return inner",
}

PASSES = {
    "plain": "assert x == 1",
    "with a message": 'assert x == 1, f"x is {x}"',
    "and": "assert a and b",
    "or": "assert a or b",
    "and of ors": "assert (a or b) and c",
    "not": "assert not x",
    "empty tuple (always fails, not vacuous)": "assert ()",
    "assert False": "assert False, 'unreachable'",
    "different sides": "assert a.b == a.c",
    "determinism: calls on both sides": "assert f(x) == f(x)",
    "len > 0": "assert len(rows) > 0",
    "len >= 1": "assert len(rows) >= 1",
    "is not None": "assert x is not None",
    "f-string of a value only": 'assert f"{x}"',
    "raises with a body": "with pytest.raises(ValueError):\n    int('x')",
    "raises with a callable": "pytest.raises(ValueError, int, 'x')",
    "comparison assigned": "ok = x == 1",
    "skipif marker": "@pytest.mark.skipif(True, reason='no CUDA')\ndef test(): pass",
    "require_tool": "def test():\n    require_tool('chromium', 'not installed')",
}


@pytest.mark.parametrize("name", CAUGHT)
def test_the_scan_catches(name):
    assert len(vacuous_checks(CAUGHT[name])) == 1, vacuous_checks(CAUGHT[name])


@pytest.mark.parametrize("name", PASSES)
def test_the_scan_lets_through(name):
    assert vacuous_checks(PASSES[name]) == []


def test_the_scan_names_the_line():
    src = "x = 1\n\nassert x == 1\nassert (x, 'msg')\n"
    [(line, why)] = vacuous_checks(src)
    assert line == 4 and "tuple" in why


def test_the_scan_allows_a_direct_skip_only_in_the_helpers():
    src = "import pytest\npytest.skip('x')\n"
    assert vacuous_checks(src, "tests/helpers.py") == []
    assert len(vacuous_checks(src, "tests/test_x.py")) == 1


# --------------------------------------------------------------------------- helpers.assert_one_message


@click.command()
@click.option("--how", type=click.Choice(["traceback", "clean", "twice", "crash", "exit1"]))
def _refuser(how):
    """Stands in for a CLI command that refuses its input in one of several ways."""
    if how == "traceback":  # prints a traceback, then exits 2 as a refusal would
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            click.echo(traceback.format_exc(), err=True)
        click.echo("Error: it broke.", err=True)
        sys.exit(2)
    if how == "clean":
        click.echo("Error: give --db PATH.", err=True)
        sys.exit(2)
    if how == "twice":
        click.echo("Error: one.\nError: two.", err=True)
        sys.exit(2)
    if how == "exit1":
        click.echo("Error: give --db PATH.", err=True)
        sys.exit(1)
    raise RuntimeError("an exception that escaped")


def _refused(how):
    return CliRunner().invoke(_refuser, ["--how", how])


def test_assert_one_message_fails_on_a_traceback_with_exit_status_2():
    res = _refused("traceback")
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit) and "Traceback" in res.output
    # the old helper's line, which Python read as `(A and B) or C`, passed on this result:
    old = "Traceback" not in res.output and res.exception is None or isinstance(res.exception, SystemExit)
    assert old is True
    with pytest.raises(AssertionError, match="Traceback"):
        assert_one_message(res, "it broke")


def test_assert_one_message_fails_on_an_escaped_exception_and_on_other_statuses():
    res = _refused("crash")
    assert res.exit_code == 1 and isinstance(res.exception, RuntimeError) and "Traceback" not in res.output
    with pytest.raises(AssertionError, match="exit status 1"):
        assert_one_message(res)
    with pytest.raises(AssertionError, match="RuntimeError"):  # even where that status is the one expected
        assert_one_message(res, code=1)
    with pytest.raises(AssertionError, match="exit status 1"):
        assert_one_message(_refused("exit1"), "give --db")


def test_assert_one_message_wants_one_error_line_and_every_needle():
    res = _refused("clean")
    assert_one_message(res, "give --db", "PATH")  # a clean refusal passes
    with pytest.raises(AssertionError, match="--config"):
        assert_one_message(res, "--config")
    with pytest.raises(AssertionError, match="Error: two"):
        assert_one_message(_refused("twice"))


# --------------------------------------------------------------------------- helpers.require_tool


@pytest.mark.parametrize("value", ["true", "TRUE", "1", "yes"])
def test_require_tool_fails_in_ci(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    assert in_ci()
    with pytest.raises(pytest.fail.Exception, match="chromium: not installed .*required in CI"):
        require_tool("chromium", "not installed")
    with pytest.raises(pytest.fail.Exception, match="no_such_module_29: cannot be imported .*pip install x"):
        import_tool("no_such_module_29", "pip install x")


@pytest.mark.parametrize("value", [None, "", "false", "0"])
def test_require_tool_skips_elsewhere_saying_why(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert not in_ci()
    with pytest.raises(pytest.skip.Exception, match="ray: not installed"):
        require_tool("ray", "not installed")
    with pytest.raises(pytest.skip.Exception, match="no_such_module_29: cannot be imported"):
        import_tool("no_such_module_29", "pip install x")
    assert import_tool("json", "stdlib").dumps([1]) == "[1]"


def test_a_missing_tool_fails_a_real_test_run_in_ci(pytester, monkeypatch):
    """Through pytest itself: the same test fails under CI=true and skips (with its reason) without."""
    pytester.syspathinsert(ROOT / "tests")
    pytester.makepyfile(
        "from helpers import require_tool\n\ndef test_needs_it():\n    require_tool('chromium', 'missing here')\n"
    )
    monkeypatch.setenv("CI", "true")
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(failed=1)
    monkeypatch.delenv("CI")
    res = pytester.runpytest("-p", "no:cacheprovider", "-rs")
    res.assert_outcomes(skipped=1)
    res.stdout.fnmatch_lines(["*chromium: missing here*"])


# --------------------------------------------------------------------------- .ci/run stops without Chromium


def _stub(folder: Path, name: str, body: str) -> None:
    p = folder / name
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(p.stat().st_mode | stat.S_IXUSR)


def _run_ci(tmp_path, apt_get_body: str):
    """.ci/run with a PATH that holds only stubs: no chromium, `apt-get` as given, and python3 (the step after
    the Chromium install) leaving a mark if it is ever reached."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "apt-get", f'echo "apt-get $*" >> {tmp_path}/calls\n{apt_get_body}')
    _stub(bin_dir, "python3", f": > {tmp_path}/python3-ran\nexit 1")  # shell built-ins only: PATH has no touch
    (bin_dir / "dirname").symlink_to("/usr/bin/dirname")
    env = {k: v for k, v in os.environ.items() if k not in ("CI",)}
    env["PATH"] = str(bin_dir)
    return subprocess.run(["/bin/bash", str(ROOT / ".ci" / "run")], capture_output=True, text=True, env=env,
                          timeout=60)  # fmt: skip


def test_ci_run_stops_when_chromium_cannot_be_installed(tmp_path):
    res = _run_ci(tmp_path, "exit 100")
    assert res.returncode != 0
    assert "could not install chromium" in res.stderr, res.stderr
    assert "apt-get update" in (tmp_path / "calls").read_text()
    assert not (tmp_path / "python3-ran").exists()  # stopped there: no venv, no tests


def test_ci_run_stops_when_the_install_leaves_no_chromium(tmp_path):
    res = _run_ci(tmp_path, "exit 0")  # apt-get "succeeds" but no chromium appears
    assert res.returncode != 0
    assert "chromium" in res.stderr and not (tmp_path / "python3-ran").exists(), res.stderr


def test_ci_run_goes_on_once_chromium_is_installed(tmp_path):
    res = _run_ci(tmp_path, f'[ "$1" = install ] && printf "#!/bin/sh\\n" > {tmp_path}/bin/chromium '
                            f"&& /bin/chmod +x {tmp_path}/bin/chromium; exit 0")  # fmt: skip
    assert (tmp_path / "python3-ran").exists(), res.stderr  # it reached the next step
    assert "apt-get install" in (tmp_path / "calls").read_text()


def test_ci_run_sets_ci_so_a_missing_tool_fails_the_tests():
    text = (ROOT / ".ci" / "run").read_text()
    assert "export CI=true" in text and "|| echo" not in text
