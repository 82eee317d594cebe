"""MkDocs hooks of the trl-hpt documentation (declared under `hooks:` in `mkdocs.yml`).

What they do, at every `mkdocs build` / `mkdocs serve`:

- build the configuration reference (`configuration.md`) from the fields of `HPTConfig` and their
  `metadata["help"]`;
- fill the generated blocks of hand-written pages: the presets table of `concepts.md` (from
  `trl_hpt.estimator.PRESETS`), the argument table of `evaluation.md` (from `trl_hpt.evaluation.EvalArguments`)
  and the API sections of `api.md` for the modules that may not be installed (`rewards`, `evaluation`,
  `callbacks`, `cli`: included only when they import);
- warn (an error under `mkdocs build --strict`) when the committed copy of a generated page or block is stale;
- leave optional pages (`benchmarks.md`) out of the navigation while they do not exist, and show a note on the
  changelog page while the root `CHANGELOG.md` does not exist;
- turn the HF-style cross references of our docstrings (`` [`Name`] ``, `` [`~module.Name`] ``), which Markdown
  leaves as literal brackets, into links to the API reference.

Generated text is also committed, so that the pages read the same in the repository (on GitHub, say) as on the site:
`docs/configuration.md` whole, and the tables of the hand-written pages between their markers
(`<!-- hpt:eval-arguments -->` ... `<!-- /hpt:eval-arguments -->`). `python docs/hooks.py` rewrites them from the
code; `python docs/hooks.py --check` lists the stale ones and exits with 1, as the tests do. A marker without its end
marker is still filled in the build, and gets its committed copy at the next `python docs/hooks.py`.
The module imports nothing from MkDocs at import time, so the tests can use its generators without it.
"""

from __future__ import annotations

import dataclasses
import html
import importlib
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


log = logging.getLogger("mkdocs.hooks.trl_hpt")

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS_DIR = REPO_ROOT / "docs"

CONFIG_PAGE = "configuration.md"
"""The page generated from `HPTConfig`, committed in `docs/` and rebuilt from the code by the build."""

GENERATED_PAGES = (CONFIG_PAGE,)
OPTIONAL_PAGES = ("benchmarks.md",)
"""Pages written by others that may not exist yet: left out of the nav (with an info message) until they do."""

OPTIONAL_API_MODULES = {
    "trl_hpt.rewards": "Reward functions",
    "trl_hpt.evaluation": "Evaluation",
    "trl_hpt.callbacks": "Callbacks",
    "trl_hpt.cli": "Command line",
}
"""Modules documented in `api.md` only when they import at build time."""

PRESETS_MARKER = "<!-- hpt:presets-table -->"
EVAL_ARGS_MARKER = "<!-- hpt:eval-arguments -->"
OPTIONAL_API_MARKER = "<!-- hpt:optional-api -->"
CHANGELOG_SNIPPET = '--8<-- "CHANGELOG.md"'

TRL_GRPO_DOCS = "https://huggingface.co/docs/trl/main/en/grpo_trainer"
TRANSFORMERS_ARGS_DOCS = "https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments"


# ----------------------------------------------------------------------------------------------------------------
# Markdown helpers
# ----------------------------------------------------------------------------------------------------------------


def _cell(text: Any) -> str:
    """Text safe inside a Markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _code(text: Any) -> str:
    """
    Code, safe inside a Markdown table cell in the build and on GitHub alike. GitHub's tables split cells on every
    unescaped pipe, code spans included, and Python-Markdown shows an escaped one in a code span as `\\|`: text
    with a pipe is written as HTML code with the pipe as an entity, which neither splits.
    """
    text = str(text)
    if "|" in text:
        return f"<code>{html.escape(text, quote=False).replace('|', '&#124;')}</code>"
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _declared_type(cls: type, field: dataclasses.Field) -> Any:
    """
    The field's annotation as written in the class that declares it. Not `field.type`: transformers'
    `HfArgumentParser` rewrites that in place (`int | None` becomes `int`) whenever it parses the dataclass, so the
    tables would depend on what ran before them in the process.
    """
    for klass in cls.__mro__:
        annotations = klass.__dict__.get("__annotations__", {})
        if field.name in annotations:
            return annotations[field.name]
    return field.type


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    return _code(f'"{value}"' if isinstance(value, str) else repr(value))


# ----------------------------------------------------------------------------------------------------------------
# Configuration reference
# ----------------------------------------------------------------------------------------------------------------


def hpt_fields() -> list[dataclasses.Field]:
    """The fields `HPTConfig` adds to TRL's `GRPOConfig`, in declaration order."""
    from trl import GRPOConfig

    from trl_hpt.config import HPTConfig

    inherited = {field.name for field in dataclasses.fields(GRPOConfig)}
    return [field for field in dataclasses.fields(HPTConfig) if field.name not in inherited]


