"""Nothing from a spec reaches a shell; secrets never reach logs, XCom or reports; the report escapes what it shows."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from include.cosmos_upsample.settings import Settings
from tests.conftest import ROOT
from tests.reliability.conftest import GOOD, METACHAR_STEM, PWNED_NAMES

SOURCE_DIRS = ("include", "docker", "dags", "plugins")
SUBPROCESS_CALLS = {"run", "Popen", "call", "check_call", "check_output"}
# Calls that always go through a shell.
SHELL_CALLS = {("os", "system"), ("os", "popen"), ("subprocess", "getoutput"), ("subprocess", "getstatusoutput"),
               ("asyncio", "create_subprocess_shell")}


def python_sources() -> list[Path]:
    files = [path for folder in SOURCE_DIRS for path in sorted((ROOT / folder).rglob("*.py"))]
    return [path for path in files if ".venv" not in path.parts and "__pycache__" not in path.parts]


def dotted(node: ast.AST) -> tuple[str, ...]:
    if isinstance(node, ast.Attribute):
        return (*dotted(node.value), node.attr)
    if isinstance(node, ast.Name):
        return (node.id,)
    return ()


def builds_a_string(node: ast.AST) -> bool:
    """A command written as one string (literal, f-string, concatenation, % or .format/.join): a shell's job."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.BinOp):
        return builds_a_string(node.left) or builds_a_string(node.right)
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in {"format",
                                                                                                    "join"}


def shell_problems(path: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if not isinstance(node, ast.Call):
            continue
        where = f"{path.relative_to(root)}:{node.lineno}"
        name = dotted(node.func)
        for keyword in node.keywords:
            if keyword.arg == "shell" and not (isinstance(keyword.value, ast.Constant) and not keyword.value.value):
                problems.append(f"{where}: shell={ast.unparse(keyword.value)}")
        if name[-2:] in SHELL_CALLS:
            problems.append(f"{where}: {'.'.join(name)} runs a shell or a string command")
        if name[:1] == ("subprocess",) and name[-1] in SUBPROCESS_CALLS:
            command = node.args[0] if node.args else next(
                (keyword.value for keyword in node.keywords if keyword.arg == "args"), None)
            if command is not None and builds_a_string(command):
                problems.append(f"{where}: subprocess.{name[-1]} gets a string, not a list of arguments")
    return problems


def test_the_checker_catches_shell_strings(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os, subprocess\n"
                   "subprocess.run(f'ffmpeg -i {path}', shell=True)\n"
                   "subprocess.Popen('ls ' + name)\n"
                   "os.system('rm ' + name)\n"
                   "subprocess.check_output(' '.join(args))\n"
                   "subprocess.run(['ffmpeg', '-i', path], shell=False)\n")
    problems = [line.split(": ", 1)[1] for line in shell_problems(bad, root=tmp_path)]
    assert problems == ["shell=True", "subprocess.run gets a string, not a list of arguments",
                        "subprocess.Popen gets a string, not a list of arguments", "os.system runs a shell or a "
                        "string command", "subprocess.check_output gets a string, not a list of arguments"]


def test_no_source_file_builds_a_shell_command_from_strings():
    sources = python_sources()
    assert any(path.name == "runners.py" for path in sources), "the project's sources were not found"
    problems = [problem for path in sources for problem in shell_problems(path)]
    assert not problems, "\n".join(problems)


@pytest.mark.e2e
class TestHostileStrings:
    def test_metacharacters_in_names_prompts_and_paths_run_nothing(self, hostile_run):
        assert hostile_run.item(f"{METACHAR_STEM}.json")["status"] == "upsampled"
        places = [hostile_run.root, ROOT, Path.cwd(), Path(hostile_run.airflow_home), Path("/tmp")]
        found = [place / name for place in places for name in PWNED_NAMES if os.path.lexists(place / name)]
        found += [path for path in hostile_run.root.rglob("*") if path.name in PWNED_NAMES]
        assert not found, f"a spec string reached a shell: {found}"

    def test_report_html_escapes_every_string(self, hostile_run):
        [html_path] = (hostile_run.output_dir / "reports").glob("*.html")
        html = html_path.read_text(encoding="utf-8")
        assert "<script>alert" not in html and "<img src=x" not in html
        assert "&lt;script&gt;alert(" in html and "&lt;img src=x onerror=alert(1)&gt;" in html
        # File names with markup characters are escaped too (the input folder's name holds quotes and '&').
        assert str(hostile_run.input_dir) not in html and "&amp;" in html


@pytest.mark.e2e
class TestSecrets:
    def test_secrets_reach_no_log_xcom_report_or_output(self, hostile_run):
        outputs = [path for path in hostile_run.output_dir.rglob("*") if path.is_file()]
        haystacks = {"airflow dags test output": hostile_run.output, "XCom table": hostile_run.xcom_values()}
        haystacks.update({str(path): path.read_bytes().decode("utf-8", "replace") for path in outputs
                          if path.suffix in {".json", ".html", ".jsonl", ".txt"}})
        leaks = [(secret, where) for secret in hostile_run.secrets for where, text in haystacks.items()
                 if secret in text]
        assert not leaks, leaks

    def test_report_params_hold_only_the_settings(self, hostile_run):
        assert set(hostile_run.report["params"]) == set(Settings.model_fields)
        assert "api_token" not in hostile_run.report["params"]

    def test_metachar_spec_output_is_a_plain_file_name(self, hostile_run):
        spec_id = GOOD[f"{METACHAR_STEM}.json"]
        assert spec_id == "a_rm_-rf_x_touch_pwned_"
        assert (hostile_run.output_dir / "specs" / f"{spec_id}.json").is_file()
