"""Evaluation inputs from paths: prompt files and data streams, shared by ``mmptm zeroshot`` and the trainer.

Paths may name parts of the demo dataset (``demo:val``, ``demo:classnames``,
``demo:templates``, see :func:`mmptm.data_pipelines.demo.resolve`).
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

from mmptm.data_pipelines.context import DataContext
from mmptm.data_pipelines.demo import resolve
from mmptm.data_pipelines.image_folder import folder_classes, image_folder
from mmptm.data_pipelines.image_text import image_text
from mmptm.data_pipelines.parallel_text import parallel_text
from mmptm.data_pipelines.streams import EpochStream
from mmptm.evaluation.common import EvaluationError
from mmptm.evaluation.zeroshot import check_templates


def load_prompt_file(path: str | Path, what: str) -> dict[str, list[str]]:
    """Class names or templates by language.

    Args:
        path: a JSON file ``{lang: [...]}`` (or a plain JSON list), or a text file with one entry per
            line (blank lines ignored); ``demo:`` names resolve.
        what: ``"classnames"`` or ``"templates"``, for messages.

    Returns:
        ``{lang: [str]}``; a list without languages is returned under ``"default"``.

    Raises:
        FileNotFoundError: no such file.
        EvaluationError: undecodable JSON, or JSON that is not a list or a mapping of lists.
    """
    path = Path(resolve(str(path)))
    if not path.is_file():
        raise FileNotFoundError(f"{what} file '{path}' not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as err:
            raise EvaluationError(f"{what} file '{path}' is not valid JSON: {err}") from None
        if isinstance(data, list):
            data = {"default": data}
        if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
            raise EvaluationError(f"{what} file '{path}': JSON must be a list or a mapping language -> list")
    else:
        data = {"default": [line.strip() for line in text.splitlines() if line.strip()]}
    return {lang: [str(x) for x in items] for lang, items in data.items()}


def load_templates(path: str | Path) -> dict[str, list[str]]:
    """:func:`load_prompt_file` for templates, each checked for its ``{}`` placeholder.

    Raises:
        EvaluationError: a template without ``{}`` (the message names the file and the template).
    """
    templates = load_prompt_file(path, "templates")
    check_templates(templates, source=f"templates file '{resolve(str(path))}'")
    return templates


def is_image_folder(data: str) -> bool:
    """Whether ``data`` is a local folder without ``*.tar`` shards (then read as an image folder)."""
    path = resolve(data)
    return os.path.isdir(path) and not glob.glob(os.path.join(glob.escape(path), "*.tar"))


def load_classnames(classnames: str | Path | None, data: str) -> dict[str, list[str]]:
    """Class names from a prompt file, or the class subfolder names of an image folder.

    Args:
        classnames: a prompt file (see :func:`load_prompt_file`), or None for an image folder's subfolder names.
        data: the evaluation data (shards or an image folder).

    Raises:
        EvaluationError: no class names for shards, or a class-name count that differs from an
            image folder's number of class subfolders.
    """
    folder = folder_classes(resolve(data)) if is_image_folder(data) else None
    if classnames is None:
        if folder is None:
            raise EvaluationError(f"'{data}' is not an image folder: class names are needed (a classnames file)")
        return {"default": folder}
    names = load_prompt_file(classnames, "classnames")
    if folder is not None:
        for lang, items in names.items():
            if len(items) != len(folder):
                where = "" if lang == "default" else f" for language '{lang}'"
                raise EvaluationError(
                    f"classnames file '{classnames}' has {len(items)} class names{where} but image folder "
                    f"'{data}' has {len(folder)} class subfolders (their sorted names are the class order)"
                )
    return names


def classification_stream(
    data: str, context: DataContext, label_key: str = "cls", batch_size: int = 256, num_workers: int = 1
) -> EpochStream:
    """The labelled image stream of ``data``.

    Args:
        data: a folder with one subfolder per class and no ``*.tar`` (read by ``image_folder``), or
            shards (read by ``image_text``) with the integer label in the ``label_key`` file.
        context: the model's image size and normalisation; ``training=False`` for evaluation.
        label_key / batch_size / num_workers: the dataset options.
    """
    if is_image_folder(data):
        return image_folder(context, resolve(data), batch_size=batch_size, num_workers=num_workers)
    return image_text(context, data, batch_size=batch_size, num_workers=num_workers, label_key=label_key)


def retrieval_stream(
    data: str, context: DataContext, languages: list[str] | None = None, batch_size: int = 256, num_workers: int = 1
) -> EpochStream:
    """The ``image_text`` stream of ``data`` with every caption of each image (in ``languages``; None: all)."""
    return image_text(
        context,
        data,
        batch_size=batch_size,
        num_workers=num_workers,
        caption_languages=languages,
        all_captions=True,
    )


def parallel_stream(data: str, context: DataContext, batch_size: int = 256, num_workers: int = 1) -> EpochStream:
    """The ``parallel_text`` stream of the sentence-pair shards ``data``."""
    return parallel_text(context, data, batch_size=batch_size, num_workers=num_workers)
