"""Read scalars back from TensorBoard event files (for the demo summary, reports and tests)."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar series under a log dir, merged over event files, sorted by step.

    Args:
        logdir: a directory holding ``events.out.tfevents.*`` files (a resumed run adds more).

    Returns:
        tag -> [(step, value), ...]; a step logged twice (a resumed run) keeps the later value.
    """
    series: dict[str, dict[int, float]] = {}
    for event_file in sorted(Path(logdir).glob("events.out.tfevents.*"),
                             key=lambda p: p.stat().st_mtime):
        accumulator = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            for event in accumulator.Scalars(tag):
                series.setdefault(tag, {})[event.step] = event.value
    return {tag: sorted(points.items()) for tag, points in series.items()}


def read_layout(logdir: str | Path) -> dict[str, list[str]]:
    """The custom-scalars layout written into a run: chart title -> tag regexes.

    Args:
        logdir: a directory holding ``events.out.tfevents.*`` files.
    """
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.custom_scalar import layout_pb2

    charts: dict[str, list[str]] = {}
    for event_file in sorted(Path(logdir).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(event_file)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name != "custom_scalars":
                    continue
                layout = layout_pb2.Layout()
                layout.ParseFromString(value.tensor.string_val[0])
                for category in layout.category:
                    for chart in category.chart:
                        charts[chart.title] = list(chart.multiline.tag)
    return charts
