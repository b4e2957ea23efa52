"""Where code lives: the commands and the model at the root, the library in one package that imports no command."""
import ast
import os

from helpers import ROOT

COMMANDS = {"main", "classify", "export_onnx", "bench"}


PACKAGE = os.path.join(ROOT, "training")


def _package_modules():
    return sorted(name[:-3] for name in os.listdir(PACKAGE) if name.endswith(".py"))


def _imported_modules(path):
    """(module, line) of every import in the file, top-level or nested: ``from training import x`` yields
    ``training.x``."""
    with open(path) as handle:
        tree = ast.parse(handle.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module, node.lineno
            yield from ((f"{node.module}.{alias.name}", node.lineno) for alias in node.names)


def test_the_root_holds_the_commands_and_the_model_only():
    python_files = {name[:-3] for name in os.listdir(ROOT) if name.endswith(".py")}
    assert python_files == COMMANDS | {"mnasnet"}


def test_the_package_imports_no_command_and_names_itself():
    """A bare ``import metrics`` inside the package could load a root file of that name; a package module that
    imports a command would run its module-level code (and cycle through it)."""
    siblings = set(_package_modules())
    found = []
    for module in _package_modules():
        path = os.path.join(PACKAGE, f"{module}.py")
        for imported, line in _imported_modules(path):
            top = imported.split(".")[0]
            if top in COMMANDS or top in siblings:
                found.append(f"training/{module}.py:{line}: import of {imported}")
    assert found == []


def test_a_bare_import_of_a_root_module_is_caught(tmp_path):
    """The check above reads nested imports too (the package imports some libraries inside functions)."""
    path = tmp_path / "probe.py"
    path.write_text("def f():\n    import main\n    from engine import x\n")
    assert [name for name, _ in _imported_modules(path)] == ["main", "engine", "engine.x"]


def _first_imports(path):
    with open(path) as handle:
        tree = ast.parse(handle.read(), path)
    return [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]


def test_every_entry_point_switches_torch_npu_autoload_off_before_anything_imports_torch():
    """An import sorter moves ``from training import autoload_off`` below ``import torch`` unless told not to;
    then torch autoloads a torch_npu that cannot load and every run fails (training/autoload_off.py). With
    test_devices.py's runs of main.py next to such a torch_npu, which prove the switch works, this holds for every
    command."""
    entry_points = [f"{name}.py" for name in sorted(COMMANDS)] + ["tools/device_check.py", "tools/onnx_to_om.py"]
    for entry_point in entry_points:
        imports = _first_imports(os.path.join(ROOT, entry_point))
        first = next(node for node in imports if not (isinstance(node, ast.Import) and
                                                       node.names[0].name in ("os", "sys", "time")))
        assert isinstance(first, ast.ImportFrom) and (first.module, first.names[0].name) == \
            ("training", "autoload_off"), entry_point
