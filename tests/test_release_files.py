"""The release's files agree with the package: CITATION.cff, CHANGELOG.md, py.typed in the package data."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

import openaff

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_citation_names_the_paper_and_this_version() -> None:
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["version"] == PROJECT["version"] == openaff.__version__
    assert cff["license"] == PROJECT["license"]
    paper = cff["preferred-citation"]
    assert paper["title"] == "Attentional Feature Fusion" and paper["year"] == 2021
    assert [a["family-names"] for a in paper["authors"]] == ["Dai", "Gieseke", "Oehmcke", "Wu", "Barnard"]
    assert "arXiv:2009.14082" in [i["value"] for i in paper["identifiers"]]


def test_changelog_has_this_version() -> None:
    assert f"\n## [{PROJECT['version']}]\n" in (ROOT / "CHANGELOG.md").read_text()


def test_py_typed_ships_with_the_package() -> None:
    assert (Path(openaff.__file__).parent / "py.typed").is_file()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["openaff"]
