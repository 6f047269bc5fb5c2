"""Task kinds: what a labeling config shows and how its answers map back to per-image votes.

A kind bundles the config file, the task data built from one request, and the parser of an annotation's
`result` list. provision/push/pull only talk to kinds, so the boxes stage adds draw/quality/coverage
kinds without touching them.

    >>> VERIFY.parse([{"from_name": "answer", "type": "choices", "value": {"choices": ["yes"]}}], {})
    [(None, 'yes')]
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class BadAnnotation(ValueError):
    """An annotation whose result does not have the shape the kind expects (it is quarantined)."""


def load_config(name: str) -> str:
    path = CONFIG_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"labeling config {path} does not exist; known: {sorted(p.name for p in CONFIG_DIR.glob('*.xml'))}")
    return path.read_text()


@dataclass(frozen=True)
class TaskKind:
    """name: the `kind` column; config: file in crowd/configs; build: request row + context -> task data;
    parse: (result, task data) -> [(image_id or None for the task's own image, answer)]."""

    name: str
    config_file: str
    build: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]
    parse: Callable[[list[dict[str, Any]], dict[str, Any]], list[tuple[str | None, str]]]
    answers: tuple[str, ...] = ("yes", "no")
    description: str = ""
    # answer -> the `result` list a person's click produces (simulated annotators submit it)
    render: Callable[[str, dict[str, Any]], list[dict[str, Any]]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label_config(self) -> str:
        return load_config(self.config_file)


def choices_answer(result: list[dict[str, Any]], from_name: str, allowed: tuple[str, ...]) -> str:
    """The single choice of control `from_name`; BadAnnotation for anything else."""
    if not isinstance(result, list):
        raise BadAnnotation(f"result is {type(result).__name__}, expected a list")
    picked = [r for r in result if isinstance(r, dict) and r.get("from_name") == from_name]
    if not picked:
        raise BadAnnotation(f"no '{from_name}' choice in the result")
    if len(picked) > 1:
        raise BadAnnotation(f"{len(picked)} '{from_name}' results, expected one")
    value = picked[0].get("value")
    choices = value.get("choices") if isinstance(value, dict) else None
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], str):
        raise BadAnnotation(f"'{from_name}' choices {choices!r}: expected exactly one")
    answer = choices[0].strip().lower()
    if answer not in allowed:
        raise BadAnnotation(f"answer {choices[0]!r} is not one of {list(allowed)}")
    return answer


def _examples_html(urls: list[str]) -> str:
    imgs = "".join(
        f'<img src="{html.escape(u, quote=True)}" style="height:96px;margin:2px" alt="accepted example"/>' for u in urls
    )
    return f"<div>{imgs}</div>" if imgs else "<div><i>none yet</i></div>"


def _verify_build(req: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    syn = ctx["synsets"].get(req["wnid"])
    if syn is None:
        raise KeyError(req["wnid"])
    return {
        "image": ctx["image_url"](req["image_id"]),
        "lemmas": ", ".join(syn["lemmas"]),
        "gloss": syn["gloss"],
        "examples_html": _examples_html(ctx.get("examples", {}).get(req["wnid"], [])),
    }


def _verify_parse(result: list[dict[str, Any]], data: dict[str, Any]) -> list[tuple[str | None, str]]:
    return [(None, choices_answer(result, "answer", ("yes", "no")))]


def choices_result(answer: str, from_name: str = "answer", to_name: str = "image") -> list[dict[str, Any]]:
    return [{"from_name": from_name, "to_name": to_name, "type": "choices", "value": {"choices": [answer]}}]


VERIFY = TaskKind(
    name="verify", config_file="verify.xml", build=_verify_build, parse=_verify_parse,
    render=lambda answer, data: choices_result(answer),
    description="one image: does it show the synset? yes / no",
)

KINDS: dict[str, TaskKind] = {VERIFY.name: VERIFY}


def register_kind(kind: TaskKind) -> TaskKind:
    """Add a kind (the boxes stage registers draw/quality/coverage)."""
    KINDS[kind.name] = kind
    return kind
