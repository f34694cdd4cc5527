"""Verdicts on known inputs: clearly better, clearly worse, within the noise; the summary."""

from __future__ import annotations

import pytest

from selfconsist.report import BETTER, CHANGED, SAME, WORSE, direction, summary_lines, verdict


def e(value: float, stderr: float | None = None) -> dict:
    return {"value": value, "stderr": stderr}


def test_directions() -> None:
    assert direction("recon_mse") == "down" and direction("adv_shift@0.1") == "down"
    assert direction("probe_acc_ce@0.2") == "up" and direction("latent_roundtrip_corr") == "up"
    assert direction("active_units") == ""


@pytest.mark.parametrize(("key", "before", "after", "expected"), [
    ("recon_mse", e(1.0, 0.01), e(0.5, 0.01), BETTER),  # lower is better, far beyond the noise
    ("probe_acc", e(0.5, 0.01), e(0.9, 0.01), BETTER),  # higher is better
    ("adv_shift@0.1", e(0.1826, 0.0019), e(0.2148, 0.0021), WORSE),  # the demo's +18%
    ("probe_acc_ce@0.1", e(0.2618, 0.023), e(0.1811, 0.020), WORSE),  # 0.081 > 0.061
    ("probe_acc", e(0.8802, 0.017), e(0.8747, 0.017), SAME),  # −0.006, threshold 0.048
    ("recon_mse", e(0.01874, 0.00051), e(0.01964, 0.00055), SAME),  # +5%, within 2σ
    ("active_units", e(4.0), e(6.0), CHANGED),  # a count: no better way
    ("probe_acc_ce@0.2", e(0.0, 0.0), e(0.0, 0.0), SAME),
])
def test_verdict_on_known_inputs(key, before, after, expected) -> None:
    assert verdict(key, before, after).verdict == expected


def test_threshold_is_two_combined_standard_errors() -> None:
    # se 0.03 and 0.04 → 2·√(0.03² + 0.04²) = 0.1
    assert verdict("probe_acc", e(0.5, 0.03), e(0.599, 0.04)).verdict == SAME
    assert verdict("probe_acc", e(0.5, 0.03), e(0.601, 0.04)).verdict == BETTER
    assert verdict("probe_acc", e(0.5, 0.03), e(0.399, 0.04)).verdict == WORSE
    assert verdict("probe_acc", e(0.5, 0.03), e(0.6, 0.04)).threshold == pytest.approx(0.1)
    # a missing or NaN standard error counts as 0
    assert verdict("recon_mse", e(1.0, None), e(1.001, float("nan"))).verdict == WORSE


def test_summary_names_what_improved_what_got_worse_and_the_responsive_units() -> None:
    before = {"sample_roundtrip_mse": e(1.0, 0.01), "adv_shift@0.1": e(0.18, 0.002),
              "probe_acc": e(0.88, 0.017), "responsive_elements": e(4.0),
              "responsive_active": e(4.0)}
    after = {"sample_roundtrip_mse": e(0.7, 0.01), "adv_shift@0.1": e(0.21, 0.002),
             "probe_acc": e(0.875, 0.017), "responsive_elements": e(4.0),
             "responsive_active": e(4.0)}
    lines = summary_lines(before, after)
    assert 3 <= len(lines) <= 4
    assert lines[0].startswith("Improved (1): sample_roundtrip_mse -30%")
    assert lines[1].startswith("Got worse (1): adv_shift@0.1 +17%")
    assert "probe_acc" in lines[2] and lines[2].startswith("No significant change")
    assert lines[3] == "Decoder-responsive elements kept: 4 of 4 active after (4 before)."
    after["responsive_active"] = e(2.0)
    assert "LOST" in summary_lines(before, after)[-1]
    # nothing changed beyond the noise: said plainly
    same = summary_lines({"probe_acc": e(0.5, 0.1)}, {"probe_acc": e(0.52, 0.1)})
    assert same[:2] == ["Improved: nothing, beyond the standard errors.",
                        "Got worse: nothing, beyond the standard errors."]
    # data-free (tune): the responsive elements' round-trip correlation tells
    key = "latent_roundtrip_corr_responsive"
    lost = summary_lines({key: e(0.98, 0.001)}, {key: e(0.5, 0.001)})
    assert "LOST" in lost[-1] and "0.980 → 0.500" in lost[-1]
