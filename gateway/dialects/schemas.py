"""Public wire models of every dialect (OpenAI, Ollama, Jina's and vLLM's rerank, score and
tokenize, Cohere's rerank): what clients send and what they parse.

Requests are tolerant (unknown fields ignored) but strict about types: a value of the wrong
JSON type, a missing one or an invalid one is a 400 naming its field (``code`` says which:
``invalid_type``, ``missing_field``, ``invalid_value``), as OpenAI and Ollama answer. Response
models describe the answers for /openapi.json and for tests; handlers render answers with orjson.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError

from gateway.errors import InvalidRequest, PayloadTooLarge, WrongType

_TYPE_ERRORS = {"string_type", "int_type", "float_type", "bool_type", "list_type", "dict_type", "model_type"}


class _Request(BaseModel):
    # strict: "5" is not a number of dimensions; extra="ignore": clients send more than we read.
    model_config = ConfigDict(extra="ignore", strict=True)


Priority = int | str | None  # a class's name is checked with the key (tenancy/calls.py)
PRIORITY = Field(
    default=None,
    description="vLLM's field: lower runs first (below 0 interactive, 0 default, above 0 batch), or a class's name; "
    "within what the API key allows",
)


class EmbeddingsRequest(_Request):
    """OpenAI ``POST /v1/embeddings``; also what the Aleph Alpha client sends to ``/embeddings``."""

    model: str = Field(min_length=1)
    input: Any = Field(description="a string, an array of strings, an array of token ids, or an array of arrays of token ids")
    encoding_format: Literal["float", "base64"] = "float"
    output_dtype: Literal["float", "int8", "uint8", "binary", "ubinary"] = Field(
        default="float",
        description="Voyage's and Mistral's field: int8/uint8 (a byte a dimension) or binary/ubinary (a bit, packed), "
        "answered as lists of integers whatever the encoding_format",
    )
    dimensions: int | None = Field(
        default=None, gt=0, description="a size the model supports; the vector is cut and re-normalised"
    )
    user: str | None = None
    truncate: bool | None = Field(
        default=None, description="embedq extension: cut over-long inputs instead of a 400; default per model"
    )
    tags: list[str] | None = Field(
        default=None, description="Aleph Alpha: only workers carrying all these tags serve the request"
    )
    hosting: str | None = Field(default=None, description="Aleph Alpha: accepted and ignored")
    input_type: str | None = Field(default=None, description="Cohere, vLLM: e.g. search_query picks the model's query prompt")
    prompt_name: str | None = Field(default=None, description="TEI: the name of one of the model's prompts")
    priority: Priority = PRIORITY


class OllamaEmbedRequest(_Request):
    """Ollama ``POST /api/embed``."""

    model: str = Field(min_length=1)
    input: Any = Field(default=None, description="a string or an array of strings")
    truncate: bool | None = Field(default=None, description="default true: cut over-long inputs; false: a 400")
    dimensions: int | None = Field(default=None, gt=0)
    keep_alive: Any = None  # accepted: workers keep their model loaded anyway
    options: dict[str, Any] | None = None  # accepted: sampling options mean nothing to an embedding
    priority: Priority = PRIORITY


class RerankRequest(_Request):
    """Jina's and vLLM's ``POST /v1/rerank`` (and ``/rerank``); Cohere's ``POST /v2/rerank``
    sends the same fields, less ``return_documents``."""

    model: str = Field(min_length=1)
    query: str = Field(min_length=1)
    documents: list[Any] = Field(min_length=1, description='strings, or objects with a "text"')
    top_n: int | None = Field(default=None, gt=0)
    return_documents: bool = True
    truncate: bool = Field(default=True, description="embedq extension: cut over-long documents; false: a 400")
    max_tokens_per_doc: int | None = Field(default=None, gt=0, description="Cohere: accepted; documents are cut to the context")
    priority: Priority = PRIORITY


EmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]


class CohereContent(_Request):
    type: Literal["text", "image_url"]
    text: str | None = None


class CohereInput(_Request):
    content: list[CohereContent] = Field(min_length=1)


class CohereEmbedRequest(_Request):
    """Cohere's ``POST /v2/embed``: what ``cohere.ClientV2.embed`` sends."""

    model: str = Field(min_length=1)
    texts: list[str] | None = Field(default=None, min_length=1)
    inputs: list[CohereInput] | None = Field(default=None, min_length=1, description="texts in parts, joined by newlines")
    images: list[Any] | None = None  # refused: no image model is served
    input_type: str | None = Field(default=None, description="search_query, search_document, classification, clustering")
    embedding_types: list[EmbeddingType] = Field(default=["float"], min_length=1)
    output_dimension: int | None = Field(default=None, gt=0, description="a size the model supports (Matryoshka)")
    max_tokens: int | None = Field(default=None, gt=0, description="accepted at or above the model's context")
    truncate: Literal["NONE", "START", "END"] = Field(default="END", description="END cuts over-long texts; NONE: a 400")
    priority: Priority = PRIORITY


