"""Every code block of README.md and docs/ runs here, against the tiny checkpoint; the site builds strictly.

How a page's blocks run (one test per page, blocks in page order, one shared Python namespace, in a
fresh temporary working folder):

- ```python blocks: executed (Sybil). ``>>>`` blocks are doctests.
- ```bash / ```sh blocks: run with ``bash -euo pipefail`` (``rewardplug`` on PATH); must exit 0.
- ```yaml / ```json blocks: parsed (a config that does not parse fails).
- ```text right after a ```python block (nothing but blank lines between): that block's printed
  output, compared exactly (so the figures a page shows cannot drift from the code that makes them).
- ```text elsewhere, ```console / ```jsonl and other languages: shown to the reader, not run.
- Model ids stand in for tiny checkpoints: ``Skywork/Skywork-VL-Reward-7B`` becomes a tiny random
  reward checkpoint in the exact hub format, ``Qwen/Qwen2.5-VL-3B-Instruct`` / ``-7B-Instruct`` a tiny
  random Qwen2.5-VL policy. Nothing else in a block is changed.
- ``<!-- skip: next "reason" -->`` before a block skips it, with the reason shown by pytest; use it only
  for what cannot run on a 2-core CPU machine (multi-GPU launches, a server that runs forever).
- ``<!-- invisible-code-block: python ... -->`` runs set-up code the reader does not need to see.

Pages that start Ray (their blocks mention RewardPool, ray or a pool/serve command) hold the file
lock named by ``REWARDPLUG_RAY_LOCK`` while they run, if that variable is set, so that only one Ray
cluster runs at a time on a shared machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import shutil
import subprocess
import sys
import unittest
from pathlib import Path

import pytest
import yaml
from sybil import Sybil
from sybil.evaluators.python import PythonEvaluator
from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser, SkipParser
from sybil.region import Lexeme

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
REWARD_ID = "Skywork/Skywork-VL-Reward-7B"
POLICY_IDS = ("Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct")
RAY_WORDS = re.compile(r"RewardPool|\bray\b|rewardplug (serve|pool)|import ray")


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, str]:
    from rewardplug.testing import make_tiny_checkpoint

    work = tmp_path_factory.mktemp("doc-models")
    reward = str(make_tiny_checkpoint(work / "tiny-reward", seed=0))
    policy = str(make_tiny_checkpoint(work / "tiny-policy", seed=1))
    return {REWARD_ID: reward, **dict.fromkeys(POLICY_IDS, policy)}


def substitute(text: str, stand_ins: dict[str, str]) -> str:
    for model_id, path in stand_ins.items():
        text = text.replace(model_id, path)
    return text


class StandInPython(PythonEvaluator):
    """Python evaluator that swaps hub ids for the tiny checkpoints' paths (line numbers kept)."""

    def __init__(self, stand_ins):
        super().__init__()
        self.stand_ins = stand_ins

    def __call__(self, example):
        parsed = example.parsed
        example.parsed = Lexeme(substitute(str(parsed), self.stand_ins), parsed.offset, parsed.line_offset)
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                return super().__call__(example)
        finally:
            example.parsed = parsed
            sys.stdout.write(printed.getvalue())
            example.document.last_python = (example.region.end, printed.getvalue())


def check_output(example):
    """A ```text block right after a ```python block must be exactly what that block printed."""
    end, printed = getattr(example.document, "last_python", (None, ""))
    if end is None or example.document.text[end : example.region.start].strip():
        return  # not an output block: text shown to the reader
    expected = str(example.parsed).rstrip()
    assert printed.rstrip() == expected, (
        f"{example.path}:{example.line}: the block above prints\n{printed}\nbut the page shows\n{expected}"
    )


def run_shell(stand_ins):
    def evaluate(example):
        script = substitute(str(example.parsed), stand_ins)
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}  # fmt: skip
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=os.getcwd(), env=env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        if done.returncode != 0:
            raise AssertionError(f"{example.path}:{example.line}: exit {done.returncode}\n$ {script}\n"
                                 f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")  # fmt: skip

    return evaluate


def parse_yaml(example):
    yaml.safe_load(str(example.parsed))


def parse_json(example):
    json.loads(str(example.parsed))


def page_runner(stand_ins) -> Sybil:
    python = PythonCodeBlockParser()
    python.codeblock_parser._evaluator = StandInPython(stand_ins)
    return Sybil(
        parsers=[
            python,
            CodeBlockParser("bash", run_shell(stand_ins)),
            CodeBlockParser("sh", run_shell(stand_ins)),
            CodeBlockParser("yaml", parse_yaml),
            CodeBlockParser("json", parse_json),
            CodeBlockParser("text", check_output),
            SkipParser(),
        ],
    )


@contextlib.contextmanager
def ray_lock(page: Path):
    path = os.environ.get("REWARDPLUG_RAY_LOCK")
    code = "\n".join(re.findall(r"```(?:python|bash|sh)\n(.*?)```", page.read_text(), re.S))
    if not path or not RAY_WORDS.search(code):
        yield
        return
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_code_block_of_the_page_runs(page, stand_ins, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    document = page_runner(stand_ins).parse(page)
    examples = list(document.examples())
    skipped = []
    with ray_lock(page):
        try:
            for example in examples:
                try:
                    example.evaluate()
                except unittest.SkipTest as skip:  # a block marked <!-- skip: next "reason" -->
                    skipped.append(f"{page.name}:{example.line}: {skip}")
        finally:
            with contextlib.suppress(Exception):
                import ray

                if ray.is_initialized():
                    ray.shutdown()
    for line in skipped:
        print("skipped block", line)
    assert len(skipped) < len(examples) or not examples, f"every block of {page.name} is skipped: {skipped}"


def test_every_page_has_a_code_block_or_says_why_not():
    """A guard on the runner itself: it must find the blocks of pages that have them."""
    runner = page_runner({})
    counts = {p.name: len(list(runner.parse(p).examples())) for p in PAGES}
    assert counts["README.md"] >= 2, counts


def test_docs_site_builds_strictly(tmp_path):
    """``mkdocs build --strict``: broken links, missing nav pages and API reference errors fail."""
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or "mkdocs"
    done = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").is_file()


def test_every_page_is_in_the_site_navigation():
    """A page left out of mkdocs.yml's nav builds but cannot be found from the site's menu."""

    def pages_of(nav) -> set[str]:
        if isinstance(nav, str):
            return {nav}
        items = nav.values() if isinstance(nav, dict) else nav
        return set().union(*(pages_of(item) for item in items))

    nav = pages_of(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
    on_disk = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    assert on_disk - nav == set(), f"pages missing from mkdocs.yml nav: {sorted(on_disk - nav)}"
    assert nav - on_disk == set(), f"nav entries without a page: {sorted(nav - on_disk)}"
