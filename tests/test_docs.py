"""The documentation: the generated pages cover the code, the nav points at real pages, and the site builds."""

import dataclasses
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _load_hooks():
    spec = importlib.util.spec_from_file_location("trl_hpt_docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def hooks():
    return _load_hooks()


def _nav_pages(nav):
    if isinstance(nav, str):
        yield nav
    elif isinstance(nav, list):
        for item in nav:
            yield from _nav_pages(item)
    elif isinstance(nav, dict):
        for value in nav.values():
            yield from _nav_pages(value)


def _mkdocs_config():
    import yaml

    return yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))


def _normalised(text):
    return " ".join(text.split())


def test_configuration_page_lists_every_hpt_field_with_its_help(hooks):
    from trl import GRPOConfig

    from trl_hpt.config import HPTConfig

    inherited = {field.name for field in dataclasses.fields(GRPOConfig)}
    own = [field for field in dataclasses.fields(HPTConfig) if field.name not in inherited]
    assert [field.name for field in hooks.hpt_fields()] == [field.name for field in own]
    # The fields HPT adds to GRPOConfig, so they must all be on the page.
    for name in (
        "demonstration_column",
        "feedback",
        "switch_gate",
        "success_threshold",
        "verifier_reward_index",
        "demonstration_loss_coef",
        "demonstration_loss",
        "demonstration_shaping_gamma",
        "max_demonstration_length",
    ):
        assert name in {field.name for field in own}

    page = _normalised(hooks.config_markdown())
    table_rows = [line for line in hooks.config_table().splitlines() if line.startswith("| <a id=")]
    assert len(table_rows) == len(own), "one table row per HPT field"
    for field, row in zip(own, table_rows):
        assert f"`{field.name}`" in row
        help_text = field.metadata.get("help")
        assert help_text, f"HPTConfig.{field.name} needs metadata['help'] for the configuration page"
        assert _normalised(help_text).replace("|", "\\|") in _normalised(row), field.name
        for choice in field.metadata.get("choices") or ():
            assert f'`"{choice}"`' in row, (field.name, choice)
    # The inherited fields are covered by a link to TRL's reference rather than listed.
    assert "GRPOConfig" in page and "huggingface.co/docs/trl" in page
    assert '| <a id="learning_rate">' not in page


def test_presets_table_is_generated_from_every_preset(hooks):
    from trl_hpt.estimator import DEMONSTRATION_PRESETS, PRESETS

    table = hooks.presets_table()
    rows = table.splitlines()[2:]
    assert len(rows) == len(PRESETS)
    for (name, spec), row in zip(PRESETS.items(), rows):
        assert row.startswith(f"| `{name}`")
        assert f'`"{spec.reference}"`' in row and f'`"{spec.advantage}"`' in row and f'`"{spec.aggregation}"`' in row
        assert ("(demonstration)" in row) == (name in DEMONSTRATION_PRESETS)
    assert hooks.spec_loss_formula(PRESETS["sft"]) == "-lp"
    assert hooks.spec_loss_formula(PRESETS["srft"]) == "-A * p"
    assert hooks.spec_loss_formula(PRESETS["luffy"]) == "-A * p / (p + 0.1)"
    assert hooks.spec_loss_formula(PRESETS["chord_phi"]) == "sg(p (1 - p)) * (-lp)"
    assert hooks.spec_loss_formula(PRESETS["cispo"]) == "-sg(min(r, 5)) * A * lp"
    assert "r_seq" in hooks.spec_loss_formula(PRESETS["gspo"])
    # The pages that carry generated blocks still have their markers.
    assert hooks.PRESETS_MARKER in (DOCS / "concepts.md").read_text(encoding="utf-8")
    assert hooks.OPTIONAL_API_MARKER in (DOCS / "api.md").read_text(encoding="utf-8")
    assert hooks.CHANGELOG_SNIPPET in (DOCS / "changelog.md").read_text(encoding="utf-8")


def test_every_nav_page_exists(hooks):
    config = _mkdocs_config()
    pages = list(_nav_pages(config["nav"]))
    assert "index.md" in pages and hooks.CONFIG_PAGE in pages and "scaling.md" in pages
    for page in pages:
        if page in hooks.GENERATED_PAGES:
            # Committed, so that links to it work in the repository too; kept fresh by the test below.
            assert (DOCS / page).is_file(), f"docs/{page} is missing: run `python docs/hooks.py`"
        elif page in hooks.OPTIONAL_PAGES:
            continue  # provided by other files; the hook leaves it out of the nav while it does not exist
        else:
            assert (DOCS / page).is_file(), f"mkdocs.yml's nav names docs/{page}, which does not exist"
    for hook in config.get("hooks", []):
        assert (ROOT / hook).is_file()


