"""The project installs like a package: declared dependencies, importable from any folder, no path
edits, and a wheel that carries the toy world's recogniser."""

import os
import re
import subprocess
import sys
import zipfile

import pytest
from conftest import ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the project itself runs on 3.10


def requirement_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        lines = [line.split("#")[0].strip() for line in f]
    return [line for line in lines if line]


def project_table() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def test_requirements_txt_and_pyproject_declare_the_same_dependencies():
    runtime = [r for r in requirement_lines(os.path.join(ROOT, "requirements.txt")) if not r.startswith("pytest")]
    assert sorted(runtime) == sorted(project_table()["dependencies"])
    assert any(r.startswith("pytest") for r in project_table()["optional-dependencies"]["test"])


def test_the_packages_import_from_any_folder(tmp_path):
    """Needs `pip install -e .` (the README's setup); no sys.path edit or PYTHONPATH does it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import infinity_t2i, toy_infinity.fidelity, toy_infinity.recogniser, toy_infinity.tiny, toy_infinity.world"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"install the project with `pip install -e .`:\n{result.stderr[-2000:]}"


def test_no_code_edits_sys_path():
    offenders = []
    for folder in ("tests", "benchmarks", "examples", "infinity_t2i", "toy_infinity"):
        for directory, _, names in os.walk(os.path.join(ROOT, folder)):
            for name in names:
                if name.endswith(".py") and name != os.path.basename(__file__):
                    path = os.path.join(directory, name)
                    with open(path, encoding="utf-8") as f:
                        if re.search(r"sys\.path\.(insert|append)", f.read()):
                            offenders.append(os.path.relpath(path, ROOT))
    assert not offenders


@pytest.mark.slow
def test_the_wheel_has_a_name_a_version_the_dependencies_and_the_recogniser(tmp_path):
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(tmp_path),
        ROOT,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = [p for p in os.listdir(tmp_path) if p.endswith(".whl")]
    project = project_table()
    assert wheel.startswith(f"infinity_textual_inversion-{project['version']}-")
    with zipfile.ZipFile(tmp_path / wheel) as archive:
        names = archive.namelist()
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(metadata_name).decode()
    assert "Name: infinity-textual-inversion" in metadata and f"Version: {project['version']}" in metadata
    required = {line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Requires-Dist: ")}
    assert set(project["dependencies"]) <= {r.replace(" ", "") for r in required}
    assert "toy_infinity/recogniser.safetensors" in names and "infinity_t2i/pipeline.py" in names
    assert not [n for n in names if n.startswith(("tests/", "examples/", "benchmarks/"))]


@pytest.mark.parametrize("script", ["train_textual_inversion_infinity.py", "infer_textual_inversion.py"])
def test_the_scripts_read_in_steps(script):
    # someone adapting a script finds the loop, the loss and the save in one screen each: main()
    # within 200 lines, every other function (parse_args aside) within 150, no function inside main
    import ast

    with open(os.path.join(ROOT, script), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    lengths = {name: node.end_lineno - node.lineno + 1 for name, node in functions.items()}
    assert lengths["main"] <= 200
    assert {name: n for name, n in lengths.items() if n > 150 and name not in ("main", "parse_args")} == {}
    nested = [
        n.name for n in ast.walk(functions["main"]) if isinstance(n, ast.FunctionDef) and n is not functions["main"]
    ]
    assert nested == []