class CohereEmbedResponse(BaseModel):
    id: str
    embeddings: dict[EmbeddingType, list[list[float]] | list[list[int]] | list[str]]
    texts: list[str]
    meta: dict[str, Any]
    response_type: Literal["embeddings_by_type"]


class SparseRequest(_Request):
    """TEI's ``POST /embed_sparse``, and embedq's ``model`` (TEI serves one model)."""

    model: str | None = Field(default=None, min_length=1, description="embedq: needed where several sparse models are served")
    inputs: Any = Field(description="a text or an array of texts")
    truncate: bool = False
    truncation_direction: Literal["Right", "Left"] = "Right"
    prompt_name: str | None = None
    priority: Priority = PRIORITY


class SparseValue(BaseModel):
    index: int = Field(description="a token id")
    value: float


class SparseResponse(RootModel[list[list[SparseValue]]]):
    """Per text, its nonzero weights, by token id."""


class ScoreRequest(_Request):
    """vLLM's ``POST /score`` (and ``/v1/score``): one text against many, or pairwise."""

    model: str = Field(min_length=1)
    text_1: str | list[str]
    text_2: str | list[str]
    truncate: bool = Field(default=True, description="embedq extension: cut over-long texts; false: a 400")
    priority: Priority = PRIORITY


class TokenizeRequest(_Request):
    """vLLM's ``POST /tokenize``."""

    model: str = Field(min_length=1)
    prompt: str = Field(min_length=1)
    add_special_tokens: bool = True
    prompt_name: str | None = Field(default=None, description="TEI: tokenize with one of the model's prompts before it")


class DetokenizeRequest(_Request):
    """vLLM's ``POST /detokenize``."""

    model: str = Field(min_length=1)
    tokens: list[int] = Field(min_length=1)


class OllamaEmbeddingsRequest(_Request):
    """Ollama's legacy ``POST /api/embeddings``."""

    model: str = ""
    prompt: str = ""
    keep_alive: Any = None
    options: dict[str, Any] | None = None


class ExpiresAfter(_Request):
    """OpenAI's expiration policy for a file: so many seconds after it was made."""

    anchor: Literal["created_at"]
    seconds: int = Field(ge=3600, le=2592000, description="1 hour to 30 days, as OpenAI; the gateway's retention if shorter")


class FileUpload(_Request):
    """OpenAI ``POST /v1/files``'s form fields past ``file`` and ``purpose`` (``expires_after[anchor]``
    and ``expires_after[seconds]``, as the form sends them, nested)."""

    expires_after: ExpiresAfter | None = None


class BatchRequest(_Request):
    """OpenAI ``POST /v1/batches``."""

    input_file_id: str = Field(min_length=1)
    endpoint: Literal["/v1/embeddings"] = Field(description="the one endpoint batches run here")
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    output_expires_after: ExpiresAfter | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"]
    embedding: list[float] | list[int] | str = Field(
        description="floats, base64 of little-endian float32, or integers (output_dtype)"
    )
    index: int


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"]
    data: list[EmbeddingData]
    model: str
    usage: Usage


