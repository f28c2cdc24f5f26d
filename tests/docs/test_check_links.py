"""The link check of README.md and the book (scripts/check_links.py)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("check_links", ROOT / "scripts" / "check_links.py")
check_links = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_links)


def problems(path: Path) -> list[str]:
    found, _ = check_links.check(path, {})
    return found


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_the_repository_has_no_broken_link():
    assert check_links.main([]) == 0


@pytest.mark.parametrize(
    "heading, anchor",
    [
        ("## Envoy `ext_authz`, HTTP service (not tested)", "envoy-ext_authz-http-service-not-tested"),
        ("## Redis: one server, Sentinel or Cluster", "redis-one-server-sentinel-or-cluster"),
        ("### Cross-site requests (CSRF)", "cross-site-requests-csrf"),
        ("# Who may create TokenPolicies", "who-may-create-tokenpolicies"),
    ],
)
def test_anchors_are_the_ones_mdbook_and_github_write(tmp_path, heading, anchor):
    page = write(tmp_path, "a.md", f"{heading}\n\n[here](#{anchor})\n")
    assert problems(page) == []


def test_a_missing_file_fails(tmp_path):
    page = write(tmp_path, "a.md", "# A\n\nSee [b](b.md) and ![shot](shot.png).\n")
    found = problems(page)
    assert len(found) == 2, found
    assert "missing file: b.md" in found[0]
    assert "missing file: shot.png" in found[1]


def test_a_missing_anchor_fails_in_this_file_and_in_another(tmp_path):
    write(tmp_path, "b.md", "# B\n\n## Present\n")
    page = write(tmp_path, "a.md", "# A\n\n[1](#absent) [2](b.md#present) [3](b.md#gone)\n")
    found = problems(page)
    assert len(found) == 2, found
    assert "#absent" in found[0] and "a.md" in found[0]
    assert "#gone" in found[1] and "b.md" in found[1]


def test_repeated_headings_get_numbered_anchors(tmp_path):
    page = write(tmp_path, "a.md", "# A\n\n## Notes\n\n## Notes\n\n[1](#notes) [2](#notes-1) [3](#notes-2)\n")
    found = problems(page)
    assert len(found) == 1 and "#notes-2" in found[0], found


def test_code_is_neither_a_link_nor_a_heading(tmp_path):
    page = write(
        tmp_path,
        "a.md",
        "# A\n\n`[not a link](gone.md)`\n\n```sh\n# not a heading\n[nor a link](gone.md)\n```\n\n[x](#not-a-heading)\n",
    )
    found = problems(page)
    assert len(found) == 1 and "#not-a-heading" in found[0], found


def test_urls_are_not_checked(tmp_path):
    page = write(tmp_path, "a.md", "# A\n\n[x](https://example.com/gone#nothing) [y](mailto:a@example.com)\n")
    assert problems(page) == []


def test_an_include_of_a_missing_file_fails_and_an_escaped_one_is_text(tmp_path):
    write(tmp_path, "there.yaml", "a: 1\n")
    page = write(
        tmp_path,
        "a.md",
        "# A\n\n```yaml\n{{#include there.yaml}}\n{{#include gone.yaml}}\n```\n\n`\\{{#include also-gone.yaml}}`\n",
    )
    found = problems(page)
    assert len(found) == 1 and "gone.yaml" in found[0], found


def test_main_exits_non_zero_on_a_broken_link(tmp_path, capsys):
    page = write(tmp_path, "a.md", "# A\n\n[b](b.md)\n")
    assert check_links.main([str(page)]) == 1
    assert "missing file: b.md" in capsys.readouterr().out


def test_a_chapter_linking_out_of_the_book_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(check_links, "BOOK_SRC", (tmp_path / "src").resolve())
    write(tmp_path, "examples/x.yaml", "a: 1\n")
    write(tmp_path, "src/b.md", "# B\n")
    page = write(tmp_path, "src/a.md", "# A\n\n[in](b.md) [out](../examples/x.yaml)\n")
    found = problems(page)
    assert len(found) == 1 and "leaves docs/src" in found[0], found
