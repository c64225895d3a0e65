"""`pip install .` (not editable) gives a working `fusionserve` outside the checkout: configs,
presets, the default serve_config.yaml and the CLIP vocabulary come as package data.

The install goes into a fresh virtual environment that borrows the dependencies of the one
running the tests (a .pth line naming its site-packages; a folder named there is put on
sys.path but not scanned for .pth files, so the checkout's editable finder stays out), and
is built from a copy of the packaging inputs (no build/ or egg-info left in the checkout,
no stale build/lib shipped). Offline, no dependency reinstalled: a few seconds.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from serve_app.ops import cli
from tests.conftest import png_pixels

ROOT = Path(__file__).resolve().parents[2]
# what the build reads: pyproject.toml names README.md (readme) and the package folders
PACKAGING_INPUTS = ("pyproject.toml", "README.md", "serve_config.yaml", "serve_app", "deployments", "configs")
PROMPT = "portrait of a smiling Asian man who is wearing glasses, photorealistic"


def run(command: list[str], cwd: Path, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A virtual environment with fusionserve installed from a copy of the checkout; its bin/."""
    base = tmp_path_factory.mktemp("install")
    source = base / "source"
    source.mkdir()
    for name in PACKAGING_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    venv = base / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=base)
    python = venv / "bin" / "python"
    site_packages = Path(
        run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], base).stdout.strip()
    )
    (site_packages / "_fusionserve_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-build-isolation"]
        + ["--ignore-installed", "--disable-pip-version-check", str(source)],
        cwd=base,
    )
    shutil.rmtree(source)  # the installed copy must not need it
    return venv / "bin"


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory) -> Path:
    """A working directory outside the checkout (no serve_config.yaml, no configs/)."""
    return tmp_path_factory.mktemp("elsewhere")


@pytest.mark.slow
def test_the_installed_copy_is_what_runs(installed, elsewhere):
    probe = (
        "import json, sys, serve_app, fusionserve_configs, deployments.models.clip_vocab as vocab; "
        "print(json.dumps({'serve_app': serve_app.__file__, 'configs': fusionserve_configs.__file__, "
        "'vocabulary': str(vocab.find_bpe_file()), 'finders': [repr(f) for f in sys.meta_path], "
        "'page': str(__import__('serve_app.http.playground', fromlist=['x']).PAGE_DIR / 'playground.js')}))"
    )
    found = json.loads(run([str(installed / "python"), "-c", probe], elsewhere).stdout)
    venv = installed.parent.resolve()
    assert Path(found["page"]).is_file(), found["page"]  # the playground ships as package data
    for name in ("serve_app", "configs", "vocabulary", "page"):
        assert Path(found[name]).resolve().is_relative_to(venv), (name, found[name])
    assert not any("editable" in finder for finder in found["finders"]), found["finders"]


@pytest.mark.slow
def test_installed_optimize_prints_the_checkouts_json(installed, elsewhere, tiny_model_path, capsys):
    done = run([str(installed / "fusionserve"), "optimize", "--json", PROMPT], elsewhere)
    body = json.loads(done.stdout)
    assert cli.main(["optimize", "--json", PROMPT]) == 0  # the checkout, in this process
    assert body == json.loads(capsys.readouterr().out)
    assert body["prompt"] != PROMPT and body["optimized_tokens"] < body["original_tokens"]
    assert body["attributes"]["glasses"]


@pytest.mark.slow
def test_installed_generate_writes_the_checkouts_png(installed, elsewhere, tiny_model_path):
    arguments = ["generate", PROMPT, "--size", "96x64", "--steps", "2", "--seed", "3", "-o"]
    run([str(installed / "fusionserve"), *arguments, "installed.png"], elsewhere)
    assert cli.main([*arguments, str(elsewhere / "checkout.png")]) == 0  # the checkout, in this process
    png = (elsewhere / "installed.png").read_bytes()
    assert png_pixels(png).shape == (64, 96, 3)  # height x width
    assert png == (elsewhere / "checkout.png").read_bytes()


def test_pyproject_lists_every_package_folder():
    """pyproject.toml lists its packages (configs/ installs under another name, which
    `packages.find` cannot do): every folder of serve_app/ and deployments/ must be there."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {
        ".".join(folder.relative_to(ROOT).parts)
        for top in ("serve_app", "deployments")
        for folder in [ROOT / top, *(ROOT / top).rglob("*")]
        if folder.is_dir() and folder.name != "__pycache__" and any(p.is_file() for p in folder.iterdir())
    }
    assert folders - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert {
        "fusionserve_configs",
        "fusionserve_configs.models",
        "fusionserve_configs.profiles",
        "fusionserve_configs.samplers",
    } <= listed


def test_the_packaged_serve_config_is_the_top_level_one():
    """configs/serve_config.yaml links to serve_config.yaml (one file, shipped as package data)."""
    link = ROOT / "configs" / "serve_config.yaml"
    assert link.is_symlink() and link.resolve() == (ROOT / "serve_config.yaml").resolve()
    assert cli.packaged_config().resolve() == (ROOT / "serve_config.yaml").resolve()


def _distribution_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_package_is_declared():
    """Each third-party import of serve_app/ and deployments/ comes from a dependency of
    pyproject.toml (or of an optional extra, for the import-guarded GPU libraries)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    declared = {_distribution_name(re.split(r"[\[=<>~!; ]", requirement)[0]) for requirement in requirements}
    imported = set()
    for top in ("serve_app", "deployments"):
        for path in (ROOT / top).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    imported |= {alias.name.partition(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    imported.add(node.module.partition(".")[0])
    ours = {"serve_app", "deployments", "fusionserve_configs"}
    third_party = sorted(imported - ours - set(sys.stdlib_module_names))
    distributions = metadata.packages_distributions()
    undeclared = [
        module
        for module in third_party
        if not any(_distribution_name(d) in declared for d in distributions.get(module, [module]))
    ]
    assert third_party and not undeclared, f"imported but not in pyproject.toml's dependencies: {undeclared}"
