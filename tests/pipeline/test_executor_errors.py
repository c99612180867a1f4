"""A shard's error is one line a user can act on, also when a stage's config fails on a worker."""

from __future__ import annotations

from pydantic import BaseModel, Field

from pairsift.pipeline.config import ExecutorConfig
from pairsift.pipeline.executor import Job, LocalExecutor, WorkerSpec


class Settings(BaseModel):
    radius: int = Field(ge=0)


class ValidatesOnTheWorker:
    def run(self, shard: int) -> None:
        Settings(radius=-1)  # what a stage's config class does when a worker rebuilds it


class Fails:
    def run(self, shard: int) -> None:
        raise RuntimeError("first line\nthe line that says what happened")


def errors_of(cls: type) -> str:
    results = []
    LocalExecutor(ExecutorConfig(max_retries=0)).map(WorkerSpec(cls, {}), [Job(0, "run")], results.append)
    return results[0].error


def test_a_validation_error_names_the_field_and_the_problem():
    error = errors_of(ValidatesOnTheWorker)
    assert error == "ValidationError: Settings.radius: Input should be greater than or equal to 0"
    assert "errors.pydantic.dev" not in error and "\n" not in error


def test_other_errors_keep_their_last_line():
    assert errors_of(Fails) == "RuntimeError: the line that says what happened"
