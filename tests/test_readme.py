"""The README's Python blocks run as written, in order, in one interpreter, from an empty folder (they
build their models from configs: no downloads), and the links it makes point at files that exist."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks(text: str) -> list:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_python_blocks_run_as_written(tmp_path):
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = python_blocks(f.read())
    assert len(blocks) >= 4, "the README's API tour is missing"
    script = tmp_path / "readme_blocks.py"
    script.write_text("\n\n".join(f"# ---- README block {i}\n{block}" for i, block in enumerate(blocks)))
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "2")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (tmp_path / "my_adapter" / "adapter_config.json").is_file()


def test_readme_links_point_at_files_in_the_repository():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    links = re.findall(r"\]\(([^)#:]+)\)", text)
    assert links
    for link in links:
        assert os.path.exists(os.path.join(ROOT, link)), link


def test_no_reference_points_outside_the_repository():
    """The design document the code cites is docs/design.md, and each section it names exists there."""
    with open(os.path.join(ROOT, "docs", "design.md")) as f:
        sections = set(re.findall(r"^## (.+)$", f.read(), flags=re.M))
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True).stdout.split()
    cited = set()
    for name in files:
        if not name.endswith((".py", ".h", ".cpp", ".cu", ".cuh", ".md", ".sh", ".toml")):
            continue
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            text = f.read()
        assert "DESIGN" + ".md" not in text, name
        for title in re.findall(r"docs/design\.md, sections? '([^']+)'(?: and '([^']+)')?", text):
            cited.update(t for t in title if t)
    assert cited and cited <= sections, cited - sections