def config_table(fields: list[dataclasses.Field] | None = None) -> str:
    """The Markdown table of HPT's own fields: name, type, default and the `help` metadata (with its choices)."""
    from trl_hpt.config import HPTConfig

    fields = hpt_fields() if fields is None else fields
    lines = ["| Field | Type | Default | Description |", "|---|---|---|---|"]
    for field in fields:
        help_text = field.metadata.get("help", "")
        if not help_text:
            raise ValueError(f"HPTConfig.{field.name} has no metadata['help']; the configuration page needs one.")
        choices = field.metadata.get("choices")
        description = _cell(help_text)
        if choices:
            description += " Choices: " + ", ".join(_code(f'"{choice}"') for choice in choices) + "."
        anchor = f'<a id="{field.name}"></a>'
        lines.append(
            f"| {anchor}`{field.name}` | {_code(_type_name(_declared_type(HPTConfig, field)))} | {_default(field)} "
            f"| {description} |"
        )
    return "\n".join(lines)


def config_markdown() -> str:
    """The whole configuration page."""
    from trl_hpt.config import HPTConfig

    names = [field.name for field in hpt_fields()]
    return f"""<!-- Generated by docs/hooks.py from trl_hpt.config.HPTConfig: edit the fields' help there, then run `python docs/hooks.py`. -->
# Configuration reference

[`HPTConfig`](api.md#trl_hpt.config.HPTConfig) is a dataclass that subclasses TRL's
[`GRPOConfig`]({TRL_GRPO_DOCS}#trl.GRPOConfig). It accepts **every `GRPOConfig` field** (generation, rewards,
`loss_type`, clipping, KL, vLLM...) and, through it, every
[`TrainingArguments`]({TRANSFORMERS_ARGS_DOCS}) field (learning rate, batch sizes, logging, saving, `push_to_hub`...),
with TRL's defaults. It adds the {len(names)} fields below. This page is generated from the fields'
`metadata["help"]` (`python docs/hooks.py` rewrites it; the documentation build and the tests check that it is up to
date).

The same names work everywhere: as keyword arguments of `HPTConfig(...)`, as keys of a YAML recipe given to
`trl-hpt train --config`, and as command-line flags of `trl-hpt train` (for example `--switch_gate 0.0`), which
override the recipe. `HPTTrainer` also accepts a plain `GRPOConfig` as `args`: it is converted with
`HPTConfig.from_grpo_config`, which gives the HPT fields their defaults.

## HPT fields

{config_table()}

## Checks at construction

`HPTConfig.__post_init__` (and `HPTConfig.from_grpo_config`) raise a `ValueError` when:

- `feedback` is not one of the choices above (a custom strategy is passed as `HPTTrainer(feedback_fn=...)`);
- `demonstration_loss` is not one of the choices above;
- `demonstration_aggregation` is not `None`, `"token_mean"` or `"loss_type"`, or `"token_mean"` with `luffy`/`srft`;
- `switch_gate` is outside `[0, 1)`;
- `demonstration_loss_coef` is negative, or `demonstration_shaping_gamma` is not positive;
- `verifier_reward_index` is negative (`HPTTrainer` also refuses an index past the last reward function);
- `max_demonstration_length` is smaller than 1;
- `demonstration_column` is `"prompt"` or empty.

Every TRL `loss_type` is accepted (`grpo`, `bnpo`, `dr_grpo`, `dapo`, `cispo`, `sapo`, `luspo`, `vespo`).
`HPTTrainer` then refuses, with an error that says what to do: a training set without the demonstration column, or
whose demonstrations are all missing (unless `feedback="rl"`); a message demonstration with non-assistant roles for
a string prompt; `demonstration_loss="luffy"`/`"srft"` with environments; and warns when several reward functions are
given without `verifier_reward_index`.

## GRPOConfig fields that matter to HPT

These are TRL's own fields, with TRL's meaning and defaults; how HPT uses them is described in
[Concepts](concepts.md).

| Field | Role in HPT |
|---|---|
| `num_generations` | Group size `G`: the rollouts per prompt whose accuracy is the prompt's `P`, and the slots one of which a demonstration takes. |
| `max_completion_length` | Default of `max_demonstration_length`; the `dr_grpo` denominator. |
| `loss_type` | Aggregation of the RL term (and of `luffy`/`srft` demonstration rows); `cispo` also selects the CISPO estimator for rollouts. |
| `epsilon`, `epsilon_high`, `delta`, `importance_sampling_level` | Clipping of the rollout estimator (`importance_sampling_level="sequence"` gives GSPO's sequence ratio). |
| `scale_rewards` | Advantage normalisation of rollouts, and of the mixed groups of `demonstration_loss="luffy"`/`"srft"`. |
| `beta` | KL coefficient; the KL term is added to rollout rows only. |
| `reward_weights` | Weights of the total reward, which is also the default verifier reward. |
| `use_vllm`, `vllm_importance_sampling_correction` | vLLM generation; the importance-sampling correction applies to rollout rows only. |
| `top_entropy_quantile`, `off_policy_mask_threshold` | Token masks applied to rollout rows only. |
| `steps_per_generation`, `gradient_accumulation_steps` | How a generation batch is split into micro-batches; enter the loss normalisation. |

For every other field see TRL's [`GRPOConfig` reference]({TRL_GRPO_DOCS}#trl.GRPOConfig). The docstring of
`{HPTConfig.__name__}` in the [API reference](api.md#trl_hpt.config.HPTConfig) summarises the HPT fields too.
"""


