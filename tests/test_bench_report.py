"""resfast.bench.report: runs of one suite merged into their medians, and the
merged result rendered."""

import pytest

from resfast.bench import report


def _run(date, eager, ours, conv, case="unit 1x1"):
    entry = {"seconds": {"eager": {"median": eager}, "resfast": {"median": ours}, "conv": {"median": conv}},
             "speedup_vs_eager": eager / ours, "vs_conv": {"eager": eager / conv, "resfast": ours / conv}}
    env = {"date": date, "device": "CPU", "dtype": "float32", "channels_last": False, "torch": "2", "triton": "3",
           "threads": 2}
    return {"environment": env,
            "cases": [{"config": {"case": case, "batch": 2}, "saved_ratio": 0.5, "results": {"inference": entry}}]}


def test_merge_takes_medians_of_times_and_ratios():
    runs = [_run("d1", 3.0, 2.0, 1.0), _run("d2", 1.0, 2.0, 2.0), _run("d3", 2.0, 4.0, 4.0)]
    merged = report.merge(runs)
    entry = merged["cases"][0]["results"]["inference"]
    assert entry["seconds"]["eager"] == {"median": 2.0, "run_medians": [3.0, 1.0, 2.0]}
    assert entry["seconds"]["resfast"]["median"] == 2.0
    # The median of the runs' ratios (1.5, 0.5, 0.5), not a ratio of medians (1.0).
    assert entry["speedup_vs_eager"] == 0.5
    assert entry["vs_conv"] == {"eager": 0.5, "resfast": 1.0}
    assert merged["environment"]["runs"] == ["d1", "d2", "d3"]
    assert runs[0]["cases"][0]["results"]["inference"]["speedup_vs_eager"] == 1.5  # inputs untouched
    assert "median of 3 runs" in report.table(merged, "merged.json")


def test_merge_rejects_runs_that_differ():
    with pytest.raises(SystemExit, match="differ in their cases"):
        report.merge([_run("d1", 1.0, 1.0, 1.0), _run("d2", 1.0, 1.0, 1.0, case="other")])
    other_machine = _run("d2", 1.0, 1.0, 1.0)
    other_machine["environment"]["threads"] = 4
    with pytest.raises(SystemExit, match="differ in threads"):
        report.merge([_run("d1", 1.0, 1.0, 1.0), other_machine])
    fewer_modes = _run("d2", 1.0, 1.0, 1.0)
    fewer_modes["cases"][0]["results"]["training"] = fewer_modes["cases"][0]["results"]["inference"]
    with pytest.raises(SystemExit, match="differ in the modes"):
        report.merge([_run("d1", 1.0, 1.0, 1.0), fewer_modes])
