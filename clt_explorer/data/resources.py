"""Class names, prompt templates and synset lists shipped with the package."""

from __future__ import annotations

from importlib.resources import files
from typing import Callable, Iterable


def read_lines(name: str) -> list[str]:
    """Non-empty lines of a packaged resource file."""
    text = files(__package__).joinpath("resources", name).read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def cifar100_classnames() -> list[str]:
    """CIFAR-100 fine labels in label order, with spaces for torchvision's underscores."""
    return [name.replace("_", " ") for name in read_lines("cifar100_classnames.txt")]


def cifar_templates() -> list[str]:
    """The 18 CLIP prompt templates for CIFAR."""
    return read_lines("cifar_templates.txt")


def imagenet100_wnids() -> list[str]:
    """The common 100-class ImageNet subset (CMC), in its label order."""
    return read_lines("imagenet100_wnids.txt")


def imagenet1k_wnids() -> list[str]:
    """The 1000 ImageNet-1k synsets in class-index order (the order of open_clip's class names)."""
    return read_lines("imagenet1k_wnids.txt")


def as_format_string(template: str | Callable[[str], str]) -> str:
    """A prompt template as a ``str.format`` string (open_clip ships some as lambdas)."""
    text = template if isinstance(template, str) else template("{}")
    if text.count("{}") != 1:
        raise ValueError(f"a template needs exactly one '{{}}' placeholder: {text!r}")
    return text


def as_format_strings(templates: Iterable[str | Callable[[str], str]]) -> list[str]:
    return [as_format_string(t) for t in templates]