# ----------------------------------------------------------------------------------------------------------------
# Presets table (concepts.md)
# ----------------------------------------------------------------------------------------------------------------


def spec_loss_formula(spec) -> str:
    """The per-token loss of an `EstimatorSpec`, written from its fields as `per_token_policy_loss` computes it."""
    advantage = "1" if spec.advantage == "one" else "A"

    def times_a(term: str) -> str:
        return f"-{term}" if advantage == "1" else f"-A * {term}"

    if spec.reference == "current":
        if spec.shaping_gamma is not None:
            loss = times_a("f(p) / sg(p)") + f", f(p) = p / (p + {spec.shaping_gamma:g})"
        else:
            loss = times_a("lp")
    elif spec.reference == "one":
        loss = times_a(f"p / (p + {spec.shaping_gamma:g})" if spec.shaping_gamma is not None else "p")
    else:
        ratio = "r" if spec.reference == "rollout" else "r_seq"
        if spec.stabilization == "clip":
            unclipped = ratio if spec.delta is None else f"min({ratio}, {spec.delta:g})"
            loss = f"-min({unclipped} * A, clip({ratio}, 1 - {spec.epsilon_low:g}, 1 + {spec.epsilon_high:g}) * A)"
        elif spec.stabilization == "cispo":
            loss = f"-sg(min({ratio}, {spec.epsilon_high:g})) * A * lp"
        else:
            loss = f"-{ratio} * A"
    weight = {"p_one_minus_p": "p (1 - p)", "p": "p", "sequence_p": "exp(mean lp)"}.get(spec.token_weight)
    return loss if weight is None else f"sg({weight}) * ({loss})"


