"""The words around the code: README.md stays short, every relative link in it, CONTRIBUTING.md and docs/ leads
somewhere, and every command they show parses with the command line of today."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest

from bench.cli import build_parser
from bench.spec import resolve_spec_path
from exporters.predict import build_parser as predict_parser

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def anchors(page: Path) -> set[str]:
    """The anchors a code host gives the page's headings: lower case, punctuation dropped, spaces to hyphens,
    a repeated one numbered."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        if m := re.match(r"#{1,6} (.+)", line):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_readme_is_at_most_150_lines():
    assert len(README.read_text().splitlines()) <= 150


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_leads_to_a_file_and_heading(page):
    bad = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO)}")
    assert not bad, bad


def test_anchors_follow_the_code_host_s_rule(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(
        "# Checks, errors and exit statuses\n## Your own data: `image_folder`\n## Keys\n## Keys\n"
        "```bash\n# not a heading\n```\n"
    )
    assert anchors(page) == {"checks-errors-and-exit-statuses", "your-own-data-image_folder", "keys", "keys-1"}


def test_readme_links_every_docs_page_and_the_results():
    links = set(LINK.findall(README.read_text()))
    assert {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")} <= links
    assert {"results/summary.md", "CONTRIBUTING.md"} <= links


def test_readme_gives_the_set_up_and_the_design_card_s_commands():
    text = README.read_text()
    for command in (
        "./bootstrap.sh quick",
        "./bootstrap.sh test",
        "python -m bench run ablations/warwick.yaml",
        "python -m bench tune mnist",
        "python -m exporters.onnx best",
        "python -m bench summary",
    ):
        assert re.search(rf"^{re.escape(command)}\s", text, re.M), command


def test_readme_s_torch_pins_are_pyproject_s():
    pins = {
        d
        for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
        if d.startswith(("torch>", "torchvision>"))
    }
    shown = set(re.findall(r"'(torch(?:vision)?>[^']+)'", README.read_text()))
    assert shown == pins


def shown_commands(prefixes: tuple[str, ...]) -> list[tuple[str, list[str]]]:
    """(page, argv after the prefix) of every command line in the pages' bash blocks that starts with a prefix
    (after a ``host$`` prompt); comments and line continuations are dropped."""
    out = []
    for page in PAGES:
        for lang, body in FENCE.findall(page.read_text()):
            if lang != "bash":
                continue
            for line in body.replace("\\\n", " ").splitlines():
                line = re.sub(r"^\S+\$ ", "", line.split(" #")[0].strip())
                line = re.sub(r"^(srun )?\.venv/bin/", "", line)
                for prefix in prefixes:
                    if line.startswith(prefix + " "):
                        out.append((page.name, shlex.split(line[len(prefix) :])))
    return out


BENCH = shown_commands(("python -m bench", "bench"))


@pytest.mark.parametrize("page, argv", BENCH, ids=[" ".join(a) for _, a in BENCH])
def test_every_bench_command_shown_parses(page, argv, monkeypatch):
    monkeypatch.chdir(REPO)
    if argv[0] == "predict":
        predict_parser().parse_args(argv[1:])
        return
    args = build_parser().parse_args(argv)  # exits (status 2) on an option that is not there
    if getattr(args, "spec", None) and not args.spec.startswith(("my_", "/")):
        spec = resolve_spec_path(args.spec)
        assert spec.is_file(), f"{page}: {spec}"
        if args.profile:
            assert re.search(rf"^  {re.escape(args.profile)}:", spec.read_text(), re.M), f"{page}: {args.profile}"


def test_every_exporters_option_shown_exists(capsys):
    from exporters.onnx import main as onnx_main

    shown = shown_commands(("python -m exporters.onnx",))
    assert shown
    with pytest.raises(SystemExit):
        onnx_main(["--help"])
    help_text = capsys.readouterr().out
    flags = {a for _, argv in shown for a in argv if a.startswith("--")}
    assert {f for f in flags if f not in help_text} == set()
    targets = {argv[0] for _, argv in shown}
    assert {t for t in targets if t not in ("best", "rungs") and not t.startswith("results/runs/")} == set()
