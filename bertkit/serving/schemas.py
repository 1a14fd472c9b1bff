"""Request bodies (TEI's and OpenAI's shapes), validated with pydantic; every error names its field."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

_JSON_TYPES = {str: "a string", int: "a number", float: "a number", bool: "a boolean", list: "a list",
               dict: "an object", type(None): "null"}


def _kind(value) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _texts(value):
    # A string or a non-empty list of strings; one string becomes a list of one.
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ValueError(f"expected a string or a list of strings, got {_kind(value)}")
    if not value:
        raise ValueError("must not be empty")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ValueError(f"item {i} is {_kind(item)}, expected a string")
    return value


def _string_list(value):
    if not isinstance(value, list):
        raise ValueError(f"expected a list of strings, got {_kind(value)}")
    return _texts(value)


def _predict_inputs(value):
    # TEI: "text", ["text", "pair"] (one pair), or a batch of ["text"] / ["text", "pair"] / "text".
    def one(item, where):
        if isinstance(item, str):
            return (item, None)
        if isinstance(item, list) and len(item) in (1, 2) and all(isinstance(s, str) for s in item):
            return (item[0], item[1] if len(item) == 2 else None)
        raise ValueError(f"{where} must be a string, [text] or [text, text_pair], got {_kind(item)}"
                         + (f" of length {len(item)}" if isinstance(item, list) else ""))

    if isinstance(value, str):
        return {"single": True, "rows": [(value, None)]}
    if isinstance(value, list) and value and all(isinstance(s, str) for s in value) and len(value) <= 2:
        return {"single": True, "rows": [(value[0], value[1] if len(value) == 2 else None)]}
    if not isinstance(value, list) or not value:
        raise ValueError("expected a string, a pair [text, text_pair] or a non-empty list of them, got "
                         + ("an empty list" if isinstance(value, list) else _kind(value)))
    return {"single": False, "rows": [one(item, f"item {i}") for i, item in enumerate(value)]}


Texts = Annotated[list[str], BeforeValidator(_texts)]
StringList = Annotated[list[str], BeforeValidator(_string_list)]
PredictInputs = Annotated[dict, BeforeValidator(_predict_inputs)]
PositiveInt = Annotated[int, Field(gt=0, strict=True)]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True)
    model: str | None = None         # which --model serves the request (default: the first of its task)


class EmbedRequest(_Body):
    inputs: Texts
    normalize: bool | None = None    # None: the model's own default (sentence-transformers' Normalize module)
    truncate: bool | None = None     # None: the server's --auto-truncate
    dimensions: PositiveInt | None = None
    prompt_name: None = None         # accepted for TEI compatibility; prompts are not supported


class OpenAIEmbeddingRequest(_Body):
    input: Texts
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: PositiveInt | None = None
    user: str | None = None


class TokenizeRequest(_Body):
    inputs: Texts
    add_special_tokens: bool = True


class RerankRequest(_Body):
    query: str
    texts: StringList
    raw_scores: bool = False
    return_text: bool = False
    top_n: PositiveInt | None = None
    truncate: bool | None = None


class PredictRequest(_Body):
    inputs: PredictInputs
    raw_scores: bool = False
    truncate: bool | None = None


def describe(error: ValidationError) -> str:
    """The first problem as ``field: message`` (``texts.2: ...`` for list items)."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        message = "required field is missing"
    elif first["type"] == "extra_forbidden":
        message = "unknown field"
    return f"{where}: {message}"
