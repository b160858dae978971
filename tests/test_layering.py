"""The layering rule (DESIGN §2): `cluster -> workers -> idlm_kernels`, never back, and only
`cluster/` imports Ray. Checked on the import statements of every source file (ast, no imports run)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# package -> top-level modules it must never import
FORBIDDEN = {
    "workers": {"ray", "cluster"},
    "idlm_kernels": {"ray", "cluster", "workers"},
}


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no source files"
    bad = {str(f.relative_to(ROOT)): sorted(_imported_roots(f) & FORBIDDEN[package]) for f in files}
    assert not {f: m for f, m in bad.items() if m}, f"{package}/ imports a layer above it"


def test_no_top_level_kernels_package():
    """`kernels` is Hugging Face's hub-kernels package, which transformers >= 5.25 requires and imports
    (`from kernels import ...` whenever that distribution is installed): a package of ours under that
    name would shadow it and break `import transformers` models, and the tokenizer with them."""
    assert not (ROOT / "kernels").exists()
    import transformers.models.llama.configuration_llama  # noqa: F401  (imports hub_kernels)
