"""The per-run SVG charts: round ticks, data mapped into the frame, well-formed XML."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest

from benchkit import svgplot

NS = "{http://www.w3.org/2000/svg}"


@pytest.mark.parametrize("lo, hi, expected", [
    (0.0, 1.0, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),
    (0.8, 0.9, [0.8, 0.82, 0.84, 0.86, 0.88, 0.9]),
    (1, 13, [0, 5, 10, 15]),
    (3.0, 3.0, [2.4, 2.6, 2.8, 3.0, 3.2, 3.4, 3.6]),  # a constant series gets a band around it
])
def test_nice_ticks_are_round_and_cover_the_range(lo, hi, expected):
    ticks = svgplot.nice_ticks(lo, hi)
    assert ticks == pytest.approx(expected)
    assert ticks[0] <= lo and ticks[-1] >= hi


def test_line_chart_maps_points_into_the_frame():
    svg = ET.fromstring(svgplot.line_chart({"a": [(0, 0.0), (10, 1.0)], "b <&>": [(5, 0.5)]},
                                           xlabel="step", ylabel="acc", title="t"))
    frame = svg.findall(f"{NS}rect")[1]
    x0, y0 = float(frame.get("x")), float(frame.get("y"))
    x1, y1 = x0 + float(frame.get("width")), y0 + float(frame.get("height"))
    line = svg.findall(f"{NS}polyline")[0]
    (start, end) = [tuple(map(float, p.split(","))) for p in line.get("points").split()]
    assert start == pytest.approx((x0, y1), abs=0.1) and end == pytest.approx((x1, y0), abs=0.1)  # corners
    mid = [c for c in svg.findall(f"{NS}circle") if c.get("fill") == svgplot.COLORS[1]]
    assert float(mid[0].get("cx")) == pytest.approx((x0 + x1) / 2, abs=0.1)
    assert "b <&>" in [t.text for t in svg.iter(f"{NS}text")]  # escaped in the file, intact when parsed


def test_bar_chart_lengths_are_proportional_and_nan_is_left_out():
    svg = ET.fromstring(svgplot.bar_chart(["fc1", "fc2", "fc3"], [1.0, 0.25, math.nan], ylabel="density", ymax=1.0))
    frame = svg.findall(f"{NS}rect")[1]
    bars = svg.findall(f"{NS}rect")[2:]
    assert len(bars) == 2  # the NaN layer has a label but no bar
    w = [float(b.get("width")) for b in bars]
    assert w[1] / w[0] == pytest.approx(0.25, rel=1e-2)
    assert w[0] == pytest.approx(float(frame.get("width")), abs=0.1)  # 1.0 spans the axis
    assert [t.text for t in svg.iter(f"{NS}text")][-3:] == ["0.25", "fc2", "fc3"]


def test_bar_chart_of_54_layers_grows_downward_with_one_readable_row_per_layer():
    """A ResNet's 54 layers: fixed width, height growing by ROW px per layer, every label in its own row
    (rows ROW px apart, larger than the 11 px font), long names shortened from the left."""
    names = [f"layer{i // 10}.{i % 10}.conv{i % 3 + 1}" for i in range(54)] + ["x" * 60]
    few = ET.fromstring(svgplot.bar_chart(names[:3], [0.5] * 3, ylabel="density", ymax=1.0, title="t"))
    many = ET.fromstring(svgplot.bar_chart(names, [0.5] * len(names), ylabel="density", ymax=1.0, title="t"))
    assert many.get("width") == few.get("width")
    assert int(many.get("height")) - int(few.get("height")) == svgplot.ROW * (len(names) - 3)
    bars = many.findall(f"{NS}rect")[2:]
    assert len(bars) == len(names)
    tops = [float(b.get("y")) for b in bars]
    assert all(b - a == pytest.approx(svgplot.ROW) for a, b in zip(tops, tops[1:]))  # one row each, in order
    assert all(float(b.get("height")) < svgplot.ROW for b in bars)
    labels = [t for t in many.iter(f"{NS}text") if t.get("text-anchor") == "end"]
    assert [t.text for t in labels][:54] == names[:54]
    ys = [float(t.get("y")) for t in labels]
    assert min(b - a for a, b in zip(ys, ys[1:])) >= svgplot.ROW > 11  # the font size: no two labels overlap
    assert labels[-1].text == "…" + "x" * (svgplot.MAX_LABEL - 1)
    frame = many.findall(f"{NS}rect")[1]
    assert float(frame.get("x")) >= svgplot.CHAR * svgplot.MAX_LABEL  # the label column fits the longest name
