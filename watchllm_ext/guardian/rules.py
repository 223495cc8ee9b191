"""A Guardian rule as written in the settings (pydantic only: settings import it)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

Metric = Literal["cost_usd", "latency_p95_ms", "error_rate", "failures"]
Per = Literal["project", "run", "user"]
FailureType = Literal["assertion_failed", "hallucination_detected"]


class GuardianRule(BaseModel):
    """One rule: `metric` over the last `window_s` seconds, per project, run or user, is over
    `threshold`. The figures (docs/OPERATIONS.md, "Guardian mode"):

    - `cost_usd`: the sum of `cost_estimate_usd` of prompt calls;
    - `latency_p95_ms`: the 95th percentile of prompt calls' `latency_ms`;
    - `error_rate`: the share (0-1) of prompt calls whose status is not `success`;
    - `failures`: the number of `assertion_failed` / `hallucination_detected` events.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:\-]{1,64}$")]
    project: Annotated[str, StringConstraints(min_length=1, max_length=64)] = "*"
    metric: Metric
    per: Per = "project"
    threshold: float = Field(ge=0, le=1e12, allow_inf_nan=False)
    window_s: float = Field(3600.0, gt=0, le=30 * 24 * 3600)
    # p95 and error rate of two calls mean little: judge only with this many in the window.
    min_events: int = Field(1, ge=1, le=1_000_000)
    failure_types: list[FailureType] = Field(
        default_factory=lambda: ["assertion_failed", "hallucination_detected"]
    )
    block: bool = False

    @model_validator(mode="after")
    def _rate_is_a_share(self) -> GuardianRule:
        if self.metric == "error_rate" and self.threshold > 1:
            raise ValueError(f"rule {self.name!r}: error_rate threshold is a share from 0 to 1")
        if self.block and self.per == "run":
            # The quota check knows the project and the user, never the run.
            raise ValueError(f"rule {self.name!r}: block needs per = project or user")
        return self

    def applies_to(self, project_id: str) -> bool:
        return self.project in ("*", project_id)