class ModelObject(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    tasks: list[str] = Field(description="embedq extension: embed, score (also rerank), tokenize")
    dimensions: int = Field(description="embedq extension: the size of its vectors")
    max_input_tokens: int = Field(description="embedq extension: its context")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelObject]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody


class OllamaEmbedResponse(BaseModel):
    model: str
    embeddings: list[list[float]]
    total_duration: int = Field(description="nanoseconds")
    load_duration: int = Field(description="nanoseconds")
    prompt_eval_count: int


class OllamaEmbeddingsResponse(BaseModel):
    embedding: list[float]


class OllamaModelDetails(BaseModel):
    parent_model: str
    format: str
    family: str
    families: list[str] | None
    parameter_size: str
    quantization_level: str


class OllamaModel(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: OllamaModelDetails


class OllamaTags(BaseModel):
    models: list[OllamaModel]


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult] = Field(description="most relevant first, top_n of them")
    usage: RerankUsage


class CohereRerankResponse(BaseModel):
    id: str
    results: list[RerankResult]
    meta: dict[str, Any]


class ScoreData(BaseModel):
    index: int
    object: Literal["score"]
    score: float


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"]
    created: int
    model: str
    data: list[ScoreData]
    usage: Usage


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class OllamaError(BaseModel):
    error: str


def parse_body(body: bytes, max_items: int | None = None) -> dict[str, Any]:
    """The body's JSON object. ``max_items``: the most items a list field may hold (a request's
    inputs, documents, pairs: ``EMBEDQ_MAX_REQUEST_INPUTS``), refused with 413 before any
    validation, which would take seconds for the millions of short strings 16 MB can hold."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"the request body must be a JSON object, got {json_type(data)}")
    if max_items is not None:
        for field, value in data.items():
            if isinstance(value, list) and len(value) > max_items:
                raise PayloadTooLarge(
                    f"'{field}' has {len(value)} items; a request may have at most {max_items} "
                    "(EMBEDQ_MAX_REQUEST_INPUTS): split it into several requests",
                    param=field,
                )
    return data


def validate(model: type[BaseModel], data: dict[str, Any]) -> Any:
    """Validate against a wire model; the first problem becomes a 400 or 422 naming its field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        if err["type"] == "missing":
            raise InvalidRequest(f"'{field}' is a required field", param=field, code="missing_field") from None
        problem = f"'{field}': {err['msg']} (got {preview(err['input'])})"
        if err["type"] in _TYPE_ERRORS:
            raise WrongType(problem, param=field) from None
        raise InvalidRequest(problem, param=field, code="invalid_value") from None


def texts_of(items: Any, field: str, max_inputs: int) -> list[str]:
    """A field that lists texts (Cohere's ``texts``, TEI's ``inputs``): an array of at most
    ``max_inputs`` non-empty strings, or a 400 naming the field or the item."""
    if not isinstance(items, list) or not items:
        raise WrongType(f"'{field}' must be a non-empty array of texts, got {json_type(items)}", param=field)
    if len(items) > max_inputs:
        raise InvalidRequest(f"'{field}' has {len(items)} items; at most {max_inputs} are allowed per request",
                             param=field, code="too_many_inputs")  # fmt: skip
    for i, text in enumerate(items):
        if not isinstance(text, str):
            raise WrongType(f"'{field}[{i}]' must be a string, got {json_type(text)}", param=f"{field}[{i}]")
        if not text:
            raise InvalidRequest(f"'{field}[{i}]' must not be an empty string", param=f"{field}[{i}]", code="invalid_value")
    return items


def json_type(value: Any) -> str:
    names = {str: "a string", int: "a number", float: "a number", bool: "a boolean", list: "an array", dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
