"""The library core never imports toy models, figures, benchmarks or tests, nor the optional packages (wandb, the
language-model extras) at module level, so `import spd` works without them."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_CORE = ("toy_models", "figures", "benchmarks", "tests")
LAZY_IN_CORE = ("wandb", "transformers", "transformer_lens", "huggingface_hub", "gguf", "devinterp")
ALLOWED_SPD_IN_TOYS = ("spd.task", "spd.ground_truth", "spd.scale")


def _imports(path: Path, top_level_only: bool) -> list[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = []
    for node in nodes:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_core_imports():
    for path in (ROOT / "spd").rglob("*.py"):
        for name in _imports(path, top_level_only=False):
            root = name.split(".")[0]
            if root in LAZY_IN_CORE:
                assert name not in _imports(path, top_level_only=True), f"{path} imports {name} at module level"
            else:
                assert root not in FORBIDDEN_IN_CORE, f"{path.relative_to(ROOT)} imports {name}"


def test_toy_models_use_only_the_task_interface_of_spd():
    for path in (ROOT / "toy_models").rglob("*.py"):
        if path.name in ("cli.py", "unlearning.py"):  # `spd toy` and the per-feature study drive the library
            continue
        for name in _imports(path, top_level_only=False):
            if name.split(".")[0] == "spd":
                assert name in ALLOWED_SPD_IN_TOYS, f"{path.relative_to(ROOT)} imports {name}"
