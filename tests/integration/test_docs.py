"""The documentation cannot rot: its Python snippets run and its commands' flags exist.

Every ```python block of README.md and docs/*.md runs in a fresh process, in a
directory holding `runs/demo/export/1/` (a tiny exported model) for the snippets that
load one; blocks marked ```python notest need a running TF Serving server and are only
compiled. Every `python -m instance_embed.<program>` command of the docs, WORKSPACE.md,
the Makefile and the flagfiles' headers uses only flags that program defines.
"""

import json
import pathlib
import re
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

DOCS = sorted([REPO_ROOT / "README.md", *(REPO_ROOT / "docs").glob("*.md")])
COMMAND_SOURCES = DOCS + [REPO_ROOT / "WORKSPACE.md", REPO_ROOT / "Makefile",
                          *sorted((REPO_ROOT / "experiments").glob("*.flags"))]
PROGRAMS = ("train_main", "eval_main", "export_main", "predict_main", "dataset_main")
# Flags the absl parser itself handles.
PARSER_FLAGS = {"flagfile", "undefok", "help", "helpfull", "helpshort", "helpxml"}
FLAGFILES = sorted((REPO_ROOT / "experiments").glob("*.flags"))
_BLOCK = re.compile(r"^```python( notest)?\n(.*?)^```", re.MULTILINE | re.DOTALL)


def python_snippets():
    """(id, code, runnable) of every Python block of the docs."""
    snippets = []
    for path in DOCS:
        text = path.read_text()
        for match in _BLOCK.finditer(text):
            line = text[:match.start()].count("\n") + 1
            snippets.append((f"{path.relative_to(REPO_ROOT)}:{line}", match.group(2),
                             match.group(1) is None))
    return snippets


def program_commands():
    """(source, program, [flag names]) of every `python -m instance_embed.X` command."""
    commands = []
    for path in COMMAND_SOURCES:
        # Shell continuations and Makefile recipes joined into one line per command.
        text = path.read_text().replace("\\\n", " ")
        for match in re.finditer(r"-m instance_embed\.(\w+)([^\n`|;]*)", text):
            program, rest = match.groups()
            flags = re.findall(r"(?:^|\s)--([A-Za-z_][\w]*)", rest)
            commands.append((f"{path.relative_to(REPO_ROOT)}: {program}{rest[:60]}",
                             program, flags))
    return commands


SNIPPETS = python_snippets()
COMMANDS = program_commands()


def test_the_docs_have_snippets_and_commands():
    assert sum(runnable for _, _, runnable in SNIPPETS) >= 4
    assert {program for _, program, _ in COMMANDS} == set(PROGRAMS)


@pytest.fixture(scope="module")
def demo_workdir(tmp_path_factory, make_run_dir):
    """A working directory with `runs/demo/export/1/` exported from a tiny model."""
    from instance_embed import serving

    workdir = tmp_path_factory.mktemp("docs")
    run_dir = make_run_dir(workdir / "runs" / "demo")
    serving.export_from_model_dir(str(run_dir), str(run_dir / "export"))
    return workdir


@pytest.mark.parametrize("snippet_id, code, runnable", SNIPPETS,
                         ids=[snippet_id for snippet_id, _, _ in SNIPPETS])
def test_python_snippet_runs(snippet_id, code, runnable, demo_workdir):
    compile(code, snippet_id, "exec")
    if not runnable:
        return
    out = subprocess.run([sys.executable, "-c", code], cwd=demo_workdir, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, f"{snippet_id}\n{out.stderr[-3000:]}"


@pytest.fixture(scope="module")
def defined_flags(run_together):
    """{program: the names of the flags it defines}, each read in its own process."""
    script = ("import importlib, json, sys\n"
              "from absl import flags\n"
              "importlib.import_module('instance_embed.' + sys.argv[1])\n"
              "print('FLAGS' + json.dumps(sorted(flags.FLAGS)))\n")
    outputs = run_together([[sys.executable, "-c", script, program] for program in PROGRAMS])
    return {program: set(json.loads(out.stdout.split("FLAGS")[-1]))
            for program, out in zip(PROGRAMS, outputs)}


@pytest.mark.parametrize("source, program, flags", COMMANDS,
                         ids=[source for source, _, _ in COMMANDS])
def test_documented_command_flags_exist(source, program, flags, defined_flags):
    known = defined_flags[program] | PARSER_FLAGS
    unknown = [flag for flag in flags
               if flag not in known and not (flag.startswith("no") and flag[2:] in known)]
    assert not unknown, f"{source}: no such flag of {program}: {unknown}"


@pytest.mark.parametrize("flagfile", FLAGFILES, ids=[path.name for path in FLAGFILES])
def test_flagfiles_set_only_train_main_flags_and_have_short_headers(flagfile, defined_flags):
    lines = flagfile.read_text().splitlines()
    header = [line for line in lines if line.startswith("#")]
    assert len(header) <= 8, f"{flagfile.name}: a header of {len(header)} lines"
    assert "docs/results.md" in header[-1], f"{flagfile.name}: the header's last line"
    names = [re.match(r"--(\w+)", line).group(1) for line in lines
             if line.strip() and not line.startswith("#")]
    known = defined_flags["train_main"]
    unknown = [name for name in names
               if name not in known and not (name.startswith("no") and name[2:] in known)]
    assert names and not unknown, f"{flagfile.name}: unknown flags {unknown}"
