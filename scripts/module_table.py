"""Regenerate the module table of docs/architecture.md: one line per module, from its docstring.

    python scripts/module_table.py
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "latentdiff"
DOC = ROOT / "docs" / "architecture.md"
# bottom layer first, as in the import-linter contract
ORDER = ["errors.py", "utils", "nn", "models", "codecs", "diffusion", "sampling", "guidance", "pipeline", "data",
         "evaluation", "training", "export", "serve", "cli"]
KEEP_INIT = {"data", "pipeline", "guidance"}  # packages whose __init__ re-exports a public API


def summary(path: Path) -> tuple[int, str]:
    text = path.read_text(encoding="utf-8")
    doc = (ast.get_docstring(ast.parse(text)) or "").strip()
    return len(text.splitlines()), " ".join(doc.split("\n\n")[0].split()).replace("|", "/")


def table() -> str:
    out = []
    for part in ORDER:
        target = PACKAGE / part
        if not target.exists():
            continue
        paths = [target] if target.is_file() else sorted(target.glob("*.py"))
        out.append(f"\n### `{part if target.is_file() else part + '/'}`\n\n| module | lines | what it holds |\n| --- | --- | --- |")
        for p in paths:
            if p.name == "__init__.py" and part not in KEEP_INIT:
                continue
            n, first = summary(p)
            out.append(f"| `{p.relative_to(PACKAGE)}` | {n} | {first} |")
    return "\n".join(out) + "\n"


def main():
    doc = DOC.read_text(encoding="utf-8")
    head = doc[:doc.index("## Modules")]
    DOC.write_text(head + "## Modules\n\nOne line per module (its docstring's first paragraph); `tests/test_architecture.py` "
                   "keeps every module\nunder about 450 lines and every function under about 80. Regenerate the table "
                   "with\n`python scripts/module_table.py`.\n" + table(), encoding="utf-8")


if __name__ == "__main__":
    main()
