"""Request bodies of the OpenAI API as crma serves it (pydantic checks types and ranges).

Fields OpenAI defines that crma does not implement are refused by name rather than ignored,
so a client never silently gets something else than it asked for; unknown extra fields are
ignored as OpenAI does.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOPS = 4
METADATA_KEYS = 16  # OpenAI's limits on metadata


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")
    UNSUPPORTED: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        extra = self.model_extra or {}
        for name in sorted(self.UNSUPPORTED):
            value = extra.get(name)
            default = value is None or value is False or value in ([], {})
            if not default and not (name == "best_of" and value == 1):
                raise ValueError(f"{name}: not supported by crma serve")
        return self


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Generation(_Body):
    model: str = Field(min_length=1, max_length=128)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**62)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])


class CompletionRequest(_Generation):
    UNSUPPORTED = frozenset({"logprobs", "echo", "suffix", "best_of", "logit_bias"})
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str:
        prompts = [value] if isinstance(value, str) else value
        if len(prompts) != 1:
            raise ValueError("send one prompt per request (a string)")
        if not prompts[0]:
            raise ValueError("the prompt is empty")
        return prompts[0]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(_Generation):
    UNSUPPORTED = frozenset(
        {"tools", "functions", "tool_choice", "logprobs", "top_logprobs", "logit_bias", "audio"}
    )
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def conversation(self) -> list[dict[str, str]]:
        """Messages as the chat template takes them ('developer' is OpenAI's new 'system')."""
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text}
            for m in self.messages
        ]

    def route_text(self) -> str:
        """What the router reads: the last user message."""
        users = [m.text for m in self.messages if m.role == "user"]
        return users[-1] if users else self.messages[-1].text


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: int | Literal["auto"] = "auto"
    batch_size: int | Literal["auto"] = "auto"
    learning_rate_multiplier: float | Literal["auto"] = "auto"

    @field_validator("n_epochs", "batch_size")
    @classmethod
    def _positive(cls, value):
        if value != "auto" and not 1 <= value <= 1000:
            raise ValueError("must be 'auto' or between 1 and 1000")
        return value

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _multiplier(cls, value):
        if value != "auto" and not 0 < value <= 100:
            raise ValueError("must be 'auto' or in (0, 100]")
        return value


class JobRequest(_Body):
    UNSUPPORTED = frozenset({"validation_file", "integrations"})
    training_file: str = Field(min_length=1, max_length=64)
    model: str = Field(min_length=1, max_length=128)
    suffix: str | None = None
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    seed: int | None = Field(None, ge=0, lt=2**31)
    metadata: dict[str, str] | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value):
        if value and (
            len(value) > METADATA_KEYS or any(len(k) > 64 or len(v) > 512 for k, v in value.items())
        ):
            raise ValueError(f"at most {METADATA_KEYS} keys of 64 characters, values of 512")
        return value

    @property
    def route_examples(self) -> str | None:
        """The file id in `metadata.route_examples`: prompts in the style users will send,
        stored in the new domain's router entry and never trained on."""
        return (self.metadata or {}).get("route_examples")
