"""The correction the estimator applies: GiB per GPU of non-KV memory, learned by smartrun.calibration
from this machine's own startups, and the plan-safe band those startups support."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from smartrun.frozen import Frozen

MIN_AGREEING = 2  # startups that must agree before the estimate grows (and before their band holds alone)


class Correction(Frozen):
    """GiB per GPU added to the estimator's non-KV memory, learned from this machine's startups (see smartrun.calibration)."""

    machine: str  # hardware fingerprint (smartrun.hardware.fingerprint)
    vllm_version: str
    startups: int  # how many startups it was learned from (the recent window)
    non_kv_gib: float  # > 0: vLLM left less KV cache than estimated; < 0: more
    rule: Literal["shrink", "grow", "hold"]
    residuals_gib: tuple[float, ...] = ()  # per startup, oldest first: measured minus estimated non-KV
    terms_gib: dict[str, float] = Field(default_factory=dict)  # mean measured-minus-estimated per printed term
    clamped: bool = False
    note: str = ""
    band_gib: float | None = None  # plan-safe band these startups support (smartrun.calibration); None: the profile's

    def margin_bytes(self, profile_bytes: int) -> int:
        """The non-KV memory a plan keeps back: the profile's band narrowed to this machine's own (smartrun.calibration).

        With fewer than MIN_AGREEING startups the plan-safe estimate may only fall: the correction's
        shrink counts toward the profile's band, so correction + band never leaves more KV cache than
        the uncalibrated low end did.
        """
        if self.band_gib is None:  # no band recorded with it: plan with the profile's
            return profile_bytes
        own = int(self.band_gib * (1 << 30))
        if self.startups >= MIN_AGREEING:
            return min(profile_bytes, own)
        taken = int(max(self.non_kv_gib, 0.0) * (1 << 30))
        return min(profile_bytes, max(own, profile_bytes - taken))

    def band_text(self) -> str:
        """How the plan-safe band follows from the startups, for the estimate's uncertainty line."""
        if self.band_gib is None:
            return "calibrated: the profile's band"
        if self.startups >= MIN_AGREEING:
            return (f"calibrated: {self.startups} startups on this machine support a band of {self.band_gib:.2f} GiB "
                    "(the narrower of the two is kept back)")
        return (f"calibrated from 1 startup (band {self.band_gib:.2f} GiB): the plan-safe estimate may only fall "
                f"until {MIN_AGREEING} startups agree")

    def describe(self) -> str:
        """`calibrated from N startups on this machine: ...`, the line `model estimate` and --explain print."""
        n = self.startups
        head = f"calibrated from {n} startup{'s' if n != 1 else ''} on this machine (vLLM {self.vllm_version})"
        what = (f"non-KV {self.non_kv_gib:+.2f} GiB per GPU" if self.rule != "hold"
                else "no change")
        parts = [p for p in (self.note, terms_text(self.terms_gib)) if p]
        return f"{head}: {what}" + (f" ({'; '.join(parts)})" if parts else "")


def terms_text(terms: dict[str, float]) -> str:
    """The mean measured-minus-estimated GiB of each printed term, for messages."""
    names = {"weights": "weights", "activation": "activation", "non_torch": "non-torch",
             "cudagraph": "CUDA graphs", "unprinted": "not printed by vLLM"}
    return ", ".join(f"{names.get(k, k)} {v:+.2f}" for k, v in terms.items() if abs(v) >= 0.005)