def presets_table() -> str:
    """One row per entry of `PRESETS`, with the four components and the loss, read from the specs themselves."""
    from trl_hpt.estimator import DEMONSTRATION_PRESETS, PRESETS

    lines = [
        "| preset | `reference` (pi_ref) | `stabilization` (1_stable) | `advantage` (A_hat) "
        "| shaping / token weight | `aggregation` | per-token loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, spec in PRESETS.items():
        shaping = []
        if spec.shaping_gamma is not None:
            shaping.append(f"`shaping_gamma={spec.shaping_gamma:g}`")
        if spec.token_weight != "none":
            shaping.append(f'`token_weight="{spec.token_weight}"`')
        stabilization = f'`"{spec.stabilization}"`'
        if spec.stabilization == "clip":
            stabilization += f" ({spec.epsilon_low:g}, {spec.epsilon_high:g})"
        elif spec.stabilization == "cispo":
            stabilization += f" (cap {spec.epsilon_high:g})"
        label = f"`{name}`" + (" (demonstration)" if name in DEMONSTRATION_PRESETS else "")
        lines.append(
            f'| {label} | `"{spec.reference}"` | {stabilization} | `"{spec.advantage}"` | '
            f'{", ".join(shaping) or "-"} | `"{spec.aggregation}"` | {_code(spec_loss_formula(spec))} |'
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation arguments (evaluation.md)
# ----------------------------------------------------------------------------------------------------------------


def eval_arguments_table() -> str | None:
    """The table of `trl_hpt.evaluation.EvalArguments`, or `None` when the module does not import."""
    module = _import("trl_hpt.evaluation")
    if module is None or not hasattr(module, "EvalArguments"):
        return None
    lines = ["| Flag | Type | Default | Description |", "|---|---|---|---|"]
    for field in dataclasses.fields(module.EvalArguments):
        description = _cell(field.metadata.get("help", ""))
        choices = field.metadata.get("choices")
        if choices:
            description += " Choices: " + ", ".join(_code(choice) for choice in choices) + "."
        field_type = _code(_type_name(_declared_type(module.EvalArguments, field)))
        lines.append(f"| `--{field.name}` | {field_type} | {_default(field)} | {description} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Generated blocks and pages, committed
# ----------------------------------------------------------------------------------------------------------------


def end_marker(marker: str) -> str:
    """`<!-- hpt:name -->` closes with `<!-- /hpt:name -->`."""
    return marker.replace("<!-- ", "<!-- /", 1)


def _block_re(marker: str) -> re.Pattern:
    return re.compile(re.escape(marker) + r"\n(.*?)\n" + re.escape(end_marker(marker)), re.DOTALL)


def committed_block(markdown: str, marker: str) -> str | None:
    """The text committed between `marker` and its end marker, stripped; `None` when the end marker is missing."""
    match = _block_re(marker).search(markdown)
    return match.group(1).strip() if match else None


def fill_block(markdown: str, marker: str, content: str) -> str:
    """Puts `content` between `marker` and its end marker, replacing what was there (or adding the end marker)."""
    block = f"{marker}\n\n{content.strip()}\n\n{end_marker(marker)}"
    if _block_re(marker).search(markdown):
        return _block_re(marker).sub(lambda match: block, markdown, count=1)
    return markdown.replace(marker, block, 1)


GENERATED_BLOCKS: dict[str, dict[str, Callable[[], str | None]]] = {
    "concepts.md": {PRESETS_MARKER: presets_table},
    "evaluation.md": {EVAL_ARGS_MARKER: eval_arguments_table},
}
"""Per page of `docs/`, its generated blocks: marker -> generator (a generator's `None`: nothing to generate here)."""


def render_page(name: str, markdown: str, add_missing: bool = True) -> str:
    """
    `markdown`, the page `name` of `docs/`, with its generated blocks filled from the code. `add_missing=False`
    refreshes only the blocks already committed (with their end marker) and leaves bare markers alone.
    """
    for marker, generate in GENERATED_BLOCKS.get(name, {}).items():
        if marker not in markdown or (not add_missing and committed_block(markdown, marker) is None):
            continue
        content = generate()
        if content is not None:
            markdown = fill_block(markdown, marker, content)
    return markdown


def generated_files(docs_dir: Path = DOCS_DIR, add_missing: bool = True) -> dict[Path, str]:
    """Each file of `docs/` with generated text, and what it should hold according to the code."""
    files = {docs_dir / CONFIG_PAGE: config_markdown()}
    for name in GENERATED_BLOCKS:
        path = docs_dir / name
        if path.is_file():
            files[path] = render_page(name, path.read_text(encoding="utf-8"), add_missing=add_missing)
    return files


def stale_files(docs_dir: Path = DOCS_DIR) -> list[Path]:
    """
    The files of `docs/` whose committed generated text differs from the code's: `configuration.md` (also when
    missing) and the pages whose committed blocks are out of date. A bare marker is not stale: the build fills it.
    """
    return [
        path
        for path, text in generated_files(docs_dir, add_missing=False).items()
        if not path.is_file() or path.read_text(encoding="utf-8") != text
    ]


def write_generated_files(docs_dir: Path = DOCS_DIR) -> list[Path]:
    """Writes every generated file and block of `docs/` (bare markers get their block) and returns those changed."""
    written = []
    for path, text in generated_files(docs_dir).items():
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            written.append(path)
    return written


# ----------------------------------------------------------------------------------------------------------------
# Optional API sections (api.md)
# ----------------------------------------------------------------------------------------------------------------


def _import(name: str):
    try:
        return importlib.import_module(name)
    except Exception as error:  # any import failure means "not documented in this build"
        log.info(f"{name} does not import ({type(error).__name__}: {error}); its documentation is skipped.")
        return None


def optional_api_sections() -> str:
    """`:::` blocks for the optional modules that import, each under its own heading."""
    blocks = []
    for module, title in OPTIONAL_API_MODULES.items():
        if _import(module) is not None:
            blocks.append(f"## {title}\n\n::: {module}\n")
    return "\n".join(blocks)


# ----------------------------------------------------------------------------------------------------------------
# HF-style docstring cross references
# ----------------------------------------------------------------------------------------------------------------

# `[`Name`]` as Markdown leaves it in HTML when no link definition exists.
_HF_REF_RE = re.compile(r"\[<code>(~?)([A-Za-z_][\w.]*)</code>\](?![(\[])")
# mkdocstrings' type column for HF-style parameter headers: `str`, *optional*, defaults to `"x"`.
_HF_TYPE_RE = re.compile(r"<code>(`[^<]*)</code>")
_EXTERNAL = {
    "trl.GRPOTrainer": f"{TRL_GRPO_DOCS}#trl.GRPOTrainer",
    "trl.GRPOConfig": f"{TRL_GRPO_DOCS}#trl.GRPOConfig",
}
_object_index: dict[str, list[str]] | None = None


def _build_object_index() -> dict[str, list[str]]:
    """Dotted suffixes (`Name`, `Class.method`, `module.Name`) of trl_hpt's public objects, to their full paths."""
    index: dict[str, list[str]] = {}
    try:
        import griffe

        package = griffe.load("trl_hpt", search_paths=[str(REPO_ROOT)], resolve_aliases=False)
    except Exception as error:  # without griffe the references simply stay plain code
        log.info(f"Cannot index trl_hpt for cross references ({error}).")
        return index

    def visit(obj) -> None:
        for name, member in obj.members.items():
            if member.is_alias or name.startswith("_"):
                continue
            path = member.path
            parts = path.split(".")
            for start in range(1, len(parts)):
                index.setdefault(".".join(parts[start:]), []).append(path)
            index.setdefault(path, []).append(path)
            if member.is_module or member.is_class:
                visit(member)

    visit(package)
    return index


def resolve_reference(name: str) -> str | None:
    """The full path of a trl_hpt object named as in an HF-style reference, or `None` when unknown/ambiguous."""
    global _object_index
    if _object_index is None:
        _object_index = _build_object_index()
    candidates = sorted(set(_object_index.get(name, [])))
    if len(candidates) == 1:
        return candidates[0]
    if name.startswith("trl_hpt.") and "." in name[len("trl_hpt.") :]:
        return None
    # `trl_hpt.HPTTrainer` (a lazy re-export of the package) names `trl_hpt.trainer.HPTTrainer`.
    short = name.removeprefix("trl_hpt.")
    candidates = sorted(set(_object_index.get(short, [])))
    return candidates[0] if len(candidates) == 1 else None


def _link_reference(match: re.Match) -> str:
    tilde, name = match.group(1), match.group(2)
    title = f"<code>{name.rsplit('.', 1)[-1] if tilde else name}</code>"
    if name in _EXTERNAL:
        return f'<a href="{_EXTERNAL[name]}">{title}</a>'
    path = resolve_reference(name)
    if path is None:
        return title
    # Optional: autorefs links it when the object is rendered somewhere, and leaves plain code otherwise.
    return f'<autoref identifier="{html.escape(path)}" optional>{title}</autoref>'


def link_hf_references(page_html: str) -> str:
    """Rewrites the HF-style references and parameter types that mkdocstrings rendered literally."""
    page_html = _HF_REF_RE.sub(_link_reference, page_html)
    return _HF_TYPE_RE.sub(lambda m: "<code>" + m.group(1).replace("`", "").replace("*", "") + "</code>", page_html)


# ----------------------------------------------------------------------------------------------------------------
# MkDocs events
# ----------------------------------------------------------------------------------------------------------------


def _prune_nav(nav: Any, missing: set[str]) -> Any:
    if isinstance(nav, list):
        pruned = [_prune_nav(item, missing) for item in nav]
        return [item for item in pruned if item is not None]
    if isinstance(nav, dict):
        pruned = {key: _prune_nav(value, missing) for key, value in nav.items()}
        pruned = {key: value for key, value in pruned.items() if value not in (None, [])}
        return pruned or None
    if isinstance(nav, str) and nav in missing:
        return None
    return nav


_serving = False


def on_startup(command, dirty, **kwargs):
    global _serving
    _serving = command == "serve"


def on_pre_build(config, **kwargs):
    # `mkdocs serve` rebuilds in the same process when trl_hpt changes (see `watch:`): re-import the modules the
    # generated blocks read, so that those blocks follow the code there too.
    global _object_index
    _object_index = None
    if _serving:
        for name in ("trl_hpt.estimator", "trl_hpt.config", "trl_hpt.evaluation"):
            if name in sys.modules:
                try:
                    importlib.reload(sys.modules[name])
                except Exception as error:  # keep serving; the build reports what fails to import
                    log.info(f"Could not re-import {name}: {error}")


def on_config(config, **kwargs):
    docs_dir = Path(config["docs_dir"])
    missing = {page for page in OPTIONAL_PAGES if not (docs_dir / page).is_file()}
    if missing and config.get("nav"):
        log.info(f"Optional page(s) {sorted(missing)} do not exist yet; left out of the navigation.")
        config["nav"] = _prune_nav(config["nav"], missing)
    # Snippets resolve against the repository root, whatever directory mkdocs runs from.
    snippets = config["mdx_configs"].setdefault("pymdownx.snippets", {})
    snippets["base_path"] = [str(Path(config["config_file_path"]).resolve().parent)]
    return config


_STALE_HINT = "run `python docs/hooks.py` and commit the result"


def on_files(files, config, **kwargs):
    from mkdocs.structure.files import File

    # The site always shows the page built from the code; the committed copy only has to match it.
    content = config_markdown()
    committed = files.get_file_from_path(CONFIG_PAGE)
    if committed is not None:
        if Path(committed.abs_src_path).read_text(encoding="utf-8") != content:
            log.warning(f"docs/{CONFIG_PAGE} is stale (HPTConfig changed): {_STALE_HINT}.")
        files.remove(committed)
    else:
        log.info(f"docs/{CONFIG_PAGE} does not exist; it is generated for the build ({_STALE_HINT}).")
    files.append(File.generated(config, CONFIG_PAGE, content=content))
    return files


def on_page_markdown(markdown: str, page, config, files, **kwargs):
    name = page.file.src_uri
    for marker, generate in GENERATED_BLOCKS.get(name, {}).items():
        if marker not in markdown:
            continue
        content = generate()
        if content is None:
            if committed_block(markdown, marker) is None:
                note = "The code this block is generated from does not import here."
                markdown = markdown.replace(marker, f'!!! note "Not available in this build"\n    {note}', 1)
            continue  # the committed copy stays
        committed = committed_block(markdown, marker)
        if committed is not None and committed != content.strip():
            log.warning(f"The generated block {marker} of docs/{name} is stale: {_STALE_HINT}.")
        markdown = fill_block(markdown, marker, content)
    if OPTIONAL_API_MARKER in markdown:
        markdown = markdown.replace(OPTIONAL_API_MARKER, optional_api_sections())
    if CHANGELOG_SNIPPET in markdown:
        root = Path(config["config_file_path"]).resolve().parent
        if not (root / "CHANGELOG.md").is_file():
            log.info("CHANGELOG.md does not exist yet; the changelog page shows a placeholder.")
            markdown = markdown.replace(
                CHANGELOG_SNIPPET,
                '!!! note "No changelog yet"\n    The project\'s `CHANGELOG.md` is included here once it exists.',
            )
    return markdown


def on_page_content(page_html: str, page, config, files, **kwargs):
    return link_hf_references(page_html)


def main(argv: list[str]) -> int:
    """`python docs/hooks.py` rewrites the stale generated files of `docs/`; with `--check` it only lists them."""
    import argparse

    parser = argparse.ArgumentParser(prog="python docs/hooks.py", description=main.__doc__)
    parser.add_argument("--check", action="store_true", help="list the stale files and exit with 1 if there are any")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT))
    if args.check:
        stale = stale_files()
        for path in stale:
            print(f"stale: {path.relative_to(REPO_ROOT)} ({_STALE_HINT})")
        return 1 if stale else 0
    for path in write_generated_files():
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
