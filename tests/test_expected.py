"""results/expected/<paper>.yaml: one row per experiment config, numbers equal to TABLES.yaml's."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dyconv_repro.config_dir import config_dir
from dyconv_repro.results.expected import NUMBERS, PAPERS, expected_dir, load_expected, tables_yaml, widenings

EXP_DIR = Path(config_dir()) / "experiment"
ALT_FIELD = {"top1_alt": "top1_arxiv_v1"}
KINDS = {"main", "baseline", "ablation", "reference"}


@pytest.fixture(scope="module")
def docs():
    return {p: load_expected(p) for p in PAPERS}


def test_every_paper_has_an_expected_file():
    assert sorted(p.stem for p in expected_dir().glob("*.yaml")) == sorted(PAPERS)


@pytest.mark.parametrize("paper", PAPERS)
def test_rows_and_experiment_files_match_one_to_one(paper, docs):
    ids = [r["id"] for r in docs[paper]["rows"]]
    files = sorted(f"{paper}/{p.stem}" for p in (EXP_DIR / paper).glob("*.yaml"))
    assert sorted(ids) == files, (f"rows without a config: {sorted(set(ids) - set(files))}; "
                                  f"configs without a row: {sorted(set(files) - set(ids))}")


@pytest.mark.parametrize("paper", PAPERS)
def test_rows_are_complete_and_consistent_with_their_config(paper, docs):
    rows = {r["id"]: r for r in docs[paper]["rows"]}
    for rid, r in rows.items():
        for key in ("table", "label", "backbone", "op", "source", "conf", "tolerance", "kind", "recipe", "epochs"):
            assert r.get(key) is not None, f"{rid}: no {key}"
        assert r["kind"] in KINDS, rid
        text = (EXP_DIR / f"{rid}.yaml").read_text()
        cfg = yaml.safe_load(text)
        assert text.startswith("# @package _global_\n# paper:"), rid
        defaults = {k.split("/")[-1]: v for d in cfg["defaults"] for k, v in d.items()}
        assert defaults["model"] == r["backbone"] and defaults["op"] == r["op"], rid
        assert defaults["recipe"] == r["recipe"] and defaults["data"] == r["data"], rid
        assert cfg["run_name"] == rid
        recipe = yaml.safe_load((Path(config_dir()) / "recipe" / f"{r['recipe']}.yaml").read_text())
        assert r["epochs"] == recipe["epochs"], rid
        for ref_key in ("baseline", "stage1"):  # sibling baseline / stage-1 rows exist, on the same data
            if r.get(ref_key):
                assert r[ref_key] in rows, f"{rid}: {ref_key} {r[ref_key]} is not a row"
                assert rows[r[ref_key]]["data"] == r["data"], rid
        if r["kind"] in ("main", "ablation"):
            assert r.get("baseline"), f"{rid}: a {r['kind']} row needs a sibling baseline"
        if r["top1"] is None and r["params_m"] is None and r["madds_m"] is None:
            assert r["notes"], f"{rid}: no published number and no note saying why"


def _tables_node(tables: dict, ref: dict):
    table = tables["papers"][ref["paper"]]["tables"][ref["table"]]
    return table["rows"][ref["row"]] if isinstance(ref["row"], int) else table[ref["row"]]


@pytest.mark.parametrize("paper", PAPERS)
def test_numbers_equal_tables_yaml(paper, docs):
    path = tables_yaml()
    if not path.is_file():
        pytest.skip(f"{path} not present (shared/ beside the checkout)")
    tables = yaml.safe_load(path.read_text())
    checked = 0
    for r in docs[paper]["rows"]:
        derived = set(r.get("derived") or [])
        ref = r.get("tables_ref")
        if ref is None and r.get("readme_ref"):  # numbers from an official README that TABLES.yaml lacks
            continue  # (test_readme_sourced_rows_name_their_source checks those)
        if ref is None:  # a row without a source row publishes nothing
            assert all(r[k] is None for k in NUMBERS if k not in derived), r["id"]
            continue
        node = _tables_node(tables, ref)
        fields = ref.get("fields") or {}
        for k in NUMBERS:
            src = fields.get(k, ALT_FIELD.get(k, k))
            published = node.get(src)
            if k in derived:
                assert published is None, f"{r['id']}: {k} is marked derived but the source row has it"
                if k == "top1":
                    assert r["top1"] == pytest.approx(100 - node["top1_err"], abs=1e-9), r["id"]
                continue
            assert r[k] == published, f"{r['id']}: {k} = {r[k]!r}, TABLES.yaml says {published!r}"
            checked += published is not None
        srcs = node.get("src") or []
        assert r["source"] == ", ".join(srcs), r["id"]
    from_tables = any(r.get("tables_ref") for r in docs[paper]["rows"])
    if paper not in ("structured", "refconv") and from_tables:  # those papers' tables were not found
        assert checked > 0


README_REF_KEYS = ("repo", "path", "commit", "table", "row")


@pytest.mark.parametrize("paper", PAPERS)
def test_readme_sourced_rows_name_their_source(paper, docs):
    """Rows whose numbers come from an official README (papers after the seven: ODConv, DCD) say which
    repository, file, commit, table and row; their `source` names the repository and commit."""
    for r in docs[paper]["rows"]:
        ref = r.get("readme_ref")
        if ref is None:
            continue
        assert r.get("tables_ref") is None, f"{r['id']}: a row cites TABLES.yaml or a README, not both"
        assert all(ref.get(k) for k in README_REF_KEYS), f"{r['id']}: readme_ref needs {README_REF_KEYS}"
        assert len(str(ref["commit"])) == 40, r["id"]
        assert ref["repo"] in r["source"] and str(ref["commit"])[:7] in r["source"], r["id"]


@pytest.mark.parametrize("paper", PAPERS)
def test_provenance_follows_the_source_and_widenings_carry_a_reason(paper, docs):
    """provenance: digitized (conf), inferred (a derived count), project-defined (nothing published), else
    published; a tolerance wider than 2 % params / 3 % MAdds needs `tolerance.reason` (load_expected refuses
    one without), and a row is either widened or a known `mismatch`, not both."""
    for r in docs[paper]["rows"]:
        published = [k for k in NUMBERS if r.get(k) is not None]
        want = ("digitized" if r["conf"] == "digitized" else
                "inferred" if {"params_m", "madds_m"} & set(r.get("derived") or []) else
                "published" if published else "project-defined")
        assert r["provenance"] == want, r["id"]
        if widenings(r):
            assert r["tolerance"]["reason"].strip() and not r.get("mismatch"), r["id"]