def test_generated_pages_and_blocks_are_committed_and_up_to_date(hooks):
    from trl_hpt import cli

    # transformers' argument parser rewrites the dataclasses' field types in place (`int | None` -> `int`): the
    # generated text must not depend on whether a command was parsed earlier in the process.
    cli.make_parser("eval").parse_args_and_config(["--model_name_or_path", "m"])
    cli.make_parser("train").parse_args_and_config(["--output_dir", "unused", "--use_cpu", "true", "--bf16", "false"])
    # Fails when HPTConfig or EvalArguments changed without `python docs/hooks.py` being run.
    stale = [str(path.relative_to(ROOT)) for path in hooks.stale_files()]
    assert stale == [], f"stale generated docs {stale}: run `python docs/hooks.py` and commit the result"
    assert hooks.main(["--check"]) == 0
    assert (DOCS / hooks.CONFIG_PAGE).read_text(encoding="utf-8") == hooks.config_markdown()
    # The arguments table is in the file itself, so that the page reads on GitHub as on the site.
    evaluation = (DOCS / "evaluation.md").read_text(encoding="utf-8")
    assert hooks.committed_block(evaluation, hooks.EVAL_ARGS_MARKER) == hooks.eval_arguments_table()
    assert "`--max_new_tokens`" in hooks.eval_arguments_table()


def _copy_docs(tmp_path, hooks):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in (hooks.CONFIG_PAGE, *hooks.GENERATED_BLOCKS):
        (docs / name).write_text((DOCS / name).read_text(encoding="utf-8"), encoding="utf-8")
    return docs


def test_a_stale_generated_section_is_found_and_rewritten(hooks, tmp_path):
    docs = _copy_docs(tmp_path, hooks)
    table = hooks.eval_arguments_table()
    evaluation = (docs / "evaluation.md").read_text(encoding="utf-8")
    # An argument added in the code but not in the committed table, and a hand edit of the configuration page.
    stale_table = "\n".join(line for line in table.splitlines() if "--disable_tqdm" not in line)
    (docs / "evaluation.md").write_text(evaluation.replace(table, stale_table), encoding="utf-8")
    (docs / hooks.CONFIG_PAGE).write_text(hooks.config_markdown().replace("switch_gate", "gate"), encoding="utf-8")
    # A page whose marker has no end marker yet: the build fills it, so it is not stale, and a write commits it.
    (docs / "concepts.md").write_text(f"# Concepts\n\n{hooks.PRESETS_MARKER}\n\nAfter.\n", encoding="utf-8")
    assert sorted(path.name for path in hooks.stale_files(docs)) == [hooks.CONFIG_PAGE, "evaluation.md"]

    written = hooks.write_generated_files(docs)
    assert sorted(path.name for path in written) == sorted([hooks.CONFIG_PAGE, "concepts.md", "evaluation.md"])
    assert hooks.stale_files(docs) == []
    rewritten = (docs / "evaluation.md").read_text(encoding="utf-8")
    assert rewritten == evaluation  # back to the committed page, hand-written text untouched
    concepts = (docs / "concepts.md").read_text(encoding="utf-8")
    assert hooks.committed_block(concepts, hooks.PRESETS_MARKER) == hooks.presets_table()
    assert concepts.startswith("# Concepts\n\n") and concepts.endswith("\n\nAfter.\n")
    assert hooks.write_generated_files(docs) == []  # nothing left to write


def test_the_build_warns_about_a_stale_block_and_shows_the_fresh_one(hooks, caplog):
    from types import SimpleNamespace

    table = hooks.eval_arguments_table()
    stale = hooks.fill_block(f"# Evaluation\n\n{hooks.EVAL_ARGS_MARKER}\n", hooks.EVAL_ARGS_MARKER, "| old |")
    page = SimpleNamespace(file=SimpleNamespace(src_uri="evaluation.md"))
    with caplog.at_level("WARNING", logger="mkdocs.hooks.trl_hpt"):
        built = hooks.on_page_markdown(stale, page=page, config={}, files=None)
    assert table in built and "| old |" not in built
    assert any("stale" in record.getMessage() and "docs/hooks.py" in record.getMessage() for record in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="mkdocs.hooks.trl_hpt"):
        assert hooks.on_page_markdown(built, page=page, config={}, files=None) == built
    assert not caplog.records


def _gfm_cells(row):
    """The cells of a table row as GitHub splits them: on every pipe not escaped by a backslash, code spans too."""
    return re.split(r"(?<!\\)\|", row.strip().strip("|"))


def test_generated_tables_keep_their_columns_on_github(hooks):
    for table in (hooks.config_table(), hooks.eval_arguments_table(), hooks.presets_table()):
        rows = table.splitlines()
        widths = {len(_gfm_cells(row)) for row in rows}
        assert widths == {len(_gfm_cells(rows[0]))}, [row for row in rows if len(_gfm_cells(row)) not in widths]
    assert "<code>int &#124; None</code>" in hooks.eval_arguments_table()


def test_readme_links_point_to_files_in_the_repository():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = [t for t in re.findall(r"\]\(([^)\s]+)\)", readme) if not re.match(r"[a-z]+:|#", t)]
    assert "docs/configuration.md" in targets
    missing = [t for t in targets if not (ROOT / t.split("#")[0]).exists()]
    assert missing == [], f"README.md links to files that do not exist: {missing}"


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "configuration" / "index.html").is_file()
